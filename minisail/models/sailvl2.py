"""SAIL-VL2 (2B, 8B, -Thinking): SAIL-ViT -> pixel shuffle -> mlp1 -> Qwen3.

Mirrors SAIL-VL2's remote `modeling_sailvl.py` / `configuration_sailvl.py` (SAILVLModel, SAILVLConfig). Apart
from the vision tower that is InternVL's chat model line for line (extract_feature, pixel_shuffle, mlp1, the
<IMG_CONTEXT> scatter, the same config keys and class defaults), so minisail builds an `InternVLChatModel` with a
`SailViT` passed in; this module only reads the SAIL-specific config and checks what the tower cannot do.

Qwen3 runs on the shared decoder (per-head q/k RMSNorm before RoPE, an explicit head_dim). Although
`tie_word_embeddings` is true in SAIL-VL2-2B's config, its checkpoint stores `language_model.lm_head.weight`,
and upstream uses that tensor: the weight map prefers a stored head and ties only when none is stored.
"""

from __future__ import annotations

from minisail.config import require
from minisail.errors import ConfigError
from minisail.models.internvl import InternVLChatModel, InternVLConfig, internvl_config
from minisail.vision.sail_vit import SailViT, SailViTConfig, select_depth


def sailvl2_config(config: dict) -> InternVLConfig:
    vision = SailViTConfig.from_config(require(config, "vision_config", "the top level", dict))
    chat = internvl_config(config, vision)  # chat-level keys and the Qwen3 llm_config, read as for InternVL
    if chat.image_size != vision.image_size:
        # Upstream would count tokens for force_image_size while the ViT's position table (no interpolation)
        # only fits vision_config.image_size: smaller tiles silently take the wrong rows, larger ones fail.
        raise ConfigError(
            f"config.json: force_image_size {chat.image_size} differs from vision_config.image_size "
            f"{vision.image_size}; SAIL-ViT's position table has no interpolation, so they must be equal"
        )
    select_depth(
        chat.select_layer, vision.num_layers, source="config.json: select_layer"
    )  # a select_layer outside the tower is a ConfigError now
    return chat


def build_sailvl2(config: dict) -> InternVLChatModel:
    chat = sailvl2_config(config)
    return InternVLChatModel(chat, vision_model=SailViT(chat.vision))
