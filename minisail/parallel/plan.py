"""Which rows and columns of each official tensor a tensor-parallel rank holds, and a `TensorSource` that reads
only those.

Tensor parallelism in the style of gpt-fast's `tp.py` (Megatron-LM's split): in each block the first matrix is
split by output rows (column-parallel: a rank computes only its own heads / its own MLP columns) and the second
by input columns (row-parallel: each rank's product is a partial sum of the full output), so one all-reduce per
block makes the output whole again (minisail/parallel/tensor.py). Everything else stays replicated.

A rank's slice of an official tensor is a `Slice`: a dimension and a list of [start, stop) ranges along it, in
order. One range along dim 0 is a zero-copy view into the memory-mapped file (only its own pages are ever read);
anything else (columns, or several row ranges) is copied, rank-sized, and the file's pages given back. So a rank
never holds more than its own share of any sharded tensor (plus the replicated ones), and the strict loader
checks the *per-rank* shapes and that every official tensor was used (`ShardedTensors.shape` reports the slice's
shape, not the file's).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from minisail.errors import CheckpointError, ConfigError
from minisail.llm.decoder_config import DecoderConfig


def split_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of run `index` when n items are cut into `parts` consecutive runs, the first n % parts runs
    one longer (25 InternViT-6B heads over 2 ranks: 13 + 12)."""
    size, extra = divmod(n, parts)
    start = index * size + min(index, extra)
    return start, start + size + (index < extra)


@dataclass(frozen=True)
class Slice:
    """`dim` and the [start, stop) ranges along it that one rank takes from an official tensor, in order."""

    dim: int
    ranges: tuple[tuple[int, int], ...]
    extent: int | None = None  # the whole tensor's size along `dim` that the split was planned for (the config's)

    @staticmethod
    def of(dim: int, ranges, unit: int = 1, extent: int | None = None) -> Slice:
        """Ranges in units of `unit` (a head's head_dim rows), adjacent ones merged (so a run is one view);
        `extent`, in the same units: the tensor's size along `dim` by the config (checked against the file)."""
        merged: list[tuple[int, int]] = []
        for start, stop in ranges:
            start, stop = start * unit, stop * unit
            if merged and merged[-1][1] == start:
                merged[-1] = (merged[-1][0], stop)
            elif stop > start:
                merged.append((start, stop))
        return Slice(dim, tuple(merged), None if extent is None else extent * unit)

    def is_view(self) -> bool:
        return self.dim == 0 and len(self.ranges) == 1

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.dim >= tensor.dim():  # a bias of a row-split matrix: a 1-D tensor takes the same ranges
            raise ValueError(f"cannot slice dimension {self.dim} of a {tensor.dim()}-D tensor")
        pieces = [tensor.narrow(self.dim, start, stop - start) for start, stop in self.ranges]
        if self.is_view():
            return pieces[0]  # [rows, ...] a zero-copy view: only these rows' pages are read
        return torch.cat(pieces, dim=self.dim) if len(pieces) > 1 else pieces[0].contiguous()


class ShardedTensors:
    """A `TensorSource` (checkpoint/source.py) that hands out one rank's slice of the sharded tensors.

    `shape` is the slice's (what the rank's model must match), `view` reads only the slice; a tensor with no
    slice is passed through whole (replicated). A slice that had to be copied gives the file's pages back at once.
    """

    reads_whole_files = False  # a rank reads its slices only: no read-ahead of whole files (fast/readahead.py)

    def __init__(self, base, slices: dict[str, Slice], rank: int, size: int):
        self.base, self.slices = base, slices
        self.description = f"{base.description} (tensor-parallel rank {rank} of {size})"

    def keys(self):
        return self.base.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def _slice(self, name: str) -> Slice:
        """The slice of `name`, once its whole tensor is checked along the split: one process checks every tensor
        whole against the model, a rank only its slices, so without this a config.json that contradicts the
        weights (a smaller intermediate_size or vocab_size) would load and run as another model."""
        part, whole = self.slices[name], self.base.shape(name)
        if part.extent is not None and (len(whole) <= part.dim or whole[part.dim] != part.extent):
            raise CheckpointError(
                f"{self.description}: tensor {name} has shape {tuple(whole)}, but the model's config.json asks for "
                f"{part.extent} along dimension {part.dim}: the config does not match the weights"
            )
        return part

    def shape(self, name: str) -> list[int]:
        if name not in self.slices:
            return self.base.shape(name)
        return list(self._slice(name)(torch.empty(self.base.shape(name), device="meta")).shape)

    def view(self, name: str) -> torch.Tensor:
        if name not in self.slices:
            return self.base.view(name)
        part = self._slice(name)
        value = part(self.base.view(name))
        if not part.is_view():
            self.base.release(name)  # the copy is all this rank keeps: the mapped pages can go
        return value

    def read(self, name: str) -> torch.Tensor:
        if name not in self.slices:
            return self.base.read(name)
        part = self._slice(name)
        return part(self.base.read(name)).clone()

    def release(self, name: str) -> None:
        self.base.release(name)

    def paths(self):
        return self.base.paths()


# ---------------------------------------------------------------- the decoder's split


@dataclass(frozen=True)
class DecoderShard:
    """One rank's share of a decoder: query heads [q0, q1), key/value heads [k0, k1), MLP columns [i0, i1).

    Query head h reads key/value head h // g (g = heads / kv_heads), so contiguous query heads keep their kv
    heads together. With fewer kv heads than ranks, each kv head is *replicated* on the N / kv_heads ranks whose
    query heads read it (each rank then holds one kv head)."""

    config: DecoderConfig  # the full model's
    rank: int
    size: int

    def __post_init__(self):
        c, n = self.config, self.size
        heads, kv, inter = c.num_heads, c.num_kv_heads, c.intermediate_size
        if heads % n:
            raise ConfigError(
                f"tensor parallel over {n} ranks: the language model's {heads} attention heads do not divide into "
                f"{n} equal parts; use a number of ranks that divides {heads}"
            )
        if (kv % n if kv >= n else n % kv) or inter % n:
            raise ConfigError(
                f"tensor parallel over {n} ranks: the language model's {kv} key/value heads and {inter} MLP columns "
                f"must split evenly (kv heads a multiple of the ranks, or the ranks a multiple of the kv heads, "
                f"and the MLP width a multiple of the ranks); use a number of ranks that divides both"
            )

    @property
    def q_heads(self) -> tuple[int, int]:
        per = self.config.num_heads // self.size
        return self.rank * per, (self.rank + 1) * per

    @property
    def kv_heads(self) -> tuple[int, int]:
        c = self.config
        if c.num_kv_heads >= self.size:
            per = c.num_kv_heads // self.size
            return self.rank * per, (self.rank + 1) * per
        first = self.q_heads[0] // (c.num_heads // c.num_kv_heads)  # the one kv head this rank's queries read
        return first, first + 1

    @property
    def columns(self) -> tuple[int, int]:
        per = self.config.intermediate_size // self.size
        return self.rank * per, (self.rank + 1) * per

    def local_config(self) -> DecoderConfig:
        """The config of this rank's decoder: its heads and MLP columns (head_dim, hidden size unchanged)."""
        (q0, q1), (k0, k1), (i0, i1) = self.q_heads, self.kv_heads, self.columns
        return replace(self.config, num_heads=q1 - q0, num_kv_heads=k1 - k0, intermediate_size=i1 - i0)

    def qkv_slices(self, sources: int) -> list[Slice]:
        """Rows of the official q/k/v: three matrices (Qwen2, Qwen3, Llama), or InternLM2's one `wqkv` grouped
        per kv head as [kv, g query heads + k + v, head_dim, hidden] (checkpoint/keymaps.py internlm2_wqkv)."""
        c, d = self.config, self.config.head_dim
        (q0, q1), (k0, k1) = self.q_heads, self.kv_heads
        if sources == 3:
            q, kv = c.num_heads, c.num_kv_heads
            return [Slice.of(0, [(q0, q1)], d, q), Slice.of(0, [(k0, k1)], d, kv), Slice.of(0, [(k0, k1)], d, kv)]
        g = c.num_heads // c.num_kv_heads
        ranges = []
        for k in range(k0, k1):  # this rank's query heads of group k, then k's key and value head
            group = k * (g + 2)
            first, last = max(q0, k * g) - k * g, min(q1, (k + 1) * g) - k * g
            ranges += [(group + first, group + last), (group + g, group + g + 2)]
        return [Slice.of(0, ranges, d, c.num_kv_heads * (g + 2))]

    def o_slice(self) -> Slice:
        q0, q1 = self.q_heads
        c = self.config
        return Slice.of(1, [(q0, q1)], c.head_dim, c.num_heads)  # the input columns of this rank's heads

    def mlp_slices(self) -> tuple[Slice, Slice]:
        """(rows of gate and of up, columns of down)."""
        width = self.config.intermediate_size
        return Slice.of(0, [self.columns], extent=width), Slice.of(1, [self.columns], extent=width)
