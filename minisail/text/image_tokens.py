"""Images in the prompt text: the `<image>` placeholder and the `<img><IMG_CONTEXT>...</img>` block it becomes.

Mirrors the image expansion of InternVL's `InternVLChatModel.chat()` / `batch_chat()` (`modeling_internvl_chat.py`
@ 2410d1d; the same in SAIL-VL2-2B's `modeling_sailvl.py` and its `processing_sailvl.py`): each image's `<image>`
(first occurrence, in order) becomes `<img>` + `<IMG_CONTEXT>` x tokens_per_tile x tiles + `</img>`. In the
prefix style of the Mono-InternVL training repository's `chat()` / `multi_image_chat()` (@ 5b17ab4) the blocks go
in front of the first question instead (`image_prefix`). The model writes the image's rows where the ids are
`<IMG_CONTEXT>`, so `check_image_context_ids` makes sure the tokenizer turned each one into one id.

The strings are defined here, once: the prompt builders (`minisail.text.prompt`), chat(), the loader (which asks
the tokenizer for `<IMG_CONTEXT>`'s id) and the CLI import them from here. Yi-VL's `<image_placeholder>` and its
-200 id belong to Yi-VL's prompt and are defined with it, in `minisail.text.prompt`.

Tile counts are checked before any text is built (`check_tiles`): whole numbers >= 1, and at most
MAX_IMAGE_TOKENS image tokens in one prompt, so a mistaken request cannot build a gigabyte string.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from minisail.errors import PromptError, TokenizerError

IMAGE_PLACEHOLDER = "<image>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
# The most image tokens one prompt may hold: 4096 tiles of 256 tokens, far more than the context of any model
# here (tens of thousands of tokens), small enough that the prompt text (13 characters per <IMG_CONTEXT>)
# stays ~14 MB. Beyond it a request is a mistake: --tokens-per-tile 10**8 would build a 1.3 GB string.
MAX_IMAGE_TOKENS = 1 << 20


def image_block(tiles: int, tokens_per_tile: int = 256) -> str:
    """The text one image becomes: `<img>`, one `<IMG_CONTEXT>` per visual token, `</img>`."""
    return IMG_START + IMG_CONTEXT * (tokens_per_tile * tiles) + IMG_END


def compact_image_runs(text: str) -> str:
    """Runs of `<IMG_CONTEXT>` written as `<IMG_CONTEXT>*N`, for humans (the goldens' `query_compact`)."""
    return re.sub(f"(?:{re.escape(IMG_CONTEXT)})+", lambda m: f"{IMG_CONTEXT}*{len(m[0]) // len(IMG_CONTEXT)}", text)


def _is_count(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1


def check_tiles(num_patches_list: Sequence[int] | None, tokens_per_tile: int = 256) -> tuple[int, ...]:
    """The tile counts as a tuple, once each is a whole number >= 1 and the image tokens fit in a prompt."""
    tiles = tuple(num_patches_list or ())
    if not all(map(_is_count, tiles)):
        shown = list(tiles) if len(tiles) <= 20 else f"{list(tiles[:20])} ... ({len(tiles)} images)"
        raise PromptError(f"tile counts must be whole numbers >= 1, one per image; got {shown}")
    if not _is_count(tokens_per_tile):
        raise PromptError(f"tokens_per_tile must be a whole number >= 1, not {tokens_per_tile!r}")
    total = tokens_per_tile * sum(tiles)
    if total > MAX_IMAGE_TOKENS:  # checked before any text is built
        raise PromptError(
            f"{len(tiles)} image(s) of {sum(tiles)} tiles x {tokens_per_tile} tokens per tile make {total} image "
            f"tokens, more than the {MAX_IMAGE_TOKENS} a prompt may hold (far beyond any model's context): use fewer "
            "images or tiles (max_tiles), or fewer tokens per tile"
        )
    return tiles


def expand_images(text: str, num_patches_list: Sequence[int], tokens_per_tile: int = 256, *, hint: str = "") -> str:
    """Replace the first `<image>` once per image, in order, by its block (upstream `replace(.., 1)`)."""
    tiles = check_tiles(num_patches_list, tokens_per_tile)
    found = text.count(IMAGE_PLACEHOLDER)
    if found < len(tiles):
        if not hint and len(tiles) > 1:
            hint = (
                "With several images write one '<image>' per image, e.g. 'Image-1: <image>\\nImage-2: <image>\\n...'."
            )
        raise PromptError(
            f"{len(tiles)} image(s) given but the prompt has only {found} '<image>' placeholder(s), "
            f"so an image would have nowhere to go. {hint}".strip()
        )
    for n in tiles:
        text = text.replace(IMAGE_PLACEHOLDER, image_block(n, tokens_per_tile), 1)
    return text


def image_prefix(tiles: Sequence[int], tokens_per_tile: int = 256) -> str:
    """Prefix style (Mono-InternVL's chat() / `multi_image_chat()`): the blocks put in front of the first question,
    each labelled `<image i> (图i):` when there are several."""
    if len(tiles) == 1:
        return image_block(tiles[0], tokens_per_tile)
    return "".join(f"<image {i}> (图{i}):" + image_block(n, tokens_per_tile) for i, n in enumerate(tiles, 1))


def check_image_context_ids(tokenizer, text: str, ids: Sequence[int]) -> None:
    """Every `<IMG_CONTEXT>` of `text` became one id in `ids`: else the image rows could not be placed."""
    wanted = text.count(IMG_CONTEXT)
    if not wanted:
        return
    context_id = tokenizer.token_to_id(IMG_CONTEXT)
    if context_id is None or list(ids).count(context_id) != wanted:
        raise TokenizerError(
            f"the tokenizer does not map {IMG_CONTEXT} to a single added token, so the image features "
            "cannot be placed; use the tokenizer files shipped with the checkpoint (they add <img>, </img>, "
            "<IMG_CONTEXT>)"
        )
