"""Reading the official config.json of each family into minisail's small config dataclasses.

Unknown keys are ignored (the official configs carry dozens of transformers bookkeeping fields), but every key
the math depends on is read through a typed reader below (`positive`, `real`, `epsilon`, `flag`, `choice`):
a missing, mistyped, non-finite or out-of-range value is a `ConfigError` that names the key and the accepted
values. Switches a module does not implement are refused, never silently ignored. Class defaults of the upstream
config classes differ from every released checkpoint (select_layer -4, ps_version v1, ...), so minisail uses
an upstream class default only where a released config can omit the key, and says so.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from minisail.checkpoint.paths import MAX_JSON_FILE_BYTES, inside
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
        if path.stat().st_size > MAX_JSON_FILE_BYTES:
            raise ConfigError(f"{path} is larger than {MAX_JSON_FILE_BYTES} bytes: it is not a config.json")
        # json.loads, not strict_json: a NaN or an absurd number is refused below by the reader of its key, by name
        config = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:  # json recurses once per nesting level: thousands of `[` are no config
        raise ConfigError(f"{path} nests too deeply to be a config.json: download it again") from None
    except (OSError, ValueError) as error:  # UnicodeDecodeError, JSONDecodeError, an int of > 4300 digits
        raise ConfigError(f"{path} is not valid JSON ({error}): download it again") from error
    if not isinstance(config, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return config


# --- typed reads ------------------------------------------------------------------------------------------------
# Python's json accepts NaN, Infinity and integers of any length, and `True` is an int in Python: every reader
# below checks the JSON type (bools are never numbers), finiteness and a range, so no value reaches the model
# builder that would make it fail obscurely (OverflowError, a meta tensor of 10**20 elements) or compute
# something else than the checkpoint was trained with (a NaN epsilon, a negative rope base).

REQUIRED = object()  # marks a key without a default

# Sanity bounds for sizes that reach an allocation (even a meta one) before the checkpoint's shapes are compared.
# Far above the releases minisail runs (vocab <= 151936, widths <= 7168, intermediate <= 20480), and low
# enough that no product of two of them overflows int64 or is slow to build on the meta device.
MAX_SIZE = 1 << 22  # widths, vocab, intermediate sizes, heads, layer counts (layers are also counted in the files)
MAX_IMAGE_SIZE = 1 << 15  # tile side in pixels (448 in every release)
MAX_PATCH_SIZE = 1 << 10  # patch side in pixels (14)
MAX_CHANNELS = 64  # image channels (3)


def _name(where: str, key: str) -> str:
    return key if where == "the top level" else f"{where}.{key}"


def _missing(key: str, where: str):
    return ConfigError(f"config.json has no {key!r} in {where}: the file is incomplete or not of this model family")


def _wrong_type(key: str, where: str, value, wanted: str):
    return ConfigError(f"config.json: {_name(where, key)} = {value!r} has the wrong type: expected {wanted}")


def _kinds(kind: type | tuple) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


def require(config: dict, key: str, where: str, kind: type | tuple = (int, float, str, bool, list, dict)):
    """config[key], which must be present, not null and of `kind` (a bool is not an int unless bool is asked)."""
    if key not in config or config[key] is None:
        raise _missing(key, where)
    value = config[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
        raise _wrong_type(key, where, value, " or ".join(k.__name__ for k in _kinds(kind)))
    return value


def optional(config: dict, key: str, where: str, kind: type | tuple, default):
    """config[key] if present and not null, else `default`; a value of another type is a ConfigError."""
    if config.get(key) is None:
        return default
    return require(config, key, where, kind)


NUMBER = (int, float)


def positive(config: dict, key: str, where: str, default=REQUIRED, *, limit: int = MAX_SIZE) -> int:
    """A whole number in 1 .. limit (a JSON integer: 2.0 and true are refused)."""
    if default is not REQUIRED and config.get(key) is None:
        return default
    value = require(config, key, where, int)
    if not 1 <= value <= limit:
        raise ConfigError(
            f"config.json: {_name(where, key)} = {value!r} is out of range: accepted 1 .. {limit}"
            + (" (a sanity bound far above every released model)" if limit >= MAX_SIZE else "")
        )
    return value


def real(
    config: dict, key: str, where: str, default=REQUIRED, *, above: float | None = None, at_most: float | None = None
) -> float:
    """A finite JSON number (not a bool, not NaN or Infinity), > `above` and <= `at_most` when given, as a float."""
    if default is not REQUIRED and config.get(key) is None:
        return float(default)
    value = require(config, key, where, NUMBER)
    accepted = "a finite number" + (f" > {above}" if above is not None else "")
    accepted += f" <= {at_most}" if at_most is not None else ""
    try:
        number = float(value)
    except OverflowError:  # an integer beyond the float range
        number = math.inf
    too_low = above is not None and number <= above
    if not math.isfinite(number) or too_low or (at_most is not None and number > at_most):
        raise ConfigError(f"config.json: {_name(where, key)} = {value!r} is out of range: accepted {accepted}")
    return number


def epsilon(config: dict, key: str, where: str, default=REQUIRED) -> float:
    """A norm epsilon: finite and > 0 (0 divides by zero on an all-zero row, a negative one can give NaN)."""
    return real(config, key, where, default, above=0.0)


def flag(config: dict, key: str, where: str, default: bool) -> bool:
    """A JSON true/false (a string "false" would be truthy in Python)."""
    return optional(config, key, where, bool, default)


def choice(config: dict, key: str, where: str, accepted: tuple[str, ...], default=REQUIRED, *, why: str = "") -> str:
    """A string among `accepted`; anything else is a ConfigError naming the key and the accepted values."""
    value = require(config, key, where, str) if default is REQUIRED else optional(config, key, where, str, default)
    if value not in accepted:
        raise ConfigError(
            f"config.json: {_name(where, key)} {value!r} is not supported: accepted "
            f"{', '.join(repr(a) for a in accepted)}{why}"
        )
    return value


def width_and_heads(config: dict, where: str) -> tuple[int, int]:
    """(hidden_size, num_attention_heads) of a transformer config, checked to split into whole heads."""
    hidden, heads = positive(config, "hidden_size", where), positive(config, "num_attention_heads", where)
    if hidden % heads:
        raise ConfigError(f"config.json: {where}.hidden_size {hidden} is not divisible by {heads} heads")
    return hidden, heads


def image_and_patch(config: dict, where: str, default_image_size=REQUIRED) -> tuple[int, int]:
    """(image_size, patch_size) of a vision config: bounded, and a patch no larger than the image."""
    image_size = positive(config, "image_size", where, default_image_size, limit=MAX_IMAGE_SIZE)
    patch_size = positive(config, "patch_size", where, limit=MAX_PATCH_SIZE)
    if patch_size > image_size:
        raise ConfigError(f"config.json: {where}.patch_size {patch_size} is larger than image_size {image_size}")
    return image_size, patch_size


def architecture(config: dict) -> str:
    names = config.get("architectures") or [""]
    return names[0] if isinstance(names, list) and names and isinstance(names[0], str) else ""


# What the decoder does with each key of the official LLM config classes (Qwen2Config, Qwen3Config, LlamaConfig,
# InternLM2Config), decided key by key:
# - read and checked: the sizes, hidden_act, rms_norm_eps, rope_theta / rope_scaling / rope_parameters,
#   head_dim, the bias switches, tie_word_embeddings, max_position_embeddings;
# - refused when they ask for math the decoder does not implement: use_sliding_window true, layer_types other
#   than "full_attention", mlp_bias true, attention_bias / bias true (where the family has none), a RoPE type
#   other than dynamic NTK, partial_rotary_factor other than 1;
# - ignored, because they do not change inference: attention_dropout (dropout is off at eval), pretraining_tp
#   (Llama's sliced matmuls: the same products, summed in another order), sliding_window and max_window_layers
#   (read upstream only when use_sliding_window is true), attn_implementation, use_cache, initializer_range,
#   and the bos / eos / pad ids (the tokenizer's and generation's business).
SILU = ("silu", "swish")  # transformers' ACT2FN maps both names to SiLU, the SwiGLU gate the decoder implements
MAX_POSITIONS = 1 << 31  # not an allocation bound (caches are sized by the prompt): keeps float/int64 math exact


def _llm_kind(llm: dict, arch: str) -> str:
    model_type = llm.get("model_type")
    for kind, prefix in (("internlm2", "InternLM2"), ("qwen2", "Qwen2"), ("qwen3", "Qwen3")):
        if arch.startswith(prefix) or model_type == kind:
            return kind
    return "llama"  # Yi-VL's language model, and any other LlamaForCausalLM-shaped config


def _rope(llm: dict, where: str, head_dim: int) -> tuple[float, float | None]:
    """(rope_theta, dynamic NTK factor or None). transformers 4.x writes rope_theta / rope_scaling; 5.x writes
    both into rope_parameters ({"rope_type": "default", "rope_theta": ...})."""
    rope = optional(llm, "rope_parameters", where, dict, {})
    if llm.get("rope_theta") is not None:
        theta = real(llm, "rope_theta", where, above=0.0)
    else:  # every class default is 10000
        theta = real(rope, "rope_theta", f"{where}.rope_parameters", 1e4, above=0.0)
    scaling, scaling_where = optional(llm, "rope_scaling", where, dict, None), f"{where}.rope_scaling"
    if scaling is None:
        scaling, scaling_where = rope, f"{where}.rope_parameters"
    for table, table_where in ((llm, where), (scaling, scaling_where)):
        if real(table, "partial_rotary_factor", table_where, 1.0) != 1.0:
            raise ConfigError(
                f"config.json: {table_where}.partial_rotary_factor = {table['partial_rotary_factor']!r} is not "
                "supported: minisail rotates every channel of a head (accepted: 1.0)"
            )
    key = "rope_type" if scaling.get("rope_type") is not None else "type"
    kind = optional(scaling, key, scaling_where, str, "default")
    if kind == "default":
        return theta, None
    if kind != "dynamic":
        raise ConfigError(
            f"config.json: {scaling_where} type {kind!r} is not supported (only 'dynamic', InternLM2's dynamic "
            "NTK, or none)"
        )
    if head_dim <= 2:  # dynamic NTK raises the base to the power head_dim / (head_dim - 2)
        raise ConfigError(f"config.json: {where}: dynamic NTK RoPE needs a head_dim above 2, not {head_dim}")
    return theta, real(scaling, "factor", scaling_where, above=1.0)


def decoder_config(llm: dict, where: str = "llm_config") -> DecoderConfig:
    """A DecoderConfig from a Qwen2 / Qwen3 / InternLM2 / Llama text config (see the key table above)."""
    arch = architecture(llm)
    kind = _llm_kind(llm, arch)
    hidden, heads = positive(llm, "hidden_size", where), positive(llm, "num_attention_heads", where)
    kv_heads = positive(llm, "num_key_value_heads", where, heads)  # absent: plain multi-head attention
    if heads % kv_heads:
        raise ConfigError(f"config.json: {where} has {heads} attention heads, not a multiple of {kv_heads} kv heads")
    if kind == "qwen3":  # Qwen3 states head_dim; Qwen3Config's class default is 128, not hidden / heads
        head_dim = positive(llm, "head_dim", where, 128)
    elif llm.get("head_dim") is not None:  # newer Llama / Qwen2 code honours an explicit head_dim
        head_dim = positive(llm, "head_dim", where)
        if kind == "internlm2" and head_dim * heads != hidden:
            raise ConfigError(
                f"config.json: {where}.head_dim {head_dim} != hidden_size {hidden} / {heads} heads: InternLM2's code "
                "ignores head_dim and splits hidden_size into the heads, so the two must agree"
            )
    elif hidden % heads:
        raise ConfigError(f"config.json: {where}.hidden_size {hidden} is not divisible by {heads} heads")
    else:
        head_dim = hidden // heads
    if head_dim % 2 or heads * head_dim > MAX_SIZE:
        raise ConfigError(
            f"config.json: {where}: head_dim {head_dim} x {heads} heads is not supported: RoPE rotates channel pairs "
            f"(accepted: an even head_dim, at most {MAX_SIZE} channels over all heads)"
        )
    rope_theta, dynamic_factor = _rope(llm, where, head_dim)
    num_layers = positive(llm, "num_hidden_layers", where)
    choice(llm, "hidden_act", where, SILU, "silu", why=": the decoder's SwiGLU gate is SiLU (every class default)")
    if flag(llm, "use_sliding_window", where, False):
        raise ConfigError(
            f"config.json: {where}.use_sliding_window = true is not supported: minisail's attention sees the whole "
            "context in every layer (accepted: false, as in every Qwen2.5 / Qwen3 release)"
        )
    layer_types = optional(llm, "layer_types", where, list, None)
    if layer_types is not None and (len(layer_types) != num_layers or set(layer_types) - {"full_attention"}):
        raise ConfigError(
            f"config.json: {where}.layer_types must be {num_layers} x 'full_attention' (one per layer; minisail has "
            f"no sliding-window layers), not {layer_types!r:.200}"
        )
    if flag(llm, "mlp_bias", where, False):
        raise ConfigError(f"config.json: {where}.mlp_bias = true is not supported (accepted: false; no MLP biases)")
    if kind == "internlm2":
        if flag(llm, "bias", where, False):
            raise ConfigError(f"config.json: {where}.bias = true (InternLM2 with biases) is not supported")
        qkv_bias = False
    elif kind == "qwen2":
        qkv_bias = True  # Qwen2 always has q/k/v biases (and none on o_proj)
    else:
        if flag(llm, "attention_bias", where, False):
            raise ConfigError(f"config.json: {where}.attention_bias = true is not supported for {arch or 'this model'}")
        qkv_bias = False
    return DecoderConfig(
        vocab_size=positive(llm, "vocab_size", where),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=positive(llm, "intermediate_size", where),
        rms_norm_eps=epsilon(llm, "rms_norm_eps", where),
        rope_theta=rope_theta,
        max_position_embeddings=positive(llm, "max_position_embeddings", where, limit=MAX_POSITIONS),
        rope_dynamic_factor=dynamic_factor,
        qkv_bias=qkv_bias,
        qk_norm=kind == "qwen3",
        tie_word_embeddings=flag(llm, "tie_word_embeddings", where, False),
        architecture=arch,
    )
