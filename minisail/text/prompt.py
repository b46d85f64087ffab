"""Prompt assembly exactly as the official `chat()` / `batch_chat()` build it, then ids via the Tokenizer.

Mirrors `InternVLChatModel.chat()` / `batch_chat()` of InternVL `modeling_internvl_chat.py` (@ 2410d1d; the
same logic in SAIL-VL2-2B's `modeling_sailvl.py`), the older prefix style of the Mono-InternVL training
repository's `chat()` / `batch_chat()` / `multi_image_chat()` (@ 5b17ab4, the InternVL 1.5-era code), the
SAIL-VL2 README processor path (`processing_sailvl.py`), and Yi's `VL/single_inference.py`, `VL/cli.py` and
`tokenizer_image_token` of `VL/llava/mm_utils.py`.

InternVL rules (`image_style="placeholder"`, the default):
- `<image>\\n` goes in front of the question only if `history is None`, images are given and the question
  has no `<image>`. So `history=[]` disables it.
- The whole conversation is rendered first, then each image's `<image>` (first occurrence, in order, history
  turns included) becomes `<img>` + `<IMG_CONTEXT>` x tokens_per_tile x tiles + `</img>` (the image tokens
  and their expansion: `minisail.text.image_tokens`).
- Where upstream fails later (history=[] with an image; two images but one placeholder: an assert or a
  shape error in `generate`), minisail raises a PromptError that says what to write instead.
- The returned history holds the question as used (with the prepended `<image>\\n`, unexpanded).

Prefix style (`image_style="prefix"`): on the first turn the expanded image block and `\\n` are put in
front of the question (several images get `<image i> (图i):` labels, as `multi_image_chat`); `<image>` in
the question stays text; the history holds the expanded question.

Then: `encode_queries` tokenizes and left-pads a batch (pad id of the tokenizer, mask 0 on pads),
`chat_eos_token_id` is the eos chat() passes (`sep.strip()`, i.e. `<|im_end|>`; its templates' stop lists
are unused), `decode_reply` decodes with special tokens skipped, cuts at `sep.strip()` and strips.
Yi-VL: `build_yivl_query` / `encode_yivl_query` (chunks around `<image_placeholder>`, joined with -200).
SAIL-VL2 README path: `build_sailvl2_processor_query` (chat_template.jinja, then the same expansion).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from minisail.errors import PromptError, TokenizerError
from minisail.text.image_tokens import (
    IMAGE_PLACEHOLDER,
    IMG_CONTEXT,
    check_image_context_ids,
    check_tiles,
    expand_images,
    image_prefix,
)
from minisail.text.templates import SINGLE, Template, get_template, render_sailvl2_chat_template

YIVL_IMAGE_PLACEHOLDER = "<image_placeholder>"
YIVL_IMAGE_TOKEN_INDEX = -200  # LLaVA's IMAGE_TOKEN_INDEX (Yi `llava/model/constants.py`): where Yi-VL's image goes
IMAGE_STYLES = ("placeholder", "prefix")


@dataclass(frozen=True)
class Query:
    """One prompt: the exact text the tokenizer gets, and the question as chat() stores it in history."""

    text: str
    question: str
    num_patches_list: tuple[int, ...]  # tiles per image, in prompt order


@dataclass(frozen=True)
class EncodedBatch:
    input_ids: torch.Tensor  # [B, T] int64, shorter rows left-padded with the tokenizer's pad id
    attention_mask: torch.Tensor  # [B, T] int64, 0 on the pads


def build_query(
    template: Template,
    question: str,
    *,
    history: Sequence[tuple[str, str]] | None = None,
    num_patches_list: Sequence[int] | None = None,
    tokens_per_tile: int = 256,
    image_style: str = "placeholder",
) -> Query:
    """The text `chat(tokenizer, pixel_values, question, history=..., num_patches_list=...)` tokenizes.

    `num_patches_list` holds the tile count of each image (None or [] = no image); `history` holds
    (question, answer) pairs as a previous call returned them.
    """
    if template.sep_style == SINGLE:
        raise PromptError(
            f"template {template.name!r} is Yi-VL's (one image spliced in as a single id) and cannot render this "
            "model's prompt: pick another template (or none: the checkpoint's own); in Python, Yi-VL prompts are "
            "built with build_yivl_query"
        )
    if image_style not in IMAGE_STYLES:
        raise PromptError(f"image_style must be one of {IMAGE_STYLES}, not {image_style!r}")
    tiles = check_tiles(num_patches_list, tokens_per_tile)
    if image_style == "placeholder":
        if history is None and tiles and IMAGE_PLACEHOLDER not in question:
            question = IMAGE_PLACEHOLDER + "\n" + question
        text = template.render(template.conversation(history or (), question))
        hint = ""
        if history is not None and IMAGE_PLACEHOLDER not in text:
            hint = (
                "chat() puts '<image>\\n' in front of the question only on a first turn (history=None); "
                "pass history=None, or write '<image>' in the question where the image goes."
            )
        text = expand_images(text, tiles, tokens_per_tile, hint=hint)
    else:
        if history is None and tiles:
            question = image_prefix(tiles, tokens_per_tile) + "\n" + question
        text = template.render(template.conversation(history or (), question))
    expected = tokens_per_tile * sum(tiles)
    if text.count(IMG_CONTEXT) != expected:  # e.g. a pre-expanded history that does not match the images
        where = (
            "with image_style='prefix' images go in on the first turn only (history=None), later turns carry "
            "them in their history"
            if image_style == "prefix"
            else f"history and question must hold '<image>' placeholders, not expanded {IMG_CONTEXT} runs"
        )
        raise PromptError(
            f"the prompt holds {text.count(IMG_CONTEXT)} {IMG_CONTEXT} tokens but the images need "
            f"{expected} ({list(tiles)} tiles x {tokens_per_tile}); {where}"
        )
    return Query(text=text, question=question, num_patches_list=tiles)


def build_batch_queries(
    template: Template,
    questions: Sequence[str],
    *,
    num_patches_list: Sequence[int] | None = None,
    tokens_per_tile: int = 256,
    image_style: str = "placeholder",
) -> list[Query]:
    """`batch_chat()`: a single-turn prompt per question, question i with `num_patches_list[i]` tiles."""
    if num_patches_list is not None and len(num_patches_list) != len(questions):
        raise PromptError(
            f"num_patches_list has {len(num_patches_list)} entries for {len(questions)} questions; "
            "give one tile count per question (or None for a text-only batch)"
        )
    return [
        build_query(
            template,
            question,
            num_patches_list=None if num_patches_list is None else [num_patches_list[i]],
            tokens_per_tile=tokens_per_tile,
            image_style=image_style,
        )
        for i, question in enumerate(questions)
    ]


def build_sailvl2_processor_query(
    messages: Sequence[dict], num_patches_list: Sequence[int] | None, tokens_per_tile: int = 256
) -> str:
    """SAIL-VL2 README path: `chat_template.jinja`, then the processor's image expansion."""
    text = render_sailvl2_chat_template(messages)
    tiles = check_tiles(num_patches_list, tokens_per_tile)
    if text.count(IMAGE_PLACEHOLDER) != len(tiles):
        raise PromptError(
            f"the messages hold {text.count(IMAGE_PLACEHOLDER)} image item(s) but {len(tiles)} image(s) were given"
        )
    return expand_images(text, tiles, tokens_per_tile)


def encode_queries(tokenizer, texts: str | Sequence[str]) -> EncodedBatch:
    """Tokenize like `tokenizer(texts, padding=True)` with `padding_side='left'`; BOS as it adds it."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise PromptError("no prompts to encode")
    rows = [tokenizer.encode(text) for text in texts]
    for text, ids in zip(texts, rows, strict=True):
        check_image_context_ids(tokenizer, text, ids)
    width = max(len(ids) for ids in rows)
    pad_id = tokenizer.pad_token_id
    if pad_id is None and any(len(ids) < width for ids in rows):
        raise TokenizerError("the tokenizer has no pad token, so prompts of different lengths cannot be batched")
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in rows], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rows], dtype=torch.long)
    return EncodedBatch(input_ids=input_ids, attention_mask=attention_mask)


def chat_eos_token_id(tokenizer, template: Template) -> int:
    """The eos `chat()` passes to generate: the id of `sep.strip()` (`<|im_end|>`); Yi-VL: tokenizer eos."""
    if template.sep_style == SINGLE:
        token, token_id = "eos", tokenizer.eos_token_id
    else:
        token = template.sep.strip()
        token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise TokenizerError(f"the tokenizer has no {token!r} token, which template {template.name!r} stops on")
    return token_id


def postprocess_reply(text: str, template: Template) -> str:
    """chat()'s reply clean-up of the decoded text (decode with skip_special_tokens=True first).

    chatml: cut at `sep.strip()`, strip (the cut is a no-op once special tokens are skipped). Yi-VL: strip,
    drop a trailing `###`, strip.
    """
    if template.sep_style == SINGLE:
        text = text.strip()
        text = text[: -len(template.sep)] if text.endswith(template.sep) else text
        return text.strip()
    return text.split(template.sep.strip())[0].strip()


def decode_reply(tokenizer, generated_ids: Sequence[int], template: Template) -> str:
    return postprocess_reply(tokenizer.decode(list(generated_ids), skip_special_tokens=True), template)


def append_history(history: list | None, question: str, response: str) -> list:
    """chat()'s returned history: a new list on a first turn, else the caller's list extended in place."""
    history = [] if history is None else history
    history.append((question, response))
    return history


def build_yivl_query(
    question: str,
    *,
    history: Sequence[tuple[str, str]] | None = None,
    image: bool = False,
    template: Template | None = None,
) -> Query:
    """Yi-VL (`mm_default`): the image goes in as `<image_placeholder>\\n` on the first user turn only."""
    template = template or get_template("mm_default")
    history = list(history or ())
    if image and not any(YIVL_IMAGE_PLACEHOLDER in q for q, _ in history) and YIVL_IMAGE_PLACEHOLDER not in question:
        question = YIVL_IMAGE_PLACEHOLDER + "\n" + question
    text = template.render(template.conversation(history, question))
    if text.count(YIVL_IMAGE_PLACEHOLDER) != int(image):
        raise PromptError(
            f"Yi-VL takes exactly one image per conversation through one {YIVL_IMAGE_PLACEHOLDER}; "
            f"the prompt has {text.count(YIVL_IMAGE_PLACEHOLDER)} for {int(image)} image(s)"
        )
    return Query(text=text, question=question, num_patches_list=(1,) if image else ())


def encode_yivl_query(tokenizer, text: str) -> list[int]:
    """`tokenizer_image_token`: chunks around the placeholder tokenized separately, joined with -200.

    Only the first chunk keeps the BOS the tokenizer adds (if it adds one).
    """
    chunks = [tokenizer.encode(chunk) for chunk in text.split(YIVL_IMAGE_PLACEHOLDER)]
    bos = tokenizer.bos_token_id
    has_bos = bos is not None and chunks[0][:1] == [bos]
    ids = [bos] if has_bos else []
    for index, chunk in enumerate(chunks):
        if index:
            ids.append(YIVL_IMAGE_TOKEN_INDEX)
        ids += chunk[1:] if has_bos and chunk[:1] == [bos] else chunk
    return ids
