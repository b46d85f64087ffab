"""Reading config.json: `read_config` (the file, checked) and the typed readers every config dataclass uses.

Each config is parsed beside its dataclass by a `from_config(d, where)` classmethod (`InternViTConfig`,
`SailViTConfig`, `CLIPVisionConfig`, `PatchEmbedConfig`, `DecoderConfig`, and the families' chat-level configs in
minisail/models/); this module holds only what they share, and imports no model module.

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


def vit_sizes(config: dict, where: str) -> dict[str, int]:
    """The six sizes every ViT config states, checked: hidden_size, num_heads (dividing it), num_layers,
    intermediate_size, image_size, patch_size (as keyword arguments of a tower's config dataclass)."""
    hidden, heads = width_and_heads(config, where)
    image_size, patch_size = image_and_patch(config, where)
    return dict(
        hidden_size=hidden,
        num_heads=heads,
        num_layers=positive(config, "num_hidden_layers", where),
        intermediate_size=positive(config, "intermediate_size", where),
        image_size=image_size,
        patch_size=patch_size,
    )


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
