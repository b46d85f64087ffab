"""Where the 4-bit codes of an `Int4Linear` (fast/int4.py) sit in memory, and reading them back.

Two layouts hold the codes q (0..15) of a weight [out, in], two per byte:
- the plain one, uint8 [out, in/2]: byte j of row n holds q[n, 2j] (low nibble) and q[n, 2j+1] (high nibble);
- the CPU int4 kernel's (`torch.ops.aten._weight_int4pack_mm_for_cpu`, written by
  `_convert_weight_to_int4pack_for_cpu`; PyTorch's aten/src/ATen/native/cpu/int4mm_kernel.cpp). Its bytes come in
  blocks of B output rows, each block an array [in, B/2] (one run of B/2 bytes per input k), one block after the
  other in row order; B and the pairing of rows inside a byte depend on the CPU dispatch of the running torch:
  AVX-512 builds: B = 64, byte j (j < 32) of input k holds row j (low) and row j + 32 (high);
  AVX2 builds: B = 32, byte j (j < 16) holds row j and row j + 16;
  the non-vectorised build: B = 32, byte j holds rows 2j and 2j + 1 ("pairs").
  A last, partial block (out not a multiple of B: 16, 32 or 48 rows) is always in pairs.

Since which one the running torch writes depends on the CPU (and on ATEN_CPU_CAPABILITY), nothing here assumes
one: at load, `find_kernel_layout` tries each of `CANDIDATES` on a packed weight against its plain codes and
returns the one whose unpacking gives them back exactly (or None; then the kernel stays the only reader of that
weight).

`unpack_kernel_rows` reads a block of rows of the kernel's layout back into row-major signed codes q - 8, as
floats [rows, in]: the many-row path of fast/int4.py dequantises those. Row-major like the plain path's blocks,
because oneDNN's bits depend on the weight's memory layout (measured: [in, out] and [out, in] weights can differ
in the last bit), and the two paths are to agree bit for bit. The kernel's blocks are arrays [in, B/2], so their
bytes are transposed first (bytes are the cheapest thing to move: half a byte per weight), then the nibbles are
split with shifts on int8 (q ^ 8 as a signed nibble is q - 8), and converted once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class KernelLayout(NamedTuple):
    """One candidate for the kernel's layout: blocks of `block_rows` output rows; in a full block, byte j holds row j
    and row j + block_rows/2 (`halves`) or rows 2j and 2j + 1 (not `halves`)."""

    block_rows: int
    halves: bool


CANDIDATES = (KernelLayout(64, True), KernelLayout(32, True), KernelLayout(32, False))  # AVX-512, AVX2, scalar
PARTIAL_ROWS = 16  # a partial last block is a multiple of this many rows (the kernel refuses other `out`)
CHECK_BLOCK_ROWS = 256  # rows compared at a time by find_kernel_layout (a multiple of every block): ~10 MB


def unpack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Plain-layout bytes [r, in/2] -> the 4-bit codes uint8 [r, in] (0..15)."""
    return torch.stack([codes & 15, codes >> 4], dim=-1).view(codes.shape[0], -1)


def _split_nibbles(blocks: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> None:
    """blocks uint8 [nb, in, h] (the kernel's arrays) -> low/high nibbles as q - 8, written into the views
    low/high [nb, h, in] (any dtype)."""
    flipped = blocks.transpose(1, 2).contiguous().bitwise_xor_(0x88).view(torch.int8)  # [nb, h, in]: nibbles q ^ 8
    high.copy_(flipped >> 4)  # arithmetic shift: the high nibble's q - 8
    low.copy_((flipped << 4) >> 4)  # the low nibble moved up, then down: its q - 8


def unpack_kernel_rows(packed: torch.Tensor, layout: KernelLayout, out: torch.Tensor) -> torch.Tensor:
    """Rows of the kernel's layout -> their signed codes q - 8, row-major, written into `out` [r, in] (any dtype,
    contiguous). `packed` uint8 [r, in/2] is the slice of the module's weight for rows [s, s + r) with s a multiple
    of layout.block_rows (the kernel's blocks follow each other in row order, so such a slice is whole blocks, the
    last one possibly partial)."""
    rows, in_features = out.shape
    step = layout.block_rows
    full = rows // step * step
    flat = packed.reshape(-1)
    if full:
        blocks = flat[: full * in_features // 2].view(full // step, in_features, step // 2)
        if layout.halves:
            grouped = out[:full].view(full // step, 2, step // 2, in_features)  # [nb, low/high, B/2, in]
            _split_nibbles(blocks, grouped[:, 0], grouped[:, 1])
        else:
            grouped = out[:full].view(full // step, step // 2, 2, in_features)  # [nb, B/2, low/high, in]
            _split_nibbles(blocks, grouped[:, :, 0], grouped[:, :, 1])
    if rows > full:  # the partial last block, in pairs
        tail = rows - full
        blocks = flat[full * in_features // 2 :].view(1, in_features, tail // 2)
        grouped = out[full:].view(1, tail // 2, 2, in_features)
        _split_nibbles(blocks, grouped[:, :, 0], grouped[:, :, 1])
    return out


def find_kernel_layout(codes: torch.Tensor, packed: torch.Tensor) -> KernelLayout | None:
    """The candidate whose unpacking of `packed` (the kernel's layout, uint8 [out, in/2]) gives back the plain
    `codes` [out, in/2] exactly, else None. Checked on the first and the last CHECK_BLOCK_ROWS rows (whole blocks,
    and the partial last one); the rows between are blocks the same packing call wrote the same way. Where more
    than one candidate passes (codes too regular there to tell them apart), every row decides."""
    out = codes.shape[0]
    if packed.shape != codes.shape or packed.dtype != torch.uint8 or out % PARTIAL_ROWS:
        return None
    ends = sorted({0, (out - 1) // CHECK_BLOCK_ROWS * CHECK_BLOCK_ROWS})
    passing = [layout for layout in CANDIDATES if _reads_back(codes, packed, layout, ends)]
    if len(passing) > 1:
        passing = [layout for layout in passing if _reads_back(codes, packed, layout, range(0, out, CHECK_BLOCK_ROWS))]
    return passing[0] if passing else None


def _reads_back(codes: torch.Tensor, packed: torch.Tensor, layout: KernelLayout, starts) -> bool:
    return all(torch.equal(_signed_rows(packed, s, layout), _signed_rows(codes, s, None)) for s in starts)


def _signed_rows(weight: torch.Tensor, start: int, layout: KernelLayout | None) -> torch.Tensor:
    """Rows [start, start + CHECK_BLOCK_ROWS) of `weight` in `layout` (None: the plain one): their q - 8 (int8),
    flattened and viewed as int64."""
    rows = weight[start : start + CHECK_BLOCK_ROWS]
    if layout is None:
        signed = unpack_codes(rows).view(torch.int8) - 8
    else:
        signed = unpack_kernel_rows(rows, layout, torch.empty(rows.shape[0], rows.shape[1] * 2, dtype=torch.int8))
    return signed.view(-1).view(torch.int64)  # compared 8 codes at a time (r is a multiple of 16): 7x faster
