"""SAIL-VL2 (2B, 8B, -Thinking): SAIL-ViT -> pixel shuffle -> mlp1 -> Qwen3.

Mirrors SAIL-VL2's remote `modeling_sailvl.py` / `configuration_sailvl.py` (SAILVLModel, SAILVLConfig). Apart
from the vision tower that is InternVL's chat model line for line (extract_feature, pixel_shuffle, mlp1, the
<IMG_CONTEXT> scatter, the same config keys and class defaults), so minisail's `SailVL2Model` is an
`InternVLChatModel` with a `SailViT` passed in; this module reads the SAIL-specific config and checks what the
tower cannot do, and is the SAIL-VL2 family module (models/registry.py), its chat path InternVL's.

Qwen3 runs on the shared decoder (per-head q/k RMSNorm before RoPE, an explicit head_dim). Although
`tie_word_embeddings` is true in SAIL-VL2-2B's config, its checkpoint stores `language_model.lm_head.weight`,
and upstream uses that tensor: the weight map prefers a stored head and ties only when none is stored.
"""

from __future__ import annotations

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
from minisail.vision.sail_vit import SailViT, SailViTConfig, select_depth

NAME = "sailvl2"


class SailVL2Model(InternVLChatModel):
    """InternVL's chat model with SAIL-ViT as its vision tower (upstream SAILVLModel)."""

    family = NAME

    def __init__(self, config: InternVLConfig):
        super().__init__(config, vision_model=SailViT(config.vision))


# --- the family: SAIL-ViT + Qwen3; its top-level model_type `sailvl` is SAIL-VL-2B's too --------------------------


def detect(config: dict) -> bool:
    vision, llm = sub_config_kinds(config)
    return vision in ("SAILViTModel", "sailvit") and llm in ("Qwen3ForCausalLM", "qwen3")


def parse(config: dict) -> InternVLConfig:
    vision = SailViTConfig.from_config(require(config, "vision_config", "the top level", dict))
    chat = InternVLConfig.from_config(config, vision)  # chat-level keys and the Qwen3 llm_config, as for InternVL
    if chat.image_size != vision.image_size:
        # Upstream would count tokens for force_image_size while the ViT's position table (no interpolation)
        # only fits vision_config.image_size: smaller tiles silently take the wrong rows, larger ones fail.
        raise ConfigError(
            f"config.json: force_image_size {chat.image_size} differs from vision_config.image_size "
            f"{vision.image_size}; SAIL-ViT's position table has no interpolation, so they must be equal"
        )
    select_depth(chat.select_layer, vision.num_layers, source="config.json: select_layer")  # outside: ConfigError
    return chat


def layer_counts(parsed: InternVLConfig) -> list[LayerCount]:
    return [
        LayerCount("vision_config.num_hidden_layers", parsed.vision.num_layers, "vision_model.trunk.blocks.{i}."),
        decoder_layers("llm_config.num_hidden_layers", parsed.llm),
    ]


complete_config = config_as_read
open_tensors = open_safetensors


def build(parsed: InternVLConfig) -> SailVL2Model:
    return SailVL2Model(parsed)


def weight_map(parsed: InternVLConfig) -> keymaps.KeyMap:
    llm = decoder_weight_map(parsed.llm, root="language_model.", dst="language_model.")
    return keymaps.sail_vit() + keymaps.mlp1_projector() + llm


def check_dtype(dtype: torch.dtype) -> None:
    """Every float dtype runs."""


pixel_values = internvl_chat.pixel_values


def chat_template(parsed: InternVLConfig) -> Template:
    # SAIL-VL2's chat() always uses the template's own system message: config.json's system_message is unused
    return internvl_chat.chat_template(parsed, system_message=False)


encode_prompt = internvl_chat.encode_prompt
add_image_placeholders = internvl_chat.add_image_placeholders
