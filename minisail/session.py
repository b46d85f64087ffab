"""A conversation with a model: the small idiomatic API behind `python -m minisail chat`.

`Session(folder_or_model, tokenizer=None, max_tiles=..., dtype=..., device=...)`:
`.ask(question, images=[...], stream=False, think=False, **sampling)` keeps a multi-turn history, tiles the
images the family's way and streams the reply; the streamed pieces join to the reply it keeps in the history
(chat()'s post-processing, minisail/chat.py). Unlike chat() it also stops on the tokenizer's eos, not only on
the template's sep.

Thinking models (SAIL-VL2-Thinking) are asked with THINK_INSTRUCTION appended to the question (model card);
`split_thinking` separates `<think>...</think>` from the answer and its `\\boxed{}` content.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch

from minisail.chat import ChatPrompt, bind_chat, chat_template, is_yivl, prepare_chat
from minisail.checkpoint.paths import read_json_object
from minisail.errors import MinisailError, PromptError
from minisail.generate import GenerationConfig, generate_stream
from minisail.text.prompt import IMAGE_PLACEHOLDER, append_history, decode_reply
from minisail.text.templates import get_template

THINK_INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
    "The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST BE put in \\boxed{}."
)
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


# --- thinking replies ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThoughtReply:
    text: str  # the whole reply, as chat() returns it
    reasoning: str  # inside <think> ... </think>, stripped ('' when the reply does not start with <think>)
    response: str  # after </think> (the whole reply when there is no reasoning), stripped
    answer: str  # the content of the last \boxed{...} in the response, else the response


def _reply_parts(text: str, think: bool) -> dict[str, str]:
    """The reply as (reasoning, answer) texts; a reply has reasoning only if it starts with <think>."""
    text = text.lstrip()
    if not think or not text.startswith(THINK_OPEN):
        return {"reasoning": "", "answer": text.strip()}
    reasoning, _, answer = text[len(THINK_OPEN) :].partition(THINK_CLOSE)
    return {"reasoning": reasoning.strip(), "answer": answer.strip()}


BOXED = "\\boxed{"
BRACES = re.compile(r"[{}]")


def boxed_content(text: str) -> str | None:
    """The content of the last complete `\\boxed{...}`, nested braces included; None if there is none.

    "Last" is the latest-starting `\\boxed{` whose brace is closed; an unclosed later one (a reply cut off) is
    skipped. One pass: every brace is matched with a stack, then the last `\\boxed{` with a match wins.
    """
    closing: dict[int, int] = {}  # position of a "{" -> position of its matching "}"
    open_braces: list[int] = []
    for brace in BRACES.finditer(text):
        if brace.group() == "{":
            open_braces.append(brace.start())
        elif open_braces:
            closing[open_braces.pop()] = brace.start()
    best = None
    for opening in re.finditer(re.escape(BOXED), text):
        brace = opening.end() - 1
        if brace in closing:
            best = text[brace + 1 : closing[brace]]
    return best


def split_thinking(text: str) -> ThoughtReply:
    parts = _reply_parts(text, think=True)
    boxed = boxed_content(parts["answer"])
    return ThoughtReply(text, parts["reasoning"], parts["answer"], parts["answer"] if boxed is None else boxed)


class _StrippedText:
    """Text arriving in chunks, emitted as the chunks' `.strip()` would end: leading whitespace dropped, trailing
    whitespace held back until something non-blank follows it."""

    def __init__(self):
        self.started = False
        self.pending: list[str] = []  # whitespace seen after the last non-blank character

    def feed(self, chunk: str) -> str:
        if not self.started:
            chunk = chunk.lstrip()
            self.started = bool(chunk)
        body = chunk.rstrip()
        if not body:
            self.pending += [chunk] if chunk else []
            return ""
        out = "".join(self.pending) + body
        self.pending = [chunk[len(body) :]]
        return out


class ReplyStream:
    """Decoded text pieces in; (kind, text) events out, kind "reasoning" or "answer", that join to the reply.

    What is emitted is always a prefix of the final reply: leading and trailing whitespace are held back (the
    reply is stripped), and so is the end of the text while it could still become a cut string (`<|im_end|>`,
    `###`) or a think tag.

    Incremental: each piece costs time in proportion to its length (plus the watched strings' lengths), never to
    the text so far. Only the unreleased end of the text is kept: the part that could still be a cut string or
    a tag. What is released ("visible") only ever grows, and it goes through a small state machine: undecided
    (is it `<think>...`?), then the reasoning (up to `</think>`) and the answer, each stripped as it arrives.
    """

    def __init__(self, cut_at: Sequence[str] = (), *, think: bool = False):
        self.cut_at = [s for s in cut_at if s]
        self.think = think
        self.watch = self.cut_at + ([THINK_OPEN, THINK_CLOSE] if think else [])
        self.unreleased = ""  # the end of the text not visible yet (shorter than the longest watched string)
        self.cut = False  # a cut string was found: everything after it is ignored
        self.head = ""  # visible text while undecided, leading whitespace dropped
        self.kind = None  # None (undecided), "answer", "reasoning" (inside <think>), or "after" (past </think>)
        self.close_tail = ""  # the reasoning's last characters, to find a </think> split across pieces
        self.parts = {"reasoning": _StrippedText(), "answer": _StrippedText()}

    def feed(self, piece: str) -> list[tuple[str, str]]:
        if self.cut:
            return []
        text = self.unreleased + piece
        found = [i for i in (text.find(cut) for cut in self.cut_at) if i >= 0]
        if found:  # the reply ends at the first cut string
            text, self.cut = text[: min(found)], True
        held = max((n for s in self.watch for n in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:n])),
                   default=0)  # fmt: skip
        self.unreleased = text[len(text) - held :]
        return self._release(text[: len(text) - held], final=False)

    def finish(self) -> list[tuple[str, str]]:
        text, self.unreleased = self.unreleased, ""
        return self._release(text, final=True)

    def _release(self, visible: str, final: bool) -> list[tuple[str, str]]:
        """Route newly visible text to the reasoning or the answer, as `_reply_parts` splits the whole."""
        events: list[tuple[str, str]] = []
        if self.kind is None:
            self.head = (self.head + visible).lstrip()
            if not self.head:
                return events  # only whitespace so far
            # Decided by the first visible non-blank text: a partial "<think>" at the very end is held back,
            # so a visible head that does not start with the whole tag never becomes one.
            if self.think and self.head.startswith(THINK_OPEN):
                self.kind, self.head = "reasoning", self.head[len(THINK_OPEN) :]
            else:
                self.kind = "answer"
            visible, self.head = self.head, ""
        if self.kind == "reasoning":
            window = self.close_tail + visible
            close = window.find(THINK_CLOSE)
            if close < 0:
                self.close_tail = window[-(len(THINK_CLOSE) - 1) :]
                self._emit(events, "reasoning", visible)
                return events
            # the reasoning ends before </think> (text already emitted past it stays emitted, as before)
            self._emit(events, "reasoning", visible[: max(0, close - len(self.close_tail))])
            visible, self.kind = window[close + len(THINK_CLOSE) :], "after"
        self._emit(events, "answer", visible)
        return events

    def _emit(self, events: list, kind: str, chunk: str) -> None:
        out = self.parts[kind].feed(chunk)
        if out:
            if events and events[-1][0] == kind:
                events[-1] = (kind, events[-1][1] + out)
            else:
                events.append((kind, out))


# --- a conversation -------------------------------------------------------------------------------------------------


def sampling_config(base: GenerationConfig | None = None, **options) -> GenerationConfig:
    """`base` with the options that are not None; temperature/top_p/top_k turn sampling on, temperature 0 off."""
    options = {key: value for key, value in options.items() if value is not None}
    if "do_sample" not in options and options.keys() & {"temperature", "top_p", "top_k"}:
        options["do_sample"] = True
    if options.get("temperature") == 0:
        options.pop("temperature")
        options["do_sample"] = False
    return (base or GenerationConfig()).with_options(**options)


def tile_limits(model, min_tiles=None, max_tiles=None) -> tuple[int, int]:
    """(min, max) tiles: the override, else preprocessor_config.json (SAIL-VL2 says 10 there), else config.json."""
    c = model.config
    low, high = getattr(c, "min_dynamic_patch", 1), getattr(c, "max_dynamic_patch", 12)
    folder = getattr(model, "checkpoint_folder", None)
    if folder is not None:
        processor = read_json_object(folder, "preprocessor_config.json", "preprocessor config") or {}
        low, high = processor.get("min_dynamic_patch", low), processor.get("max_dynamic_patch", high)
    return (low if min_tiles is None else min_tiles), (high if max_tiles is None else max_tiles)


class Session:
    """A multi-turn conversation with one model: `Session("weights/SAIL-VL2-2B").ask("Hi", images=["a.jpg"])`.

    `model`: a checkpoint folder (loaded with `dtype` / `device`), or a loaded model with its `tokenizer`
    (or a (model, tokenizer) pair). Tiles per image: `min_tiles` / `max_tiles`, else the checkpoint's.
    `system` replaces the template's system message; `generation` holds the default sampling settings.
    A checkpoint loaded here without a `dtype` runs in `loading.default_dtype`'s choice for the device (on a CPU
    without native bf16: float32 when it fits in memory), said in the log. Loaded in bf16 on a CPU whose oneDNN
    runs bf16, its Linears are packed (`pack=False`: not): the same numbers, decoded faster (minisail/llm/fast.py);
    elsewhere they stay plain, and the log says why. A model passed in is used as it is.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        min_tiles=None,
        max_tiles=None,
        dtype=None,
        device=None,
        quantize=None,
        pack: bool = True,
        system=None,
        template=None,
        generation: GenerationConfig | None = None,
        log=None,
    ):
        log = log or (lambda message: None)
        if isinstance(model, tuple):
            model, tokenizer = model
        if isinstance(model, (str, os.PathLike)):
            from minisail.loading import default_dtype, load, resolve_device, resolve_dtype
            from minisail.text.tokenizer import load_tokenizer

            folder = Path(model)
            dtype, device = resolve_dtype(dtype), resolve_device(device)  # a bad name fails before any reading
            if tokenizer is None:  # first: a missing tokenizer file fails before the long part
                log(f"loading the tokenizer from {folder}")
                tokenizer = load_tokenizer(folder)
            if dtype is None:
                dtype, why = default_dtype(folder, device)
                log(f"dtype: {why}")
            log(f"loading the checkpoint {folder}")
            start = time.perf_counter()
            model = load(folder, dtype=dtype, device=device, quantize=quantize)
            count = sum(p.numel() for p in model.parameters())
            weight = next(model.parameters())
            seconds = time.perf_counter() - start
            dtype_name = str(weight.dtype).removeprefix("torch.")
            log(
                f"loaded {getattr(model, 'family', 'the model')}: {count / 1e6:.1f}M parameters, {dtype_name} on "
                f"{weight.device}, in {seconds:.1f}s"
            )
            if pack and weight.device.type == "cpu" and weight.dtype == torch.bfloat16:
                from minisail.fast.packing import pack_linears, packing_support

                start = time.perf_counter()
                support = packing_support()  # decided by trying oneDNN's bf16 kernel on this CPU
                packed = pack_linears(model) if support.available else 0  # the same numbers, streamed faster
                if packed:
                    log(f"packed {packed} bf16 Linears for oneDNN in {time.perf_counter() - start:.1f}s")
                else:
                    log(f"bf16 Linears run as plain F.linear: {support.reason}")
        elif tokenizer is None:
            raise MinisailError("Session(model, tokenizer): give the tokenizer with a model, or a checkpoint folder")
        elif dtype is not None or device is not None:
            from minisail.loading import resolve_dtype

            model = model.to(device=device, dtype=resolve_dtype(dtype))
        self.model, self.tokenizer = bind_chat(model), tokenizer
        self.template = chat_template(model) if template is None else get_template(template)
        if system is not None:
            self.template = self.template.with_system_message(system)
        self.min_tiles, self.max_tiles = tile_limits(model, min_tiles, max_tiles)
        self.generation = generation or GenerationConfig()
        self.reset()

    def reset(self) -> None:
        self.history: list[tuple[str, str]] = []  # (question as used, reply), as chat() keeps it
        self._images: list[torch.Tensor] = []  # pixel_values of each image so far, in prompt order
        self._embeds: list[torch.Tensor] = []  # their image embeddings, encoded once (every turn resends them)

    def pixel_values(self, image) -> torch.Tensor:
        """One image as this family's vision tower takes it: InternVL tiles, or Yi-VL's padded square."""
        from minisail.image.preprocess import internvl_pixel_values, yivl_pixel_values

        c = self.model.config
        if is_yivl(self.model):
            return yivl_pixel_values(image, image_size=c.image_size)
        return internvl_pixel_values(
            image,
            min_tiles=self.min_tiles,
            max_tiles=self.max_tiles,
            image_size=c.image_size,
            use_thumbnail=c.use_thumbnail,
        )

    def _with_placeholders(self, question: str, new_images: int) -> str:
        """Put `<image>` for each new image in front of the question, as chat() does for one on a first turn."""
        if is_yivl(self.model):
            if len(self._images) + new_images > 1:
                raise PromptError("Yi-VL takes one image per conversation: start a new one (/reset) for another")
            return question  # build_yivl_query places it
        found = question.count(IMAGE_PLACEHOLDER)
        if found == new_images:
            return question
        if found == 0 and new_images == 1:
            return IMAGE_PLACEHOLDER + "\n" + question
        if found == 0:
            first = len(self._images) + 1
            return "".join(f"Image-{first + i}: {IMAGE_PLACEHOLDER}\n" for i in range(new_images)) + question
        raise PromptError(
            f"the question has {found} '{IMAGE_PLACEHOLDER}' placeholder(s) for {new_images} new image(s): "
            "write one per image, or none to have them put in front"
        )

    def ask(self, question: str, images=(), *, stream: bool = False, think: bool = False, **sampling):
        """The reply: a str, or a ThoughtReply if think. With stream=True an iterator of text pieces instead, or
        of (kind, text) events if think (kind "reasoning" or "answer"). `sampling`: GenerationConfig options."""
        if isinstance(images, (str, os.PathLike, PIL.Image.Image)):
            images = [images]
        config = sampling_config(self.generation, **sampling)
        new = [self.pixel_values(image) for image in images]
        question = self._with_placeholders(question, len(new)) + (THINK_INSTRUCTION if think else "")
        all_images = self._images + new
        prompt = prepare_chat(
            self.model,
            self.tokenizer,
            torch.cat(all_images) if all_images else None,
            question,
            history=self.history,
            num_patches_list=[len(p) for p in all_images],
            template=self.template,
        )
        # chat() stops on the template's sep only; a session also stops on the tokenizer's eos (<|endoftext|>)
        config = prompt.generation_config(config, also_stop_on=[self.tokenizer.eos_token_id])
        # Upstream chat() re-encodes every image of the conversation each turn; the embeddings do not change,
        # so a session encodes each image once (the new images are the last rows of the prompt's pixel_values).
        new_embeds = self._encode(prompt.pixel_values[len(prompt.pixel_values) - sum(map(len, new)) :]) if new else []
        image_embeds = torch.cat(self._embeds + new_embeds) if all_images else None
        if stream:
            return self._stream(prompt, config, new, new_embeds, image_embeds, think)
        ids = prompt.generate(self.model, self.tokenizer, config, image_embeds=image_embeds)
        reply = decode_reply(self.tokenizer, ids[0].tolist(), prompt.template)
        self._remember(prompt, new, new_embeds, reply)
        return split_thinking(reply) if think else reply

    def _encode(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        with torch.inference_mode():
            return [self.model.encode_images(pixel_values)]  # [tiles, tokens per tile, H]

    def _stream(self, prompt: ChatPrompt, config: GenerationConfig, new_images, new_embeds, image_embeds, think):
        ids: list[int] = []
        pieces = generate_stream(
            self.model,
            self.tokenizer,
            prompt.input_ids,
            prompt.attention_mask,
            None,
            config,
            on_token=ids.append,
            penalize_prompt=False,
            image_embeds=image_embeds,
        )
        reply_stream = ReplyStream(prompt.cut_strings, think=think)
        for piece in pieces:
            for kind, text in reply_stream.feed(piece):
                yield (kind, text) if think else text
        for kind, text in reply_stream.finish():
            yield (kind, text) if think else text
        self._remember(prompt, new_images, new_embeds, decode_reply(self.tokenizer, ids, prompt.template))

    def _remember(self, prompt: ChatPrompt, new_images, new_embeds, reply: str) -> None:
        self._images += new_images
        self._embeds += new_embeds
        append_history(self.history, prompt.queries[0].question, reply)
