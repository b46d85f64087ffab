"""A conversation with a model: the small idiomatic API behind `python -m minisail chat`.

`Session(folder_or_model, tokenizer=None, max_tiles=..., dtype=..., device=...)`:
`.ask(question, images=[...], stream=False, think=False, **sampling)` keeps a multi-turn history, tiles the
images the family's way and streams the reply; the streamed pieces join to the reply it keeps in the history
(chat()'s post-processing, minisail/chat.py). Unlike chat() it also stops on the tokenizer's eos, not only on
the template's sep.

Thinking models (SAIL-VL2-Thinking) are asked with THINK_INSTRUCTION appended to the question (model card);
the reply is parsed by minisail/text/replies.py (`split_thinking`, `ReplyStream`), whose names are re-exported
here: `from minisail.session import split_thinking` keeps working.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import PIL.Image
import torch

from minisail.chat import ChatPrompt, chat_template, prepare_chat
from minisail.checkpoint.paths import read_json_object
from minisail.errors import ConfigError, MinisailError
from minisail.generate import GenerationConfig, generate_stream
from minisail.models.registry import family_of
from minisail.text.prompt import append_history, decode_reply
from minisail.text.replies import (  # the reply parsing, re-exported: the CLI and older code import it from here
    THINK_CLOSE,
    THINK_INSTRUCTION,
    THINK_OPEN,
    ReplyStream,
    ThoughtReply,
    boxed_content,
    split_thinking,
)
from minisail.text.templates import get_template
from minisail.tiling import MAX_TILES_LIMIT

__all__ = [  # with the reply-parsing names of text/replies.py that this module re-exports
    "THINK_CLOSE",
    "THINK_INSTRUCTION",
    "THINK_OPEN",
    "ReplyStream",
    "Session",
    "ThoughtReply",
    "boxed_content",
    "sampling_config",
    "split_thinking",
    "tile_limits",
]


def sampling_config(base: GenerationConfig | None = None, **options) -> GenerationConfig:
    """`base` with the options that are not None; temperature/top_p/top_k turn sampling on, temperature 0 off."""
    options = {key: value for key, value in options.items() if value is not None}
    if "do_sample" not in options and options.keys() & {"temperature", "top_p", "top_k"}:
        options["do_sample"] = True
    if options.get("temperature") == 0:
        options.pop("temperature")
        options["do_sample"] = False
    return (base or GenerationConfig()).with_options(**options)


def tile_count(processor: dict, key: str, folder, default: int) -> int:
    """A tile bound from preprocessor_config.json (null or absent: `default`), refused naming the file and key."""
    value = processor.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TILES_LIMIT:
        raise ConfigError(
            f"{Path(folder) / 'preprocessor_config.json'}: {key} = {value!r} is not a whole number between 1 and "
            f"{MAX_TILES_LIMIT}"
        )
    return value


def tile_limits(model, min_tiles=None, max_tiles=None) -> tuple[int, int]:
    """(min, max) tiles: the override, else preprocessor_config.json (SAIL-VL2 says 10 there), else config.json."""
    low, high = model.config.min_dynamic_patch, model.config.max_dynamic_patch
    folder = model.checkpoint_folder  # None for a model built rather than loaded
    if folder is not None:
        processor = read_json_object(folder, "preprocessor_config.json", "preprocessor config") or {}
        low = tile_count(processor, "min_dynamic_patch", folder, low)
        high = tile_count(processor, "max_dynamic_patch", folder, high)
    return (low if min_tiles is None else min_tiles), (high if max_tiles is None else max_tiles)


class Session:
    """A multi-turn conversation with one model: `Session("weights/SAIL-VL2-2B").ask("Hi", images=["a.jpg"])`.

    `model`: a checkpoint folder (loaded with `dtype` / `device`), or a loaded model with its `tokenizer`
    (or a (model, tokenizer) pair). Tiles per image: `min_tiles` / `max_tiles`, else the checkpoint's.
    `system` replaces the template's system message; `generation` holds the default sampling settings.
    A checkpoint loaded here without a `dtype` runs in `loading.default_dtype`'s choice for the device (on a CPU
    without native bf16: float32 when it fits in memory), said in the log. Loaded on a CPU, it gets the CPU fast
    paths this machine proves it can run (`pack=False`: none): the same numbers, decoded faster
    (minisail/fast/cpu.py); the log says which and why. A model passed in is used as it is. `tp`: tensor parallel
    over torch.distributed's ranks (`minisail.load`'s; every rank must ask the same questions).
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
        tp=None,
        pack: bool = True,
        system=None,
        template=None,
        generation: GenerationConfig | None = None,
        log=None,
    ):
        log = self.log = log or (lambda message: None)
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
            if dtype is None and quantize == "int4":
                dtype = torch.bfloat16  # int4's CPU kernel takes bf16 activations (and computes in fp32)
                log("dtype: bfloat16 activations, as int4's kernel takes them")
            elif dtype is None:
                dtype, why = default_dtype(folder, device)
                log(f"dtype: {why}")
            log(f"loading the checkpoint {folder}")
            start = time.perf_counter()
            model = load(folder, dtype=dtype, device=device, quantize=quantize, tp=tp)
            count = model.checkpoint_parameters  # not the modules' own: int4 packs two weights a byte, etc.
            weight = next(model.parameters())
            seconds = time.perf_counter() - start
            dtype_name = str(weight.dtype).removeprefix("torch.")
            log(
                f"loaded {model.family}: {count / 1e6:.1f}M parameters, {dtype_name} on "
                f"{weight.device}, in {seconds:.1f}s"
            )
            if pack and weight.device.type == "cpu":
                from minisail.fast.cpu import speed_up_on_cpu

                start = time.perf_counter()
                done = speed_up_on_cpu(model)  # each path chosen by what this CPU proves (fast/cpu.py)
                seconds, why = time.perf_counter() - start, "; ".join(done.reasons)
                log(f"CPU fast paths in {seconds:.1f}s: {done.summary()} ({why})")
        elif tokenizer is None:
            raise MinisailError("Session(model, tokenizer): give the tokenizer with a model, or a checkpoint folder")
        elif dtype is not None or device is not None:
            from minisail.loading import resolve_dtype

            model = model.to(device=device, dtype=resolve_dtype(dtype))
        self.model, self.tokenizer, self.family = model, tokenizer, family_of(model)
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
        return self.family.pixel_values(image, self.model.config, self.min_tiles, self.max_tiles)

    def ask(self, question: str, images=(), *, stream: bool = False, think: bool = False, **sampling):
        """The reply: a str, or a ThoughtReply if think. With stream=True an iterator of text pieces instead, or
        of (kind, text) events if think (kind "reasoning" or "answer"). `sampling`: GenerationConfig options."""
        if isinstance(images, (str, os.PathLike, PIL.Image.Image)):
            images = [images]
        config = sampling_config(self.generation, **sampling)
        new = [self.pixel_values(image) for image in images]
        question = self.family.add_image_placeholders(question, len(self._images), len(new))
        question += THINK_INSTRUCTION if think else ""
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
        ids = prompt.generate(self.model, self.tokenizer, config, image_embeds=image_embeds, on_context_end=self._cut)
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
            on_context_end=self._cut,
        )
        reply_stream = prompt.reply_stream(think=think)
        for piece in pieces:
            for kind, text in reply_stream.feed(piece):
                yield (kind, text) if think else text
        for kind, text in reply_stream.finish():
            yield (kind, text) if think else text
        self._remember(prompt, new_images, new_embeds, decode_reply(self.tokenizer, ids, prompt.template))

    def _cut(self, context: int) -> None:
        self.log(
            f"the reply was cut at the end of the model's context ({context} tokens): /reset or ask with less "
            "history, fewer images or tiles"
        )

    def _remember(self, prompt: ChatPrompt, new_images, new_embeds, reply: str) -> None:
        self._images += new_images
        self._embeds += new_embeds
        append_history(self.history, prompt.queries[0].question, reply)
