"""What the family modules share: how a checkpoint numbers its blocks, the decoder's weight map, the defaults.

A family module (models/internvl.py, mono.py, sailvl2.py, yivl.py; the list is models/registry.py's FAMILIES)
exports the same names, see registry.py. This module holds the pieces several of them use:

- `LayerCount`: which config count goes with which official key prefix. `minisail.load` compares every count of
  a family's `layer_counts(parsed)` with the checkpoint's own keys (headers only) before it builds anything, so
  a config that asks for 10**9 layers fails at once instead of building for minutes;
- `sub_config_kinds`: the vision and language-model kinds a config.json names, what `detect` looks at
  (families are told apart by their sub-configs, not the top-level model_type);
- `decoder_weight_map`: the language model's rules (InternLM2's names or transformers' Qwen / Llama names);
- `open_safetensors` and `config_as_read`: the `open_tensors` and `complete_config` of a family whose
  checkpoint is one folder with everything in config.json (all but Yi-VL).

Mirrors nothing upstream: it is minisail's own bookkeeping around the official checkpoint layouts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from minisail.checkpoint import keymaps
from minisail.checkpoint.files import CheckpointTensors, open_safetensors_folder
from minisail.config import architecture
from minisail.errors import ConfigError
from minisail.llm.decoder_config import DecoderConfig


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


def decoder_layers(key: str, llm: DecoderConfig, prefix: str = "language_model.model.layers.{i}.") -> LayerCount:
    """The decoder's blocks, counted by config key `key`."""
    return LayerCount(key, llm.num_layers, prefix)


def sub_config_kinds(config: dict) -> tuple[str, str]:
    """(vision tower kind, language model kind): the architectures entry, else the model_type."""
    vision, llm = config.get("vision_config") or {}, config.get("llm_config") or {}
    for key, value in (("vision_config", vision), ("llm_config", llm)):
        if not isinstance(value, dict):
            raise ConfigError(f"config.json: {key} is {type(value).__name__}, not an object: the file is corrupt")
    return architecture(vision) or vision.get("model_type", ""), architecture(llm) or llm.get("model_type", "")


def decoder_weight_map(llm: DecoderConfig, *, root: str, dst: str) -> keymaps.KeyMap:
    """The language model's weight map; `root` is the official prefix of the causal-LM wrapper."""
    if llm.architecture.startswith("InternLM2"):
        return keymaps.internlm2_decoder(llm, src=f"{root}model.", head=f"{root}output.weight", dst=dst)
    return keymaps.hf_decoder(llm, src=f"{root}model.", head=f"{root}lm_head.weight", dst=dst)


def open_safetensors(folder: Path, config: dict) -> CheckpointTensors:
    """The checkpoint folder's safetensors (one file or an index of shards), headers only."""
    return open_safetensors_folder(folder)


def config_as_read(folder: Path, config: dict) -> dict:
    """config.json needs no other file: it is complete as read."""
    return config
