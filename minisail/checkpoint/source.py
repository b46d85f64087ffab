"""The one interface the loader and its hooks read checkpoint tensors through: `TensorSource`.

Four classes implement it: `files.CheckpointTensors` (safetensors files, zero-copy views into private memory
maps), `torch_bin.BinTensors` (PyTorch .bin files, memory-mapped by torch.load), `files.NamespacedTensors`
(several folders seen as one, Yi-VL's main checkpoint plus its vision tower under "vit.") and
`parallel.plan.ShardedTensors` (a tensor-parallel rank's slices of another source). Sharded folders of
either format are opened through one index reader (paths.read_shards).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import torch


class TensorSource(Protocol):
    """Named checkpoint tensors: their table from the file headers, and their data on demand."""

    description: str  # what to name in an error: the folder or file

    def keys(self) -> Iterable[str]: ...

    def __contains__(self, name: str) -> bool: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def shape(self, name: str) -> list[int]: ...

    def view(self, name: str) -> torch.Tensor:
        """The tensor without copying it: a view into the mapped file (data read from disk when touched)."""
        ...

    def read(self, name: str) -> torch.Tensor:
        """A fresh copy in memory of its own (small tensors: scales, flags)."""
        ...

    def release(self, name: str) -> None:
        """Give back the resident pages of `name`'s view, once nothing uses them (a no-op where there are none)."""
        ...

    def paths(self) -> list[Path]:
        """The files behind the tensors, in order."""
        ...


def checkpoint_dtype(tensors: TensorSource) -> torch.dtype:
    """The floating dtype holding most of the checkpoint's bytes (bf16 for the official releases)."""
    totals: dict[torch.dtype, int] = {}
    for name in tensors.keys():
        dtype = tensors.dtype(name)
        if dtype.is_floating_point:
            numel = 1
            for d in tensors.shape(name):
                numel *= d
            totals[dtype] = totals.get(dtype, 0) + numel * dtype.itemsize
    return max(totals, key=totals.get) if totals else torch.float32
