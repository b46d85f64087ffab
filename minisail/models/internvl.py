"""The InternVL chat model: InternViT -> pixel shuffle -> mlp1 -> a decoder, with image rows at <IMG_CONTEXT>.

Covers SAIL-VL-2B (InternViT-300M + Qwen2.5), InternVL2-style checkpoints (InternViT + Qwen2) and
InternVL-Chat-V1-5 (InternViT-6B + InternLM2). Mirrors `InternVLChatModel` in InternVL's
`modeling_internvl_chat.py` (forward / extract_feature / pixel_shuffle) and SAIL-VL-2B's `modeling_sailvl.py`.
SAIL-VL2 is this model with SAIL-ViT passed in as the vision tower (models/sailvl2.py): its chat-level config,
pixel shuffle, mlp1 and image placement are the same code upstream.

This is also the InternVL family module (the names every family exports: models/registry.py); its chat side,
shared with SAIL-VL2 and Mono-InternVL, is models/internvl_chat.py.

One image, pixels to logits:
    pixel_values [N tiles, 3, S, S]
      -> ViT hidden state at select_layer (InternViT: CLS dropped) [N, (S/14)^2, C]       (1024 tokens at 448 px)
      -> pixel shuffle (2x2 neighbours -> one token, v1 or v2)     [N, (S/28)^2, 4C]      (256 tokens)
      -> mlp1 projector                                            [N, 256, H]
      -> written, tile-major, into the rows of the text embeddings where input_ids == <IMG_CONTEXT>
      -> decoder -> logits [B, T, V]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minisail.chat import ChatMixin
from minisail.checkpoint import keymaps
from minisail.config import MAX_IMAGE_SIZE, choice, flag, optional, positive, real, require
from minisail.errors import ConfigError, PromptError
from minisail.layers import hidden_state_depth
from minisail.llm.decoder import Decoder, positions_from_mask
from minisail.llm.decoder_config import DecoderConfig
from minisail.merge import MLPProjector, pixel_shuffle, tokens_per_tile
from minisail.models import internvl_chat
from minisail.models.family_parts import (
    LayerCount,
    config_as_read,
    decoder_layers,
    decoder_weight_map,
    open_safetensors,
    sub_config_kinds,
)
from minisail.text.templates import Template
from minisail.vision.intern_vit import InternViT, InternViTConfig
from minisail.vision.sail_vit import SailViTConfig
from minisail.whole_model import WholeModelRefusals

NAME = "internvl"


@dataclass(frozen=True)
class InternVLConfig:
    vision: InternViTConfig | SailViTConfig  # the tower's; this module reads hidden_size, patch_size, image_size
    llm: DecoderConfig
    select_layer: int  # which ViT hidden state feeds the projector (-1 = last layer)
    ps_version: str  # pixel-shuffle token order, "v1" (transposed) or "v2"
    downsample_ratio: float  # 0.5: 2x2 tokens merge into one
    image_size: int  # tile side in pixels (force_image_size, else the ViT's image_size)
    template: str | None  # conversation template name
    system_message: str | None  # overrides the template's system message when set
    min_dynamic_patch: int
    max_dynamic_patch: int
    use_thumbnail: bool

    @property
    def tokens_per_tile(self) -> int:
        return tokens_per_tile(self.image_size, self.vision.patch_size, self.downsample_ratio)

    @classmethod
    def from_config(cls, config: dict, vision, where: str = "the top level") -> InternVLConfig:
        """The chat-level keys of config.json, with `vision` the tower's config as the family read it
        (InternViT, SAIL-ViT, Mono's patch model: any dataclass with `image_size`, `patch_size` and
        `hidden_size`). mlp1's GELU and LayerNorm are fixed in upstream's code (no config key), as here."""
        # -4: SAIL-VL-2B's (and Mono's) config class default; InternVL's is -1 since 2.0 (released configs set it)
        select_layer = optional(config, "select_layer", where, int, -4)
        llm = DecoderConfig.from_config(require(config, "llm_config", where, dict))
        ps_version = choice(config, "ps_version", where, ("v1", "v2"), "v1")  # upstream class default
        downsample_ratio = real(config, "downsample_ratio", where, 0.5, above=0.0, at_most=1.0)  # class default
        image_size = vision.image_size
        if optional(config, "force_image_size", where, int, 0):  # 0 or null mean the ViT's own, as upstream's `or`
            image_size = positive(config, "force_image_size", where, limit=MAX_IMAGE_SIZE)
        grid = image_size // vision.patch_size
        if grid == 0:
            raise ConfigError(
                f"config.json: force_image_size {image_size} is smaller than one {vision.patch_size}-pixel patch"
            )
        merge = 1 / downsample_ratio  # pixel shuffle merges merge x merge neighbouring tokens into one
        if not merge.is_integer() or grid % int(merge):
            raise ConfigError(
                f"config.json: downsample_ratio = {downsample_ratio!r} is not supported for a {grid}x{grid} patch "
                f"grid: accepted 1/k for a whole k that divides the grid (0.5 in every release)"
            )
        min_tiles = positive(config, "min_dynamic_patch", where, 1)
        return cls(
            vision=vision,
            llm=llm,
            select_layer=select_layer,
            ps_version=ps_version,
            downsample_ratio=downsample_ratio,
            image_size=image_size,
            template=optional(config, "template", where, str, None),
            system_message=optional(config, "system_message", where, str, None),
            # Not the upstream class defaults (6 tiles, no thumbnail): every release's config and model card's
            # load_image use dynamic tiling with a thumbnail and up to 12 tiles.
            min_dynamic_patch=min_tiles,
            max_dynamic_patch=positive(config, "max_dynamic_patch", where, 12),
            use_thumbnail=flag(config, "use_thumbnail", where, True),
        )


def check_vocabulary(input_ids: torch.Tensor, vocab_size: int) -> None:
    """A PromptError for ids outside [0, vocab_size) (an embedding lookup would fail obscurely, or assert on CUDA)."""
    if input_ids.numel() and not bool(((input_ids >= 0) & (input_ids < vocab_size)).all()):
        bad = input_ids[(input_ids < 0) | (input_ids >= vocab_size)][0].item()
        raise PromptError(f"input_ids holds {bad}, outside the vocabulary [0, {vocab_size}): wrong tokenizer?")


@dataclass
class PreparedInputs:
    """What the decoder consumes for a prompt: embeddings with image rows in place, mask, expert routing."""

    embeds: torch.Tensor  # [B, T, H]
    attention_mask: torch.Tensor  # [B, T]
    visual_mask: torch.Tensor | None = None  # [B, T] bool, Mono-InternVL's FFN routing; None: no experts


class InternVLChatModel(ChatMixin, WholeModelRefusals, nn.Module):
    """`vision_model`: any tower with `forward(pixel_values, select_layer) -> [N, (S/p)^2, C]` (default InternViT)."""

    family = NAME

    def __init__(self, config: InternVLConfig, vision_model: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.vision_model = vision_model if vision_model is not None else InternViT(config.vision)
        merged = int(config.vision.hidden_size / config.downsample_ratio**2)  # 4C channels after the shuffle
        self.projector = MLPProjector(merged, config.llm.hidden_size)
        self.language_model = Decoder(config.llm)
        self.image_token_id: int | None = None  # <IMG_CONTEXT>: set at load from the tokenizer (never hard-coded)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, S, S] -> image embeddings [N, tokens_per_tile, H] (upstream extract_feature)."""
        features = self.vision_model(pixel_values, self.config.select_layer)  # [N, (S/p)^2, C]
        merged = pixel_shuffle(features, version=self.config.ps_version, scale=self.config.downsample_ratio)
        return self.projector(merged)  # [N, T_img, H]

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """The decoder's FFN routing for `input_ids`: None, no visual experts here (Mono-InternVL has them)."""
        return None

    def prepare_inputs(self, input_ids, attention_mask=None, pixel_values=None, image_embeds=None) -> PreparedInputs:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        check_vocabulary(input_ids, self.config.llm.vocab_size)
        embeds = self.language_model.embed(input_ids)  # [B, T, H]
        if pixel_values is not None and image_embeds is None:
            image_embeds = self.encode_images(pixel_values)
        if image_embeds is not None:
            embeds = self.place_images(input_ids, embeds, image_embeds)
        elif self.image_token_id is not None and bool((input_ids == self.image_token_id).any()):
            raise PromptError("the prompt has <IMG_CONTEXT> tokens but no pixel_values were given")
        return PreparedInputs(embeds, attention_mask, self.visual_mask(input_ids))

    def place_images(self, input_ids, embeds, image_embeds):
        """Write image rows, in order, at every <IMG_CONTEXT> of the batch (row 0 first); counts must agree."""
        if self.image_token_id is None:
            raise PromptError("the model does not know its <IMG_CONTEXT> id: load it with its tokenizer files")
        slots = input_ids == self.image_token_id  # [B, T]
        rows = image_embeds.reshape(-1, image_embeds.shape[-1])  # [N * T_img, H]
        if int(slots.sum()) != rows.shape[0]:
            raise PromptError(
                f"the prompt has {int(slots.sum())} <IMG_CONTEXT> tokens but the images give {rows.shape[0]} "
                f"embeddings ({image_embeds.shape[0]} tiles x {image_embeds.shape[1]}): build the prompt with the "
                "same tile counts as pixel_values"
            )
        embeds = embeds.clone()
        embeds[slots] = rows.to(embeds.dtype)
        return embeds

    def forward(self, input_ids, attention_mask=None, pixel_values=None) -> torch.Tensor:
        """Full forward without cache: float32 logits [B, T, V]."""
        inputs = self.prepare_inputs(input_ids, attention_mask, pixel_values)
        positions = positions_from_mask(inputs.attention_mask)
        return self.language_model(
            inputs.embeds, positions, attention_mask=inputs.attention_mask, visual_mask=inputs.visual_mask
        )


# --- the family: InternViT + Qwen2 / InternLM2 (SAIL-VL-2B, InternVL2-style checkpoints, InternVL-Chat-V1-5) -----


def detect(config: dict) -> bool:
    vision, llm = sub_config_kinds(config)
    return vision in ("InternVisionModel", "intern_vit_6b") and llm in ("Qwen2ForCausalLM", "InternLM2ForCausalLM")


def parse(config: dict) -> InternVLConfig:
    top = "the top level"
    chat = InternVLConfig.from_config(config, InternViTConfig.from_config(require(config, "vision_config", top, dict)))
    # hidden_states = [embeddings, layer 1, ..., layer L]: L + 1 entries to pick from
    depth = chat.select_layer, chat.vision.num_layers
    hidden_state_depth(*depth, embeddings_first=True, tower="InternViT", source="config.json: select_layer")
    return chat


def layer_counts(parsed: InternVLConfig) -> list[LayerCount]:
    return [
        LayerCount("vision_config.num_hidden_layers", parsed.vision.num_layers, "vision_model.encoder.layers.{i}."),
        decoder_layers("llm_config.num_hidden_layers", parsed.llm),
    ]


complete_config = config_as_read
open_tensors = open_safetensors


def build(parsed: InternVLConfig) -> InternVLChatModel:
    return InternVLChatModel(parsed)


def weight_map(parsed: InternVLConfig) -> keymaps.KeyMap:
    llm = decoder_weight_map(parsed.llm, root="language_model.", dst="language_model.")
    return keymaps.passthrough("vision_model.") + keymaps.mlp1_projector() + llm


def check_dtype(dtype: torch.dtype) -> None:
    """Every float dtype runs."""


pixel_values = internvl_chat.pixel_values


def chat_template(parsed: InternVLConfig) -> Template:
    # InternViT-6B's qk-norm with InternLM2 is what tells InternVL-Chat-V1-5's template apart
    return internvl_chat.chat_template(parsed, qk_normalization=parsed.vision.qk_normalization)


encode_prompt = internvl_chat.encode_prompt
add_image_placeholders = internvl_chat.add_image_placeholders
