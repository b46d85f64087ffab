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

from minisail.config import (
    MAX_CHANNELS,
    choice,
    epsilon,
    flag,
    image_and_patch,
    positive,
    require,
    width_and_heads,
)
from minisail.errors import ConfigError
from minisail.models.internvl import InternVLChatModel, InternVLConfig, internvl_config
from minisail.vision.sail_vit import SailViT, SailViTConfig, select_depth


def sail_vit_config(vision: dict) -> SailViTConfig:
    """The SAIL-ViT part of config.json (`vision_config`, SAILViTConfig; class defaults where a key may be absent).

    SAILViTConfig has no hidden_act: upstream's SwiGLU calls F.silu. A config that names another activation
    describes another model, so it is refused; attention_dropout / projection_dropout are off at eval."""
    where = "vision_config"
    choice(vision, "hidden_act", where, ("silu",), "silu", why=": SAIL-ViT's SwiGLU is SiLU, fixed in upstream's code")
    hidden, heads = width_and_heads(vision, where)
    image_size, patch_size = image_and_patch(vision, where)
    if image_size % patch_size:
        raise ConfigError(
            f"config.json: vision_config.image_size {image_size} is not a multiple of patch_size {patch_size}"
        )
    return SailViTConfig(
        hidden_size=hidden,
        num_heads=heads,
        num_layers=positive(vision, "num_hidden_layers", where),
        intermediate_size=positive(vision, "intermediate_size", where),
        image_size=image_size,
        patch_size=patch_size,
        num_channels=positive(vision, "num_channels", where, 3, limit=MAX_CHANNELS),
        norm_eps=epsilon(vision, "rms_norm_eps", where, 1e-5),
        qkv_bias=flag(vision, "qkv_bias", where, False),
        use_bias=flag(vision, "use_bias", where, False),
    )


def sailvl2_config(config: dict) -> InternVLConfig:
    vision = sail_vit_config(require(config, "vision_config", "the top level", dict))
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
