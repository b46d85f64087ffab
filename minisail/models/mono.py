"""Mono-InternVL-2B: a patch embedding -> pixel shuffle -> mlp1 -> InternLM2 with FFN visual experts.

Mirrors `InternVLChatModel` of Mono-InternVL (github OpenGVLab/Mono-InternVL @ 5b17ab45,
`internvl/model/internvl_chat/modeling_internvl_chat.py`) with `InternVisionPatchModel` as its vision model
and `InternLM2VEForCausalLM` as its language model. It is InternVL's composition with two parts swapped:

    pixel_values [N, 3, S, S]
      -> patch conv + position table, CLS dropped (vision/patch_embed.py)   [N, (S/14)^2, C]   no ViT layers
      -> pixel shuffle v2 -> mlp1                                            [N, 256, H]
      -> written at <IMG_CONTEXT>, as in InternVL
      -> InternLM2 whose layers have a text and a visual FFN (llm/moe.py); a token uses the visual FFN
         exactly when its id is <IMG_CONTEXT>, in the prompt and in every decode step alike

So this class reuses InternVLChatModel's encode_images / prepare_inputs / place_images / forward and only
builds other modules and returns the routing mask from `visual_mask(input_ids)`.

A decoded token is routed by the same rule. Upstream's cached decoding runs the text FFN on every new token
whatever it is; a model that generated <IMG_CONTEXT> (no sensible model does: it is a placeholder for image
rows) would take the visual FFN here and the text FFN there, which is what upstream itself computes when the
same sequence is replayed without a cache.

float16 is refused: the upstream model overflows to NaN in float16 (lmdeploy refuses it too, PR #2727).
Loading with dtype float16, or casting a loaded model to it (`.half()`, `.to(torch.float16)`: refused before any
weight changes), is a ConfigError; use bfloat16 or float32.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from minisail.checkpoint import keymaps
from minisail.config import require
from minisail.errors import ConfigError
from minisail.models import internvl_chat
from minisail.models.family_parts import (
    LayerCount,
    config_as_read,
    decoder_layers,
    decoder_weight_map,
    open_safetensors,
    sub_config_kinds,
)
from minisail.models.internvl import InternVLChatModel, InternVLConfig
from minisail.text.templates import Template
from minisail.vision.patch_embed import InternVisionPatchModel, PatchEmbedConfig

NAME = "mono-internvl"


def refuse_float16(dtype: torch.dtype) -> None:
    if dtype == torch.float16:
        raise ConfigError(
            "Mono-InternVL does not run in float16: the official model overflows to NaN in float16 "
            "(lmdeploy refuses it for the same reason). Load it with dtype=torch.bfloat16 (the checkpoint's "
            "own) or torch.float32 (faster on a CPU without native bf16)"
        )


class MonoInternVLChatModel(InternVLChatModel):
    family = NAME

    def __init__(self, config: InternVLConfig):
        # config.llm.visual_experts makes the decoder's layers hold VisualExpertMLP FFNs (llm/moe.py).
        super().__init__(config, vision_model=InternVisionPatchModel(config.vision))

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """The FFN routing of `input_ids` [B, T]: [B, T] bool, True at <IMG_CONTEXT> (the visual expert).

        Called for the prompt and for every decoded token, so one rule routes them all. Without a known
        <IMG_CONTEXT> id no token can be visual (and no image can be placed: place_images refuses)."""
        refuse_float16(self.language_model.embed.weight.dtype)  # a model whose weights became float16 elsewhere
        if self.image_token_id is None:
            return None
        return input_ids == self.image_token_id

    def check_conversion(self, fn) -> None:
        """`.half()` / `.to(torch.float16)` refused before any weight changes (asked by WholeModelRefusals):
        `fn` is tried on an empty tensor like the weights."""
        weight = self.language_model.embed.weight
        try:
            converted = fn(torch.empty(0, dtype=weight.dtype, device=weight.device))
        except Exception:  # e.g. a device this machine lacks: the conversion itself will say so
            return
        refuse_float16(converted.dtype)


# --- the family: patch embedding (no ViT layers) + InternLM2 with FFN visual experts --------------------------------


def detect(config: dict) -> bool:
    vision, llm = sub_config_kinds(config)
    return vision in ("InternVisionPatchModel", "intern_vit_patch") and llm == "InternLM2VEForCausalLM"


def parse(config: dict) -> InternVLConfig:
    """The InternVL chat-level fields, a patch-embedding vision config and an InternLM2 with visual experts."""
    vision = PatchEmbedConfig.from_config(require(config, "vision_config", "the top level", dict))
    chat = InternVLConfig.from_config(config, vision)
    if chat.select_layer != -1:  # upstream reads the last hidden state only; any other value fails there
        raise ConfigError(
            f"config.json: select_layer {chat.select_layer} is not -1: Mono-InternVL's vision model has no layers, "
            "only the patch embedding (select_layer -1)"
        )
    return replace(chat, llm=replace(chat.llm, visual_experts=True))


def layer_counts(parsed: InternVLConfig) -> list[LayerCount]:
    # the patch model has no layers: its config's num_hidden_layers (InternViT's class default 48) means nothing
    return [decoder_layers("llm_config.num_hidden_layers", parsed.llm)]


complete_config = config_as_read
open_tensors = open_safetensors


def build(parsed: InternVLConfig) -> MonoInternVLChatModel:
    return MonoInternVLChatModel(parsed)


def weight_map(parsed: InternVLConfig) -> keymaps.KeyMap:
    # The visual-expert rules come first: they claim feed_forward{,_ve}.*; the rest is InternLM2 as in V1-5.
    root = "language_model."
    experts = keymaps.internlm2_visual_experts(parsed.llm, src=f"{root}model.", dst=root)
    llm = decoder_weight_map(parsed.llm, root=root, dst=root)
    return keymaps.passthrough("vision_model.") + keymaps.mlp1_projector() + experts + llm


def check_dtype(dtype: torch.dtype) -> None:
    """Called by minisail.load before any tensor is read: refuse float16 up front."""
    refuse_float16(dtype)


pixel_values = internvl_chat.pixel_values


def chat_template(parsed: InternVLConfig) -> Template:
    return internvl_chat.chat_template(parsed)


encode_prompt = internvl_chat.encode_prompt
add_image_placeholders = internvl_chat.add_image_placeholders
