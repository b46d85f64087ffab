"""From a config.json to a model family: which modules to build and which weight map fills them.

Families are told apart by their sub-configs, not the top-level model_type: SAIL-VL-2B and SAIL-VL2 both
say `sailvl`, InternVL-Chat-V1-5 and Mono-InternVL both say `internvl_chat`, with different towers and LLMs.
Each family is one `Family` entry in FAMILIES; the first whose `matches` accepts the config wins.

Each family also says which config key counts the numbered blocks under which official key prefix
(`layer_counts`): `minisail.load` compares them with the checkpoint's own keys (headers only) before it builds
anything, so a config that asks for 10**9 layers fails at once instead of building for minutes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from minisail.checkpoint import keymaps
from minisail.checkpoint.files import CheckpointTensors, open_safetensors_folder
from minisail.config import architecture
from minisail.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class LayerCount:
    """The checkpoint must number exactly `expected` blocks under `prefix` ({i} = the block index), as config key
    `key` says. With a `stride` k only the indices 0, k, 2k, ... count a block (LLaVA's projector numbers its
    Linear, LayerNorm and GELU modules 0, 1, 2, then 3, 4, ...: one Linear per 3)."""

    key: str
    expected: int
    prefix: str
    stride: int = 1

    def found(self, keys) -> int:
        """Blocks the checkpoint numbers: highest counted index / stride + 1 (a gap is the loader's to name)."""
        pattern = re.compile(re.escape(self.prefix).replace(r"\{i\}", r"([0-9]+)"))
        indices = [int(m.group(1)) for m in map(pattern.match, keys) if m]
        counted = [i // self.stride for i in indices if i % self.stride == 0]
        return max(counted) + 1 if counted else 0


@dataclass(frozen=True)
class Family:
    name: str
    matches: Callable[[dict], bool]  # does this config.json describe this family?
    build: Callable[[dict], nn.Module]  # config.json dict -> model on the current (meta) device
    keymap: Callable[[nn.Module], keymaps.KeyMap]  # built model -> its weight map
    open_tensors: Callable[[Path, dict], CheckpointTensors] = lambda folder, config: open_safetensors_folder(folder)
    # config.json completed with the files it points to, before build (Yi-VL: the vision folder's config.json)
    complete_config: Callable[[Path, dict], dict] = lambda folder, config: config
    # config.json dict -> the family's checked config dataclass (what `build` reads); every bad value raises here
    parse: Callable[[dict], Any] = lambda config: None
    # parsed config -> the blocks the checkpoint must number (see LayerCount)
    layer_counts: Callable[[Any], list[LayerCount]] = lambda parsed: []


def check_layer_counts(family: Family, parsed, tensors) -> None:
    """A CheckpointError unless every LayerCount of the family matches the checkpoint's own keys (headers only)."""
    keys = list(tensors.keys())
    for count in family.layer_counts(parsed):
        found = count.found(keys)
        if found != count.expected:
            raise CheckpointError(
                f"{tensors.description}: config.json says {count.key} = {count.expected}, but the checkpoint numbers "
                f"{found} under {count.prefix!r}: the config does not match the weights"
            )


def decoder_layers(key: str, parsed, prefix: str = "language_model.model.layers.{i}.") -> LayerCount:
    return LayerCount(key, parsed.llm.num_layers, prefix)


def sub_config_kinds(config: dict) -> tuple[str, str]:
    """(vision tower kind, language model kind): the architectures entry, else the model_type."""
    vision, llm = config.get("vision_config") or {}, config.get("llm_config") or {}
    for key, value in (("vision_config", vision), ("llm_config", llm)):
        if not isinstance(value, dict):
            raise ConfigError(f"config.json: {key} is {type(value).__name__}, not an object: the file is corrupt")
    return architecture(vision) or vision.get("model_type", ""), architecture(llm) or llm.get("model_type", "")


def llm_keymap(llm_config, *, root: str, dst: str) -> keymaps.KeyMap:
    """The language model's weight map; `root` is the official prefix of the causal-LM wrapper."""
    if llm_config.architecture.startswith("InternLM2"):
        return keymaps.internlm2_decoder(llm_config, src=f"{root}model.", head=f"{root}output.weight", dst=dst)
    return keymaps.hf_decoder(llm_config, src=f"{root}model.", head=f"{root}lm_head.weight", dst=dst)


# --- InternViT + Qwen2 / InternLM2: SAIL-VL-2B, InternVL2-style checkpoints, InternVL-Chat-V1-5 --------------


def _is_internvl(config: dict) -> bool:
    vision, llm = sub_config_kinds(config)
    return vision in ("InternVisionModel", "intern_vit_6b") and llm in ("Qwen2ForCausalLM", "InternLM2ForCausalLM")


def _build_internvl(config: dict) -> nn.Module:
    from minisail.models.internvl import InternVLChatModel, internvl_config

    return InternVLChatModel(internvl_config(config))


def _internvl_keymap(model) -> keymaps.KeyMap:
    llm = llm_keymap(model.config.llm, root="language_model.", dst="language_model.")
    return keymaps.passthrough("vision_model.") + keymaps.mlp1_projector() + llm


def _parse_internvl(config: dict):
    from minisail.models.internvl import internvl_config

    return internvl_config(config)


INTERNVL = Family(
    "internvl",
    _is_internvl,
    _build_internvl,
    _internvl_keymap,
    parse=_parse_internvl,
    layer_counts=lambda c: [
        LayerCount("vision_config.num_hidden_layers", c.vision.num_layers, "vision_model.encoder.layers.{i}."),
        decoder_layers("llm_config.num_hidden_layers", c),
    ],
)


# --- Mono-InternVL: patch embedding (no ViT layers) + InternLM2 with FFN visual experts --------------------------


def _is_mono(config: dict) -> bool:
    vision, llm = sub_config_kinds(config)
    return vision in ("InternVisionPatchModel", "intern_vit_patch") and llm == "InternLM2VEForCausalLM"


def _build_mono(config: dict) -> nn.Module:
    from minisail.models.mono import MonoInternVLChatModel, mono_config

    return MonoInternVLChatModel(mono_config(config))


def _mono_keymap(model) -> keymaps.KeyMap:
    # The visual-expert rules come first: they claim feed_forward{,_ve}.*; the rest is InternLM2 as in V1-5.
    root = "language_model."
    experts = keymaps.internlm2_visual_experts(model.config.llm, src=f"{root}model.", dst=root)
    llm = llm_keymap(model.config.llm, root=root, dst=root)
    return keymaps.passthrough("vision_model.") + keymaps.mlp1_projector() + experts + llm


def _parse_mono(config: dict):
    from minisail.models.mono import mono_config

    return mono_config(config)


MONO = Family(
    "mono-internvl",
    _is_mono,
    _build_mono,
    _mono_keymap,
    parse=_parse_mono,
    # the patch model has no layers: its config's num_hidden_layers (InternViT's class default 48) means nothing
    layer_counts=lambda c: [decoder_layers("llm_config.num_hidden_layers", c)],
)


# --- SAIL-ViT + Qwen3: SAIL-VL2 (2B, 8B, -Thinking); its top-level model_type `sailvl` is SAIL-VL-2B's too ---------


def _is_sailvl2(config: dict) -> bool:
    vision, llm = sub_config_kinds(config)
    return vision in ("SAILViTModel", "sailvit") and llm in ("Qwen3ForCausalLM", "qwen3")


def _build_sailvl2(config: dict) -> nn.Module:
    from minisail.models.sailvl2 import build_sailvl2

    return build_sailvl2(config)


def _sailvl2_keymap(model) -> keymaps.KeyMap:
    llm = llm_keymap(model.config.llm, root="language_model.", dst="language_model.")
    return keymaps.sail_vit() + keymaps.mlp1_projector() + llm


def _parse_sailvl2(config: dict):
    from minisail.models.sailvl2 import sailvl2_config

    return sailvl2_config(config)


SAILVL2 = Family(
    "sailvl2",
    _is_sailvl2,
    _build_sailvl2,
    _sailvl2_keymap,
    parse=_parse_sailvl2,
    layer_counts=lambda c: [
        LayerCount("vision_config.num_hidden_layers", c.vision.num_layers, "vision_model.trunk.blocks.{i}."),
        decoder_layers("llm_config.num_hidden_layers", c),
    ],
)


# --- CLIP ViT-H + mlp2x_gelu_Norm + Yi (Llama): Yi-VL-6B / 34B, a LLaVA checkpoint with its tower in vit/<name>/ ------


def _is_yivl(config: dict) -> bool:
    # transformers' own llava configs (the "-hf" conversions) nest a text_config instead of the mm_* keys
    return config.get("model_type") == "llava" and "mm_vision_tower" in config and "text_config" not in config


def _build_yivl(config: dict) -> nn.Module:
    from minisail.models.yivl import YiVLModel, yivl_config

    return YiVLModel(yivl_config(config))


def _complete_yivl_config(folder: Path, config: dict) -> dict:
    from minisail.models.yivl import with_vision_config

    return with_vision_config(folder, config)


def _open_yivl_tensors(folder: Path, config: dict):
    from minisail.models.yivl import open_yivl_tensors

    return open_yivl_tensors(folder, config)


def _yivl_keymap(model) -> keymaps.KeyMap:
    from minisail.models.yivl import VIT_PREFIX

    c, vit = model.config, f"{VIT_PREFIX}vision_model."
    return (
        keymaps.renamed("vision_tower.", vit)
        + keymaps.clip_vision_unused(vit, num_layers=c.vision.num_layers, depth=model.vision_tower.depth)
        + keymaps.llava_norm_projector(c.projector_depth)
        + keymaps.hf_decoder(c.llm, src="model.", head="lm_head.weight", dst="language_model.")
        # The main shards also hold a bf16 copy of the tower. Upstream never loads it (it builds the tower with
        # delay_load=True and then from vit/<name>/, float32), so the copy is deliberately left unused.
        + keymaps.KeyMap([], ignore=[r"model\.vision_tower\.vision_tower\..+"])
    )


def _parse_yivl(config: dict):
    from minisail.models.yivl import yivl_config

    return yivl_config(config)


def _yivl_layer_counts(c) -> list[LayerCount]:
    from minisail.models.yivl import VIT_PREFIX

    clip_blocks = VIT_PREFIX + "vision_model.encoder.layers.{i}."
    return [
        decoder_layers("num_hidden_layers", c, "model.layers.{i}."),
        # all num_hidden_layers CLIP blocks are stored, although only those up to mm_vision_select_layer are built
        LayerCount("the vit folder's num_hidden_layers", c.vision.num_layers, clip_blocks),
        LayerCount("mm_projector_type's N (mlpNx_gelu_Norm)", c.projector_depth, "model.mm_projector.{i}.", stride=3),
    ]


YIVL = Family(
    "yi-vl",
    _is_yivl,
    _build_yivl,
    _yivl_keymap,
    open_tensors=_open_yivl_tensors,
    complete_config=_complete_yivl_config,
    parse=_parse_yivl,
    layer_counts=_yivl_layer_counts,
)


FAMILIES: list[Family] = [INTERNVL, MONO, SAILVL2, YIVL]


def detect_family(config: dict) -> Family:
    for family in FAMILIES:
        if family.matches(config):
            return family
    vision, llm = sub_config_kinds(config)
    what = f"vision {vision or '?'}, language model {llm or '?'}, model_type {config.get('model_type')!r}"
    raise ConfigError(
        f"config.json describes a model minisail does not support ({what}); supported: "
        "SAIL-VL-2B, SAIL-VL2, InternVL-Chat-V1-5 (+Int8), Mono-InternVL-2B, Yi-VL"
    )
