"""Yi-VL's checkpoint: its config (config.json + the vision folder's), its tensors (two folders), its weight map.

The Yi-VL family module is models/yivl.py; this is the part of it that reads a checkpoint, kept apart to keep
each file small. Mirrors Yi `VL/llava/mm_utils.py` (load_pretrained_model), `llava_arch.py`
(build_vision_tower, build_vision_projector) and `clip_encoder/clip_encoder.py` (the tower's folder), at github
01-ai/Yi @ f73194c.

The checkpoint is two folders: config.json is a Llama config plus `mm_*` keys, and `mm_vision_tower` names the
vision tower's own folder relative to the checkpoint (`./vit/clip-vit-H-14-laion2B-s32B-b79K-yi-vl-6B-448`),
with a CLIPVisionModel config.json and float32 weights. Upstream builds the tower from that folder
(delay_load=True), so the bf16 copy of the tower in the main shards is never used: minisail ignores it too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from minisail.checkpoint import keymaps
from minisail.checkpoint.files import NamespacedTensors, open_checkpoint_folder
from minisail.checkpoint.paths import inside
from minisail.config import MAX_SIZE, choice, flag, optional, positive, read_config, require
from minisail.errors import CheckpointError, ConfigError
from minisail.layers import hidden_state_depth
from minisail.llm.decoder_config import DecoderConfig
from minisail.models.family_parts import LayerCount, decoder_layers
from minisail.vision.clip_vit import CLIPVisionConfig

VIT_PREFIX = "vit."  # the vision folder's tensors, as the weight map sees them


@dataclass(frozen=True)
class YiVLConfig:
    vision: CLIPVisionConfig
    llm: DecoderConfig
    vision_tower: str  # mm_vision_tower as config.json writes it: the vision folder, relative to the checkpoint
    select_layer: int  # mm_vision_select_layer: which CLIP hidden state feeds the projector
    select_feature: str  # "patch" (CLS dropped) or "cls_patch"
    projector_depth: int  # N of mlpNx_gelu_Norm
    template: str = "mm_default"  # llava configs carry no template key; Yi's single_inference.py uses this one
    min_dynamic_patch: int = 1  # Yi-VL does not tile: one padded square per image (image/preprocess.py)
    max_dynamic_patch: int = 1

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def tokens_per_image(self) -> int:
        return self.vision.grid**2 + (self.select_feature == "cls_patch")

    @property
    def vision_depth(self) -> int:
        """CLIP blocks to build and run: those up to hidden_states[select_layer] (`layers.hidden_state_depth`)."""
        return hidden_state_depth(self.select_layer, self.vision.num_layers, embeddings_first=True, tower="CLIP ViT")


# --- config.json + vit/<name>/config.json -----------------------------------------------------------------------


def vision_folder(folder: Path, config: dict) -> Path:
    """The vision tower's folder: mm_vision_tower joined to the checkpoint folder, as upstream joins it, and
    refused (paths.inside) if it leads outside the checkpoint folder (an absolute path, '..', a link out)."""
    name = require(config, "mm_vision_tower", "the top level", str)
    path = inside(folder, name, "config.json's mm_vision_tower")
    if not path.is_dir():
        raise CheckpointError(
            f"{folder}: config.json's mm_vision_tower {name!r} is not a folder ({path} is missing). Yi-VL checkpoints "
            "ship their CLIP vision tower (config.json + weights) in that folder: download it too"
        )
    return path


def complete_config(folder: Path, config: dict) -> dict:
    """config.json plus the vision folder's CLIP config as `vision_config` (what `parse` reads)."""
    vit = read_config(vision_folder(folder, config))
    if isinstance(vit.get("vision_config"), dict):  # a full CLIPConfig: its vision half, as CLIPVisionConfig reads it
        vit = vit["vision_config"]
    return {**config, "vision_config": vit}


def parse(config: dict) -> YiVLConfig:
    """config.json (a Llama config plus LLaVA's mm_* keys, with the vision folder's config as vision_config).

    The projector's GELU and LayerNorm eps are fixed in upstream's builder (no config key), as here."""
    top = "the top level"
    vision = CLIPVisionConfig.from_config(require(config, "vision_config", "the top level (see complete_config)", dict))
    llm = DecoderConfig.from_config(config, where=top)
    projector = optional(config, "mm_projector_type", top, str, "linear")  # upstream's default
    match = re.fullmatch(r"mlp([0-9]+)x_gelu_Norm", projector)
    if not match or not 1 <= int(match.group(1)) <= MAX_SIZE:
        raise ConfigError(
            f"config.json: mm_projector_type {projector!r} is not supported: minisail runs Yi-VL's mlp2x_gelu_Norm "
            "(any mlpNx_gelu_Norm), not other LLaVA projectors"
        )
    if flag(config, "mm_use_im_start_end", top, False):
        raise ConfigError("config.json: mm_use_im_start_end = true is not supported (Yi-VL has no image start/end)")
    select_feature = choice(config, "mm_vision_select_feature", top, ("patch", "cls_patch"), "patch")  # upstream's
    select_layer = require(config, "mm_vision_select_layer", top, int)
    source = "config.json: mm_vision_select_layer"
    hidden_state_depth(select_layer, vision.num_layers, embeddings_first=True, tower="CLIP ViT", source=source)
    mm_hidden = positive(config, "mm_hidden_size", top)
    if mm_hidden != vision.hidden_size:
        raise ConfigError(
            f"config.json: mm_hidden_size {mm_hidden} != the vision tower's hidden_size {vision.hidden_size}"
        )
    return YiVLConfig(
        vision=vision,
        llm=llm,
        vision_tower=require(config, "mm_vision_tower", top, str),
        select_layer=select_layer,
        select_feature=select_feature,
        projector_depth=int(match.group(1)),
    )


def open_tensors(folder: Path, config: dict) -> NamespacedTensors:
    """The main checkpoint's tensors as named, plus the vision folder's under VIT_PREFIX (safetensors or .bin)."""
    vit = vision_folder(folder, config)
    main = open_checkpoint_folder(folder)
    return NamespacedTensors({"": main, VIT_PREFIX: open_checkpoint_folder(vit)}, f"{folder} (+ {vit} as vit.*)")


# --- what load checks and fills ---------------------------------------------------------------------------------


def layer_counts(parsed: YiVLConfig) -> list[LayerCount]:
    clip_blocks = VIT_PREFIX + "vision_model.encoder.layers.{i}."
    return [
        decoder_layers("num_hidden_layers", parsed.llm, "model.layers.{i}."),
        # all num_hidden_layers CLIP blocks are stored, although only those up to mm_vision_select_layer are built
        LayerCount("the vit folder's num_hidden_layers", parsed.vision.num_layers, clip_blocks),
        LayerCount(
            "mm_projector_type's N (mlpNx_gelu_Norm)", parsed.projector_depth, "model.mm_projector.{i}.", stride=3
        ),
    ]


def weight_map(parsed: YiVLConfig) -> keymaps.KeyMap:
    vit = f"{VIT_PREFIX}vision_model."
    return (
        keymaps.renamed("vision_tower.", vit)
        + keymaps.clip_vision_unused(vit, num_layers=parsed.vision.num_layers, depth=parsed.vision_depth)
        + keymaps.llava_norm_projector(parsed.projector_depth)
        + keymaps.hf_decoder(parsed.llm, src="model.", head="lm_head.weight", dst="language_model.")
        # The main shards also hold a bf16 copy of the tower. Upstream never loads it (it builds the tower with
        # delay_load=True and then from vit/<name>/, float32), so the copy is deliberately left unused.
        + keymaps.KeyMap([], ignore=[r"model\.vision_tower\.vision_tower\..+"])
    )
