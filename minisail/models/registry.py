"""From a config.json to a model family: which modules to build and which weight map fills them.

Families are told apart by their sub-configs, not the top-level model_type: SAIL-VL-2B and SAIL-VL2 both
say `sailvl`, InternVL-Chat-V1-5 and Mono-InternVL both say `internvl_chat`, with different towers and LLMs.
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
    build: Callable[[dict], nn.Module]  # config.json dict -> model on the current (meta) device
    keymap: Callable[[nn.Module], keymaps.KeyMap]  # built model -> its weight map
    open_tensors: Callable[[Path, dict], CheckpointTensors] = lambda folder, config: open_safetensors_folder(folder)


def llm_keymap(llm_config, *, root: str, dst: str) -> keymaps.KeyMap:
    """The language model's weight map; `root` is the official prefix of the causal-LM wrapper."""
    if llm_config.architecture.startswith("InternLM2"):
        return keymaps.internlm2_decoder(llm_config, src=f"{root}model.", head=f"{root}output.weight", dst=dst)
    return keymaps.hf_decoder(llm_config, src=f"{root}model.", head=f"{root}lm_head.weight", dst=dst)


def _build_internvl(config: dict) -> nn.Module:
    from minisail.models.internvl import InternVLChatModel, internvl_config

    return InternVLChatModel(internvl_config(config))


def _internvl_keymap(model) -> keymaps.KeyMap:
    llm = llm_keymap(model.config.llm, root="language_model.", dst="language_model.")
    return keymaps.passthrough("vision_model.") + keymaps.mlp1_projector() + llm


INTERNVL = Family("internvl", _build_internvl, _internvl_keymap)

SUPPORTED_LLMS = ("Qwen2ForCausalLM", "InternLM2ForCausalLM")


def detect_family(config: dict) -> Family:
    vision = config.get("vision_config") or {}
    llm = config.get("llm_config") or {}
    vision_kind = architecture(vision) or vision.get("model_type", "")
    llm_kind = architecture(llm) or llm.get("model_type", "")
    if vision_kind in ("InternVisionModel", "intern_vit_6b") and llm_kind in SUPPORTED_LLMS:
        return INTERNVL
    what = f"vision {vision_kind or '?'}, language model {llm_kind or '?'}, model_type {config.get('model_type')!r}"
    raise ConfigError(f"config.json describes a model minisail does not support ({what})")
