"""Reading the official config.json of each family into minisail's small config dataclasses.

Unknown keys are ignored (the official configs carry dozens of transformers bookkeeping fields); a missing
required key is a `ConfigError` that names it and where it was expected. Class defaults of the upstream
config classes differ from every released checkpoint (select_layer -4, ps_version v1, ...), so minisail uses
an upstream class default only where a released config can omit the key, and says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from minisail.checkpoint.paths import inside
from minisail.errors import ConfigError
from minisail.llm.decoder import DecoderConfig


def read_config(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder: point minisail at the checkpoint folder that holds config.json")
    path = inside(folder, "config.json", "config.json")  # a link out of the folder is refused, not read
    if not path.is_file():
        raise ConfigError(f"{folder} has no config.json: is this an official checkpoint folder?")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path} is not valid JSON ({error}): download it again") from error
    if not isinstance(config, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return config


def require(config: dict, key: str, where: str, kind: type | tuple = (int, float, str, bool, list, dict)):
    if key not in config or config[key] is None:
        raise ConfigError(f"config.json has no {key!r} in {where}: the file is incomplete or not of this model family")
    value = config[key]
    if not isinstance(value, kind):
        raise ConfigError(f"config.json: {where}.{key} = {value!r} has the wrong type")
    return value


def optional(config: dict, key: str, where: str, kind: type | tuple, default):
    """config[key] if present and not null, else `default`; a value of another type is a ConfigError."""
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ConfigError(f"config.json: {where}.{key} = {value!r} has the wrong type")
    if not isinstance(value, kind):
        raise ConfigError(f"config.json: {where}.{key} = {value!r} has the wrong type")
    return value


NUMBER = (int, float)


def positive(config: dict, key: str, where: str) -> int:
    value = require(config, key, where, int)
    if isinstance(value, bool) or value <= 0:
        raise ConfigError(f"config.json: {where}.{key} = {value!r} must be a positive integer")
    return value


def width_and_heads(config: dict, where: str) -> tuple[int, int]:
    """(hidden_size, num_attention_heads) of a transformer config, checked to split into whole heads."""
    hidden, heads = positive(config, "hidden_size", where), positive(config, "num_attention_heads", where)
    if hidden % heads:
        raise ConfigError(f"config.json: {where}.hidden_size {hidden} is not divisible by {heads} heads")
    return hidden, heads


def architecture(config: dict) -> str:
    names = config.get("architectures") or [""]
    return names[0] if isinstance(names, list) and names else ""


def decoder_config(llm: dict, where: str = "llm_config") -> DecoderConfig:
    """A DecoderConfig from a Qwen2 / Qwen3 / InternLM2 / Llama text config."""
    arch = architecture(llm)
    hidden, heads = positive(llm, "hidden_size", where), positive(llm, "num_attention_heads", where)
    kv_heads = positive(llm, "num_key_value_heads", where) if llm.get("num_key_value_heads") else heads
    # Qwen3 states head_dim; it need not be hidden / heads
    head_dim = positive(llm, "head_dim", where) if llm.get("head_dim") else hidden // heads
    if heads % kv_heads:
        raise ConfigError(f"config.json: {where} has {heads} attention heads, not a multiple of {kv_heads} kv heads")
    # transformers 4.x writes rope_theta / rope_scaling; 5.x writes both into rope_parameters.
    rope = optional(llm, "rope_parameters", where, dict, {})
    rope_theta = float(optional(llm, "rope_theta", where, NUMBER, optional(rope, "rope_theta", where, NUMBER, 1e4)))
    scaling = optional(llm, "rope_scaling", where, dict, None)
    if scaling is None and rope.get("rope_type", "default") != "default":
        scaling = rope
    dynamic_factor = None
    if scaling is not None:
        kind = scaling.get("type") or scaling.get("rope_type")
        if kind != "dynamic":
            raise ConfigError(f"config.json: {where}.rope_scaling type {kind!r} is not supported (only 'dynamic')")
        dynamic_factor = float(require(scaling, "factor", f"{where}.rope_scaling", NUMBER))
    is_internlm2 = arch.startswith("InternLM2") or llm.get("model_type") == "internlm2"
    if is_internlm2:
        qkv_bias = bool(llm.get("bias", False))
        if qkv_bias:
            raise ConfigError(f"config.json: {where}.bias = true (InternLM2 with biases) is not supported")
    elif arch.startswith("Qwen2") or llm.get("model_type") == "qwen2":
        qkv_bias = True  # Qwen2 always has q/k/v biases (and none on o_proj)
    else:
        qkv_bias = bool(llm.get("attention_bias", False))
        if qkv_bias:
            raise ConfigError(f"config.json: {where}.attention_bias = true is not supported for {arch or 'this model'}")
    return DecoderConfig(
        vocab_size=positive(llm, "vocab_size", where),
        hidden_size=hidden,
        num_layers=positive(llm, "num_hidden_layers", where),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=positive(llm, "intermediate_size", where),
        rms_norm_eps=float(require(llm, "rms_norm_eps", where, (int, float))),
        rope_theta=rope_theta,
        max_position_embeddings=positive(llm, "max_position_embeddings", where),
        rope_dynamic_factor=dynamic_factor,
        qkv_bias=qkv_bias,
        qk_norm=arch.startswith("Qwen3") or llm.get("model_type") == "qwen3",
        tie_word_embeddings=bool(llm.get("tie_word_embeddings", False)),
        architecture=arch,
    )
