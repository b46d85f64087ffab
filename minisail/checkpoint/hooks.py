"""What happens to the checkpoint's tensors on their way into the model: the loader's hook interface.

The strict core (checkpoint/loader.py) decides *which* official tensors make each parameter and checks every
shape; hooks decide *how* the values travel. For each parameter the core asks the hooks, in order:

1. `prepare(model, tensors)`, once before anything is read (e.g. start reading the files ahead, fast/readahead.py);
2. `parts(name, slot, rule, sources, tensors)`: the first hook to return a list of `Parts` reads them (an Int8Linear's
   weight and scale, fast/int8_checkpoint.py); if none does, the core takes zero-copy views of the sources;
3. `convert(parts, value)` on each joined, shape-checked value, every hook in turn (cast to the load dtype and move
   to the device: `CastTo` below; give back the mapped pages: fast/memory.py);
4. `after(ok)`, once the model is filled (ok) or the fill failed.

A hook only transforms values: it cannot skip a check, and the core assigns nothing until every parameter is made.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from minisail.checkpoint.keymaps import Rule
from minisail.checkpoint.source import TensorSource


@dataclass
class Parts:
    """The tensors one parameter (or buffer) of the model is joined from, and how to treat the result."""

    name: str  # the parameter they become
    keys: list[str]  # the official keys they were read from, in the rule's order (named by every error)
    tensors: list[torch.Tensor]
    shape: tuple[int, ...]  # the parameter's shape in the model built from config.json
    dtype: torch.dtype  # the parameter's dtype in that model (on the meta device)
    views: bool = True  # the tensors are zero-copy views into the files, whose pages can be given back
    cast: bool = True  # floats take the load dtype (False: an Int8Linear's int8 rows and float32 scale)
    also_used: list[str] = field(default_factory=list)  # further keys consumed with these (bitsandbytes' SCB)


class LoadHook:
    """One step of the values' way into the model; every method does nothing unless overridden."""

    def prepare(self, model: nn.Module, tensors: TensorSource) -> None:
        pass

    def parts(self, name: str, slot: torch.Tensor, rule: Rule, sources: list[str], tensors: TensorSource):
        """A list of `Parts` for parameter `name` (and any parameter filled with it), or None: not mine."""
        return None

    def convert(self, parts: Parts, value: torch.Tensor) -> torch.Tensor:
        return value

    def after(self, ok: bool) -> None:
        pass


class CastTo(LoadHook):
    """Floats to `dtype` (integers keep the model's dtype), everything to `device`, as each value is made: a
    value that already matches stays the view it is; a model converted on its way to a GPU never exists whole in
    host memory."""

    def __init__(self, dtype: torch.dtype, device=None):
        self.dtype = dtype
        self.device = None if device is None or torch.device(device).type == "cpu" else torch.device(device)

    def convert(self, parts: Parts, value: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype if parts.cast and parts.dtype.is_floating_point else parts.dtype
        return value.to(device=self.device, dtype=dtype)  # a no-op when both already match


def shares_memory(value: torch.Tensor, tensors: list[torch.Tensor]) -> bool:
    """Is `value` (still) in the same CPU storage as one of `tensors`, e.g. a view into a mapped file?"""
    if value.device.type != "cpu" or not value.numel():
        return False
    own = value.untyped_storage().data_ptr()
    return any(t.numel() and t.device.type == "cpu" and t.untyped_storage().data_ptr() == own for t in tensors)
