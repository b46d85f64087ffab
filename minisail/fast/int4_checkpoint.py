"""Filling `Int4Linear`s (fast/int4.py) from a float checkpoint: which Linears become int4, and the loader hook that
quantises each one as it is read.

`minisail.load(..., quantize="int4")` turns every nn.Linear inside the decoder layers (attention qkv/o, MLP
gate_up/down, Mono's visual experts) whose in_features is a multiple of GROUP_SIZE into an Int4Linear; a Linear
with another width stays as it is, in the load dtype (no real checkpoint has one; the tiny golden ones do not
either). The output head becomes int8 rows (fast/int8_checkpoint.py `head_quantized`: 4 bits would move every
logit's own row); kept float, as with int8: the embedding, the vision tower and the projector.

Each official weight is quantised straight from its memory-mapped tensor, a block of rows at a time, and its mapped
pages are given back at once: the full-precision matrix never exists in RAM, so loading peaks near the int4 size
plus the float parts. The codes and the scale/zero pairs go through the weight's `Join` as two `Parts` (both have
one entry per row), so the loader core checks every shape and fused or regrouped layers stay exact. Then, for a CPU
model in bf16, the joined weight is repacked into the CPU kernel's layout where that kernel proves itself on this
machine (fast/int4.py `pack_for_kernel`), else kept in the plain layout; and the unpacking of that layout which
gives back this weight's codes exactly is recorded for many-row calls (fast/int4_layout.py `find_kernel_layout`).
"""

from __future__ import annotations

import torch
from torch import nn

from minisail.checkpoint.hooks import LoadHook, Parts
from minisail.checkpoint.keymaps import Rule
from minisail.checkpoint.source import TensorSource
from minisail.errors import CheckpointError
from minisail.fast.int4 import GROUP_SIZE, Int4Linear, pack_for_kernel, quantize_groups
from minisail.fast.int4_layout import find_kernel_layout


def int4_linear_names(model: nn.Module) -> list[str]:
    """The decoder layers' nn.Linear modules that become Int4Linear (in_features a multiple of GROUP_SIZE)."""
    prefix = next(name for name, module in model.named_modules() if module is model.language_model.layers)
    return [
        f"{prefix}.{name}"
        for name, module in model.language_model.layers.named_modules()
        if isinstance(module, nn.Linear) and module.in_features % GROUP_SIZE == 0
    ]


class Int4Weights(LoadHook):
    """Loader hook: quantises each Int4Linear's official float weights as they are read (codes + scale/zero pairs),
    then picks the layout: the CPU kernel's (bf16 on the CPU, kernel proven here) or the plain one."""

    def __init__(self, dtype: torch.dtype, device=None):
        self.kernel = dtype == torch.bfloat16 and (device is None or torch.device(device).type == "cpu")

    def prepare(self, model: nn.Module, tensors: TensorSource) -> None:
        self.modules = {name: m for name, m in model.named_modules() if isinstance(m, Int4Linear)}
        self.where = tensors.description
        self.sources: dict[str, list[str]] = {}  # parameter -> the official weights it was quantised from
        self.pending: dict[str, torch.Tensor] = {}  # module -> its joined scale_zeros [in/G, out, 2], for the repack

    def parts(self, name: str, slot: torch.Tensor, rule: Rule, sources: list[str], tensors: TensorSource):
        module, _, leaf = name.rpartition(".")
        if module not in self.modules or leaf != "weight":
            return None
        group = self.modules[module].group_size
        codes, pairs = [], []
        for source in sources:
            if not tensors.dtype(source).is_floating_point:
                raise CheckpointError(
                    f"{self.where}: tensor {source!r} is {tensors.dtype(source)}; quantize='int4' quantises float "
                    "weights only"
                )
            shape = tuple(tensors.shape(source))
            if len(shape) != 2 or shape[1] % group:
                raise CheckpointError(
                    f"{self.where}: {name} is read from {source!r} with shape {list(shape)}, which is not a matrix "
                    f"of {slot.shape[1] * 2} columns: the config does not match the weights"
                )
            q, sz = quantize_groups(tensors.view(source), group)
            tensors.release(source)
            codes.append(q)
            pairs.append(sz)
        scale_zeros = f"{module}.scale_zeros"
        self.sources[name] = self.sources[scale_zeros] = sources
        rows = tuple(slot.shape[:1])
        # The pairs first: the weight's repack needs them (convert sees the parts in this order).
        return [
            Parts(scale_zeros, sources, pairs, rows + (slot.shape[1] * 2 // group, 2), torch.bfloat16, False, False),
            Parts(name, sources, codes, tuple(slot.shape), torch.uint8, views=False, cast=False),
        ]

    def convert(self, parts: Parts, value: torch.Tensor) -> torch.Tensor:
        if parts.name not in self.sources:
            return value
        module, _, leaf = parts.name.rpartition(".")
        if leaf == "scale_zeros":
            if not bool(torch.isfinite(value).all()):
                raise CheckpointError(
                    f"{self.where}: {self.sources[parts.name]} hold non-finite values: the checkpoint is corrupt"
                )
            value = self.pending[module] = value.transpose(0, 1).contiguous()  # [out, in/G, 2] -> [in/G, out, 2]
            return value
        scale_zeros = self.pending.pop(module)
        packed = pack_for_kernel(value, scale_zeros, self.modules[module].group_size) if self.kernel else None
        unpack = None if packed is None else find_kernel_layout(value, packed)  # for many-row calls
        self.modules[module].layout_from_loader = (packed is not None, unpack)  # taken as the weight is assigned
        return value if packed is None else packed
