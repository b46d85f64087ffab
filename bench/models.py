"""Building and loading the benchmarked minisail models from a preset's config.

A full preset is what `minisail.load` builds from the config (a registry family). The vision-only preset
(InternVL-Chat-V1-5's InternViT-6B + mlp1) is `VisionOnlyModel`: the tower, pixel shuffle and projector of
`InternVLChatModel.encode_images`, loaded by the same strict loader through the same weight-map rules
(`vision_model.*` as stored, `mlp1.{0,1,3}` -> projector), so its load path is minisail's own.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import nn

from bench.presets import Preset
from minisail.checkpoint import keymaps
from minisail.checkpoint.files import open_safetensors_folder
from minisail.checkpoint.loader import fill_from_checkpoint
from minisail.errors import ConfigError
from minisail.fast.hooks import load_hooks
from minisail.merge import MLPProjector, pixel_shuffle
from minisail.models.registry import detect_family
from minisail.vision.intern_vit import InternViT, InternViTConfig

# int8 / int4: weight-only, bf16 activations
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.bfloat16, "int4": torch.bfloat16}


class VisionOnlyModel(nn.Module):
    """InternViT -> pixel shuffle -> mlp1: `encode_images(pixel_values [N,3,S,S]) -> [N, 256, H]`."""

    def __init__(self, config: dict):
        super().__init__()
        self.select_layer = int(config.get("select_layer", -1))
        self.ps_version = config.get("ps_version", "v2")
        self.downsample_ratio = float(config.get("downsample_ratio", 0.5))
        vision = InternViTConfig.from_config(config["vision_config"])
        self.vision_model = InternViT(vision)
        merged = int(vision.hidden_size / self.downsample_ratio**2)
        self.projector = MLPProjector(merged, int(config["llm_config"]["hidden_size"]))

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.vision_model(pixel_values, self.select_layer)  # [N, 1024, C]
        merged = pixel_shuffle(features, version=self.ps_version, scale=self.downsample_ratio)  # [N, 256, 4C]
        return self.projector(merged)  # [N, 256, H]


def vision_only_keymap() -> keymaps.KeyMap:
    return keymaps.passthrough("vision_model.") + keymaps.mlp1_projector()


def build_on_meta(preset: Preset) -> tuple[nn.Module, keymaps.KeyMap]:
    """The preset's model on the meta device and its weight map (official names <-> minisail's)."""
    with torch.device("meta"):
        if not preset.has_llm:
            model = VisionOnlyModel(preset.config)
            return model, vision_only_keymap()
        family = detect_family(preset.config)
        model = family.build(family.parse(preset.config))
    return model, family.weight_map(model.config)


def int8_available() -> bool:
    """Does this minisail offer int8 weight-only loading (`minisail.load(..., quantize="int8")`)?"""
    from minisail.loading import load

    return "quantize" in inspect.signature(load).parameters


def load_minisail(preset: Preset, folder: Path, dtype_name: str) -> nn.Module:
    """Load the official-layout checkpoint in `folder` as a user would: `minisail.load` (+ int8 / int4 on load)."""
    dtype = DTYPES[dtype_name]
    if not preset.has_llm:
        with torch.device("meta"):
            model = VisionOnlyModel(preset.config)
        fill_from_checkpoint(model, open_safetensors_folder(folder), vision_only_keymap(), load_hooks(dtype))
        return model.eval()
    from minisail.loading import load

    if dtype_name in ("int8", "int4"):
        if not int8_available():
            raise ConfigError(f"this minisail has no weight-only loading (minisail.load(..., quantize={dtype_name!r}))")
        model = load(folder, dtype=dtype, quantize=dtype_name)
    else:
        model = load(folder, dtype=dtype)
    model.image_token_id = preset.image_token_id  # the benchmark folder has no tokenizer to read it from
    return model
