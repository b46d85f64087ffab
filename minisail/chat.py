"""Chatting as the official models do: upstream-compatible `chat()` / `batch_chat()`.

`chat(model, tokenizer, pixel_values, question, generation_config, history=None, return_history=False, ...)` and
`batch_chat(...)` reproduce `InternVLChatModel.chat()` / `batch_chat()` of InternVL `modeling_internvl_chat.py`
(@ 2410d1d) and SAIL-VL2's `modeling_sailvl.py`, so code written for the official models runs unchanged
(`minisail.load` binds them as methods: `model.chat(tokenizer, pixel_values, question, generation_config)`):
- the prompt: minisail.text.prompt (the `<image>\\n` rule, image expansion, history, left-padded batches);
- eos: the template's `sep.strip()` id, written into the caller's `generation_config` dict as upstream does;
  generation as transformers does it on `inputs_embeds` (repetition penalty over the new tokens only);
- the reply: decoded without special tokens, cut at the sep, stripped; the history gets (question as used, reply);
- the system message: `config.system_message` when set, except SAIL-VL2, whose code always uses the template's;
- Yi-VL, which has no chat() upstream, follows Yi's `single_inference.py` instead: `<image_placeholder>` spliced
  in as id -200, stop on eos or the text `###`, strip and drop the trailing `###`.

The idiomatic API (multi-turn sessions, images as paths, streaming, thinking replies) is in minisail/session.py.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch

from minisail.errors import PromptError, TokenizerError
from minisail.generate import GenerationConfig, generate
from minisail.text.image_tokens import IMAGE_PLACEHOLDER, IMG_CONTEXT, IMG_END, IMG_START
from minisail.text.prompt import (
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
from minisail.text.templates import SINGLE, Template, template_for_config


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
    # What template_for_config reads to tell InternVL-Chat-V1-5 (InternViT-6B with qk-norm + InternLM2) apart.
    config["vision_config"] = {"qk_normalization": getattr(c.vision, "qk_normalization", False)}
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

    def generate(self, model, tokenizer, config: GenerationConfig, image_embeds=None) -> torch.Tensor:
        """New ids [B, n] as the upstream generate() on embeddings makes them (penalty over new tokens only).
        `image_embeds`: the images already encoded (a session), used instead of encoding pixel_values again."""
        pixel_values = self.pixel_values if image_embeds is None else None
        return generate(model, self.input_ids, self.attention_mask, pixel_values, config, image_embeds=image_embeds,
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
