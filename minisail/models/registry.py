"""From a config.json to a model family, and from a model back to its family.

A family is a module. Each of FAMILIES exports the same names (FAMILY_API), so `minisail.load`, chat() and a
Session run every family through one path with no per-family branch:

    NAME                          "internvl", "mono-internvl", "sailvl2", "yi-vl" (also each model's `family`)
    detect(config) -> bool        does this config.json describe the family? (its sub-configs, not model_type)
    complete_config(folder, config) -> dict     config.json plus the files it points to (Yi-VL's vision folder)
    parse(config) -> parsed       the family's checked config dataclass: every bad value raises here
    layer_counts(parsed)          the blocks the checkpoint must number (family_parts.LayerCount)
    open_tensors(folder, config)  the checkpoint's tensor table, headers only
    build(parsed) -> nn.Module    the model, on the current (meta) device
    weight_map(parsed) -> KeyMap  official names <-> the model's parameters (checkpoint/keymaps.py)
    check_dtype(dtype)            a ConfigError for a dtype the family cannot run in (Mono-InternVL: float16)
    pixel_values(image, parsed, min_tiles, max_tiles)   an image as the vision tower takes it
    chat_template(parsed) -> Template                   the conversation template upstream chat() uses
    encode_prompt(model, tokenizer, pixel_values, questions, *, history, num_patches_list, template, batch)
                                  chat()'s / batch_chat()'s prompt: (queries, input_ids, attention_mask)
    add_image_placeholders(question, images_before, new_images)   where a Session's new images go

Families are told apart by their sub-configs, not the top-level model_type: SAIL-VL-2B and SAIL-VL2 both say
`sailvl`, InternVL-Chat-V1-5 and Mono-InternVL both say `internvl_chat`, with different towers and LLMs. The
first family whose `detect` accepts the config wins.
"""

from __future__ import annotations

from types import ModuleType

from minisail.errors import CheckpointError, ConfigError
from minisail.models import internvl, mono, sailvl2, yivl
from minisail.models.family_parts import LayerCount, sub_config_kinds

FAMILIES: list[ModuleType] = [internvl, mono, sailvl2, yivl]  # in detection order

FAMILY_API = (
    "NAME",
    "detect",
    "complete_config",
    "parse",
    "layer_counts",
    "open_tensors",
    "build",
    "weight_map",
    "check_dtype",
    "pixel_values",
    "chat_template",
    "encode_prompt",
    "add_image_placeholders",
)


def detect_family(config: dict) -> ModuleType:
    for family in FAMILIES:
        if family.detect(config):
            return family
    vision, llm = sub_config_kinds(config)
    what = f"vision {vision or '?'}, language model {llm or '?'}, model_type {config.get('model_type')!r}"
    raise ConfigError(
        f"config.json describes a model minisail does not support ({what}); supported: "
        "SAIL-VL-2B, SAIL-VL2, InternVL-Chat-V1-5 (+Int8), Mono-InternVL-2B, Yi-VL"
    )


def family_of(model) -> ModuleType:
    """The family module of a built model: the one whose NAME is the model class's `family`."""
    for family in FAMILIES:
        if family.NAME == model.family:
            return family
    raise ConfigError(f"{type(model).__name__}.family = {model.family!r} names no family of models/registry.py")


def check_layer_counts(family: ModuleType, parsed, tensors) -> None:
    """A CheckpointError unless every LayerCount of the family matches the checkpoint's own keys (headers only)."""
    keys = list(tensors.keys())
    counts: list[LayerCount] = family.layer_counts(parsed)
    for count in counts:
        found = count.found(keys)
        if found != count.expected:
            raise CheckpointError(
                f"{tensors.description}: config.json says {count.key} = {count.expected}, but the checkpoint numbers "
                f"{found} under {count.prefix!r}: the config does not match the weights"
            )
