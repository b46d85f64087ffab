"""The inverse of loading: a model's weights under the official key names, for writing checkpoints.

The tests and the benchmark write official-layout checkpoints from minisail models with it; every rule's `split`
undoes its `join`. An Int8Linear is written as bitsandbytes does: `X.weight` int8 and `X.SCB` = scale * 127
(float32).
"""

from __future__ import annotations

import torch
from torch import nn

from minisail.checkpoint.keymaps import KeyMap, bnb_scale_key
from minisail.errors import MinisailError
from minisail.fast.int4 import Int4Linear
from minisail.fast.int8 import Int8Linear
from minisail.fast.int8_dot import DotInt8Linear


def to_official_state_dict(model: nn.Module, keymap: KeyMap) -> dict[str, torch.Tensor]:
    """{official key: tensor} such that loading it through `keymap` gives back `model`'s weights."""
    if any(isinstance(module, Int4Linear) for module in model.modules()):
        raise MinisailError("an int4 model has no official checkpoint layout to write: export the float model")
    int8 = (Int8Linear, DotInt8Linear)  # a DotInt8Linear (sped up for this CPU) writes its Int8Linear's state
    int8_modules = {name for name, module in model.named_modules() if isinstance(module, int8)}
    official: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if module in int8_modules and leaf == "scale":
            rule, weights, _tied = keymap.resolve(f"{module}.weight")
            sources, value = [bnb_scale_key(w) for w in weights], value * 127
        else:
            rule, sources, _tied = keymap.resolve(name)
        for source, part in zip(sources, rule.join.split(value), strict=True):
            official[source] = part.contiguous()
    return official
