"""From a config.json to a model family: which modules to build and which weight map fills them.

Families are told apart by their sub-configs, not the top-level model_type: SAIL-VL-2B and SAIL-VL2 both
say `sailvl`, InternVL-Chat-V1-5 and Mono-InternVL both say `internvl_chat`, with different towers and LLMs.
Each family is one `Family` entry in FAMILIES; the first whose `matches` accepts the config wins.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from minisail.checkpoint import keymaps
from minisail.checkpoint.files import CheckpointTensors, open_safetensors_folder
from minisail.config import architecture
from minisail.errors import ConfigError


@dataclass(frozen=True)
class Family:
    name: str
    matches: Callable[[dict], bool]  # does this config.json describe this family?
    build: Callable[[dict], nn.Module]  # config.json dict -> model on the current (meta) device
    keymap: Callable[[nn.Module], keymaps.KeyMap]  # built model -> its weight map
    open_tensors: Callable[[Path, dict], CheckpointTensors] = lambda folder, config: open_safetensors_folder(folder)


def sub_config_kinds(config: dict) -> tuple[str, str]:
    """(vision tower kind, language model kind): the architectures entry, else the model_type."""
    vision = config.get("vision_config") or {}
    llm = config.get("llm_config") or {}
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


INTERNVL = Family("internvl", _is_internvl, _build_internvl, _internvl_keymap)


FAMILIES: list[Family] = [INTERNVL]


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
