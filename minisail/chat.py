"""Chatting with a model: upstream-compatible `chat()` / `batch_chat()`, thinking replies, and a `Session`.

`chat(model, tokenizer, pixel_values, question, generation_config, history=None, return_history=False, ...)` and
`batch_chat(...)` reproduce `InternVLChatModel.chat()` / `batch_chat()` of InternVL `modeling_internvl_chat.py`
(@ 2410d1d) and SAIL-VL2's `modeling_sailvl.py`, so code written for the official models runs unchanged
(`bind_chat(model)` adds them as methods: `model.chat(tokenizer, pixel_values, question, generation_config)`):
- the prompt: minisail.text.prompt (the `<image>\\n` rule, image expansion, history, left-padded batches);
- eos: the template's `sep.strip()` id, written into the caller's `generation_config` dict as upstream does;
  generation as transformers does it on `inputs_embeds` (repetition penalty over the new tokens only);
- the reply: decoded without special tokens, cut at the sep, stripped; the history gets (question as used, reply);
- the system message: `config.system_message` when set, except SAIL-VL2, whose code always uses the template's;
- Yi-VL, which has no chat() upstream, follows Yi's `single_inference.py` instead: `<image_placeholder>` spliced
  in as id -200, stop on eos or the text `###`, strip and drop the trailing `###`.

Thinking models (SAIL-VL2-Thinking) are asked with THINK_INSTRUCTION appended to the question (model card);
`split_thinking` separates `<think>...</think>` from the answer and its `\\boxed{}` content.

`Session(folder_or_model, tokenizer=None, max_tiles=..., dtype=..., device=...)` is the small API the CLI uses:
`.ask(question, images=[...], stream=False, think=False, **sampling)` keeps a multi-turn history, tiles the
images the family's way and streams the reply; the streamed pieces join to the reply it keeps in the history
(chat()'s post-processing). Unlike chat() it also stops on the tokenizer's eos, not only on the template's sep.
"""

from __future__ import annotations

import json
import os
import time
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch

from minisail.errors import MinisailError, PromptError, TokenizerError
from minisail.generate import GenerationConfig, generate, generate_stream
from minisail.text.prompt import (
    IMAGE_PLACEHOLDER,
    IMG_CONTEXT,
    IMG_END,
    IMG_START,
    Query,
    append_history,
    build_batch_queries,
    build_query,
    build_yivl_query,
    chat_eos_token_id,
    decode_reply,
    encode_queries,
    encode_yivl_query,
)
from minisail.text.templates import SINGLE, Template, get_template, template_for_config

THINK_INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
    "The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST BE put in \\boxed{}."
)
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def is_yivl(model) -> bool:
    from minisail.models.yivl import YiVLModel

    return isinstance(model, YiVLModel)


def chat_template(model) -> Template:
    """The conversation template upstream chat() uses for this model (name and system message from its config)."""
    from minisail.vision.sail_vit import SailViTConfig

    c = model.config
    config = {"template": getattr(c, "template", None)}
    if is_yivl(model):
        return template_for_config(config)
    config["vision_config"] = {"hidden_size": c.vision.hidden_size}
    config["llm_config"] = {"architectures": [c.llm.architecture]}
    if c.system_message is not None and not isinstance(c.vision, SailViTConfig):  # SAIL-VL2 ignores the key
        config["system_message"] = c.system_message
    return template_for_config(config)


# --- from a question to generate()'s inputs ------------------------------------------------------------------


@dataclass
class ChatPrompt:
    """Everything a chat() or batch_chat() call hands to generation."""

    queries: list[Query]
    input_ids: torch.Tensor  # [B, T] left-padded
    attention_mask: torch.Tensor  # [B, T]
    pixel_values: torch.Tensor | None  # in the model's dtype and device
    template: Template
    eos_token_id: int

    def generation_config(self, options, also_stop_on=()) -> GenerationConfig:
        """`options` with chat()'s eos (first: finished rows emit it), plus `also_stop_on` ids."""
        stops = list(dict.fromkeys([self.eos_token_id, *(i for i in also_stop_on if i is not None)]))
        config = GenerationConfig.from_dict(options).with_options(eos_token_id=stops)
        if self.template.sep_style == SINGLE and not config.stop_strings:
            config = config.with_options(stop_strings=[self.template.stop_str])  # Yi-VL stops on "###"
        return config

    @property
    def cut_strings(self) -> list[str]:
        """Where a streamed reply ends: the text postprocess_reply cuts at."""
        return [self.template.sep if self.template.sep_style == SINGLE else self.template.sep.strip()]

    def generate(self, model, tokenizer, config: GenerationConfig) -> torch.Tensor:
        """New ids [B, n] as the upstream generate() on embeddings makes them (penalty over new tokens only)."""
        return generate(model, self.input_ids, self.attention_mask, self.pixel_values, config,
                        penalize_prompt=False, tokenizer=tokenizer)  # fmt: skip


def _tile_counts(pixel_values, num_patches_list, questions: int) -> list[int]:
    """num_patches_list, checked against pixel_values; chat() defaults it to one image of all the tiles."""
    if num_patches_list is None:
        if pixel_values is None:
            return []
        if questions != 1:
            raise PromptError("batch_chat with images needs num_patches_list: the tile count of each question's image")
        num_patches_list = [pixel_values.shape[0]]
    tiles = [int(n) for n in num_patches_list]
    if pixel_values is None and sum(tiles):
        raise PromptError(f"num_patches_list {tiles} counts image tiles but pixel_values is None")
    if pixel_values is not None and pixel_values.shape[0] != sum(tiles):
        raise PromptError(
            f"pixel_values holds {pixel_values.shape[0]} tiles but num_patches_list {tiles} adds up to {sum(tiles)}"
        )
    return tiles


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    input_ids = torch.tensor([[pad_id] * (width - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return input_ids, attention_mask


def prepare_chat(model, tokenizer, pixel_values, questions, *, history=None, num_patches_list=None, template=None,
                 batch=False) -> ChatPrompt:  # fmt: skip
    """chat()'s prompt for one question (`batch=False`), or batch_chat()'s for a list of single-turn questions."""
    template = template or chat_template(model)
    questions = list(questions) if batch else [questions]
    if is_yivl(model):
        images = 0 if pixel_values is None else pixel_values.shape[0]
        if images not in (0, len(questions)):
            raise PromptError(f"Yi-VL takes one image per conversation (per question in a batch), not {images}")
        queries = [build_yivl_query(q, history=history, image=images > 0, template=template) for q in questions]
        rows = [encode_yivl_query(tokenizer, query.text) for query in queries]
        input_ids, attention_mask = _left_pad(rows, tokenizer.pad_token_id or 0)
    else:
        tiles = _tile_counts(pixel_values, num_patches_list, len(questions))
        context_id = tokenizer.token_to_id(IMG_CONTEXT)
        if context_id is None:
            raise TokenizerError(f"the tokenizer has no {IMG_CONTEXT} token: use the checkpoint's tokenizer files")
        model.image_token_id = context_id  # as upstream chat() sets img_context_token_id from the tokenizer
        per_tile = model.config.tokens_per_tile
        if batch:
            if pixel_values is not None and len(tiles) != len(questions):
                raise PromptError(f"num_patches_list has {len(tiles)} entries for {len(questions)} questions")
            tiles = tiles if pixel_values is not None else None
            queries = build_batch_queries(template, questions, num_patches_list=tiles, tokens_per_tile=per_tile)
        else:
            queries = [build_query(template, questions[0], history=history, num_patches_list=tiles,
                                   tokens_per_tile=per_tile)]  # fmt: skip
        encoded = encode_queries(tokenizer, [query.text for query in queries])
        input_ids, attention_mask = encoded.input_ids, encoded.attention_mask
    weight = next(model.parameters())
    if pixel_values is not None:
        pixel_values = pixel_values.to(device=weight.device, dtype=weight.dtype)
    eos = chat_eos_token_id(tokenizer, template)
    return ChatPrompt(queries, input_ids.to(weight.device), attention_mask.to(weight.device), pixel_values, template,
                      eos)  # fmt: skip


def _check_image_tokens(start: str, end: str, context: str) -> None:
    if (start, end, context) != (IMG_START, IMG_END, IMG_CONTEXT):
        raise PromptError(f"minisail builds prompts with the standard {IMG_START} {IMG_END} {IMG_CONTEXT} tokens only")


def _write_eos(generation_config, eos: int) -> None:
    """Upstream chat() writes eos_token_id into the caller's dict; callers rely on seeing it there."""
    if isinstance(generation_config, dict):
        generation_config["eos_token_id"] = eos
    elif isinstance(generation_config, GenerationConfig):
        generation_config.eos_token_id = eos


# --- the upstream API -------------------------------------------------------------------------------------------


def chat(model, tokenizer, pixel_values, question, generation_config, history=None, return_history=False,
         num_patches_list=None, IMG_START_TOKEN=IMG_START, IMG_END_TOKEN=IMG_END, IMG_CONTEXT_TOKEN=IMG_CONTEXT,
         verbose=False):  # fmt: skip
    """Upstream `model.chat(...)`: the reply (and the history if return_history)."""
    _check_image_tokens(IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)
    prompt = prepare_chat(model, tokenizer, pixel_values, question, history=history, num_patches_list=num_patches_list)
    _write_eos(generation_config, prompt.eos_token_id)
    if verbose and pixel_values is not None:
        print(f"dynamic ViT batch size: {pixel_values.shape[0]}")
    ids = prompt.generate(model, tokenizer, prompt.generation_config(generation_config))
    response = decode_reply(tokenizer, ids[0].tolist(), prompt.template)
    history = append_history(history, prompt.queries[0].question, response)
    if return_history:
        return response, history
    if verbose:
        shown = prompt.queries[0].text.replace(IMG_CONTEXT, "").replace(IMG_START + IMG_END, IMAGE_PLACEHOLDER)
        print(shown, response)
    return response


def batch_chat(model, tokenizer, pixel_values, questions, generation_config, num_patches_list=None, history=None,
               return_history=False, IMG_START_TOKEN=IMG_START, IMG_END_TOKEN=IMG_END, IMG_CONTEXT_TOKEN=IMG_CONTEXT,
               verbose=False, image_counts=None):  # fmt: skip
    """Upstream `model.batch_chat(...)`: one reply per question (question i gets num_patches_list[i] tiles)."""
    if history is not None or return_history:
        raise PromptError("batch_chat does not support history (upstream neither): use chat() for multi-turn")
    _check_image_tokens(IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)
    num_patches_list = image_counts if image_counts is not None else num_patches_list  # the deprecated name
    prompt = prepare_chat(model, tokenizer, pixel_values, questions, num_patches_list=num_patches_list, batch=True)
    if verbose and pixel_values is not None:
        print(f"dynamic ViT batch size: {pixel_values.shape[0]}")
    _write_eos(generation_config, prompt.eos_token_id)
    ids = prompt.generate(model, tokenizer, prompt.generation_config(generation_config))
    return [decode_reply(tokenizer, row.tolist(), prompt.template) for row in ids]


def bind_chat(model):
    """Give `model` upstream's methods: `model.chat(tokenizer, pixel_values, question, generation_config, ...)`."""
    model.chat = types.MethodType(chat, model)
    model.batch_chat = types.MethodType(batch_chat, model)
    return model


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


def boxed_content(text: str) -> str | None:
    """The content of the last complete `\\boxed{...}`, nested braces included; None if there is none."""
    opening = "\\boxed{"
    start = text.rfind(opening)
    while start >= 0:
        depth = 1
        for end in range(start + len(opening), len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                return text[start + len(opening) : end]
        start = text.rfind(opening, 0, start)  # unclosed (cut off): try the one before
    return None


def split_thinking(text: str) -> ThoughtReply:
    parts = _reply_parts(text, think=True)
    boxed = boxed_content(parts["answer"])
    return ThoughtReply(text, parts["reasoning"], parts["answer"], parts["answer"] if boxed is None else boxed)


class ReplyStream:
    """Decoded text pieces in; (kind, text) events out, kind "reasoning" or "answer", that join to the reply.

    What is emitted is always a prefix of the final reply: leading and trailing whitespace are held back (the
    reply is stripped), and so is the end of the text while it could still become a cut string (`<|im_end|>`,
    `###`) or a think tag.
    """

    def __init__(self, cut_at: Sequence[str] = (), *, think: bool = False):
        self.cut_at = [s for s in cut_at if s]
        self.think = think
        self.text = ""
        self.sent = {"reasoning": "", "answer": ""}

    def feed(self, piece: str) -> list[tuple[str, str]]:
        self.text += piece
        return self._events(final=False)

    def finish(self) -> list[tuple[str, str]]:
        return self._events(final=True)

    def _events(self, final: bool) -> list[tuple[str, str]]:
        text = self.text
        for cut in self.cut_at:
            text = text.split(cut)[0]
        if not final:
            watch = self.cut_at + ([THINK_OPEN, THINK_CLOSE] if self.think else [])
            held = max((n for s in watch for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
            text = text[: len(text) - held]
        events = []
        for kind, full in _reply_parts(text, self.think).items():
            sent = self.sent[kind]
            if len(full) > len(sent) and full.startswith(sent):
                events.append((kind, full[len(sent) :]))
                self.sent[kind] = full
        return events


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
    path = Path(folder) / "preprocessor_config.json" if folder else None
    if path is not None and path.is_file():
        try:
            processor = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise MinisailError(f"cannot read {path}: {error}") from None
        low, high = processor.get("min_dynamic_patch", low), processor.get("max_dynamic_patch", high)
    return (low if min_tiles is None else min_tiles), (high if max_tiles is None else max_tiles)


class Session:
    """A multi-turn conversation with one model: `Session("weights/SAIL-VL2-2B").ask("Hi", images=["a.jpg"])`.

    `model`: a checkpoint folder (loaded with `dtype` / `device`), or a loaded model with its `tokenizer`
    (or a (model, tokenizer) pair). Tiles per image: `min_tiles` / `max_tiles`, else the checkpoint's.
    `system` replaces the template's system message; `generation` holds the default sampling settings.
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
        system=None,
        template=None,
        generation: GenerationConfig | None = None,
        log=None,
    ):
        log = log or (lambda message: None)
        if isinstance(model, tuple):
            model, tokenizer = model
        if isinstance(model, (str, os.PathLike)):
            from minisail.loading import load
            from minisail.text.tokenizer import load_tokenizer

            folder = Path(model)
            if tokenizer is None:  # first: a missing tokenizer file fails before the long part
                log(f"loading the tokenizer from {folder}")
                tokenizer = load_tokenizer(folder)
            log(f"loading the checkpoint {folder}")
            start = time.perf_counter()
            model = load(folder, dtype=dtype, device=device)
            count = sum(p.numel() for p in model.parameters())
            weight = next(model.parameters())
            seconds = time.perf_counter() - start
            dtype_name = str(weight.dtype).removeprefix("torch.")
            log(
                f"loaded {getattr(model, 'family', 'the model')}: {count / 1e6:.1f}M parameters, {dtype_name} on "
                f"{weight.device}, in {seconds:.1f}s"
            )
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
        if stream:
            return self._stream(prompt, config, new, think)
        ids = prompt.generate(self.model, self.tokenizer, config)
        reply = decode_reply(self.tokenizer, ids[0].tolist(), prompt.template)
        self._remember(prompt, new, reply)
        return split_thinking(reply) if think else reply

    def _stream(self, prompt: ChatPrompt, config: GenerationConfig, new_images, think: bool):
        ids: list[int] = []
        pieces = generate_stream(
            self.model,
            self.tokenizer,
            prompt.input_ids,
            prompt.attention_mask,
            prompt.pixel_values,
            config,
            on_token=ids.append,
            penalize_prompt=False,
        )
        reply_stream = ReplyStream(prompt.cut_strings, think=think)
        for piece in pieces:
            for kind, text in reply_stream.feed(piece):
                yield (kind, text) if think else text
        for kind, text in reply_stream.finish():
            yield (kind, text) if think else text
        self._remember(prompt, new_images, decode_reply(self.tokenizer, ids, prompt.template))

    def _remember(self, prompt: ChatPrompt, new_images, reply: str) -> None:
        self._images += new_images
        append_history(self.history, prompt.queries[0].question, reply)
