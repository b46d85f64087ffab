"""The conversation side of the InternVL-style families (InternVL, SAIL-VL2, Mono-InternVL): tiles, template, prompt.

These three families share upstream's `chat()` / `batch_chat()` (InternVL `modeling_internvl_chat.py` @ 2410d1d,
SAIL-VL2's `modeling_sailvl.py`, Mono-InternVL's `modeling_internvl_chat.py` `chat()`, whose prompts the golden
prompt cases recorded; Mono's older `multi_image_chat`, which puts the image blocks in front with "<image i>"
labels, is not modelled), so their family modules export the functions below (Yi-VL has its own, in
models/yivl.py):

- `pixel_values`: an image as dynamic tiles plus a thumbnail (image/preprocess.py), [tiles, 3, S, S];
- `chat_template`: the conversation template named by the config (what upstream chat() uses);
- `encode_prompt`: chat()'s prompt for one question, or batch_chat()'s for several: `<image>\\n` in front of
  the question, each image's `<image>` expanded to `<img>` + `<IMG_CONTEXT>` x tokens_per_tile x tiles +
  `</img>` (text/prompt.py), tokenized and left-padded;
- `add_image_placeholders`: where a multi-turn Session puts `<image>` for the images of a new turn.
"""

from __future__ import annotations

import torch

from minisail.errors import PromptError, TokenizerError
from minisail.image.preprocess import internvl_pixel_values
from minisail.text.image_tokens import IMAGE_PLACEHOLDER, IMG_CONTEXT
from minisail.text.prompt import Query, build_batch_queries, build_query, encode_queries
from minisail.text.templates import Template, template_for_config


def pixel_values(image, parsed, min_tiles: int, max_tiles: int) -> torch.Tensor:
    """One image as InternVL's load_image tiles it: [tiles (+ thumbnail), 3, S, S]."""
    return internvl_pixel_values(
        image,
        min_tiles=min_tiles,
        max_tiles=max_tiles,
        image_size=parsed.image_size,
        use_thumbnail=parsed.use_thumbnail,
    )


def chat_template(parsed, *, qk_normalization: bool = False, system_message: bool = True) -> Template:
    """The template upstream chat() uses: its name from the config, told apart as `template_for_config` does.

    `qk_normalization`: the tower's switch (InternViT-6B's, which with InternLM2 marks InternVL-Chat-V1-5).
    `system_message`: whether the family's chat() honours config.json's system_message (SAIL-VL2's does not)."""
    config = {
        "template": parsed.template,
        "vision_config": {"qk_normalization": qk_normalization},
        "llm_config": {"architectures": [parsed.llm.architecture]},
    }
    if system_message and parsed.system_message is not None:
        config["system_message"] = parsed.system_message
    return template_for_config(config)


def tile_counts(pixel_values, num_patches_list, questions: int) -> list[int]:
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


def encode_prompt(model, tokenizer, pixel_values, questions: list[str], *, history, num_patches_list,
                  template: Template, batch: bool) -> tuple[list[Query], torch.Tensor, torch.Tensor]:  # fmt: skip
    """(queries, input_ids [B, T], attention_mask [B, T]) for chat() (`batch=False`, one question with
    `history`) or batch_chat() (single-turn questions, question i with num_patches_list[i] tiles)."""
    tiles = tile_counts(pixel_values, num_patches_list, len(questions))
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
    return queries, encoded.input_ids, encoded.attention_mask


def add_image_placeholders(question: str, images_before: int, new_images: int) -> str:
    """Put `<image>` for each new image in front of the question, as chat() does for one on a first turn;
    several get `Image-k: <image>` lines, numbered after the `images_before` of earlier turns."""
    found = question.count(IMAGE_PLACEHOLDER)
    if found == new_images:
        return question
    if found == 0 and new_images == 1:
        return IMAGE_PLACEHOLDER + "\n" + question
    if found == 0:
        first = images_before + 1
        return "".join(f"Image-{first + i}: {IMAGE_PLACEHOLDER}\n" for i in range(new_images)) + question
    raise PromptError(
        f"the question has {found} '{IMAGE_PLACEHOLDER}' placeholder(s) for {new_images} new image(s): "
        "write one per image, or none to have them put in front"
    )
