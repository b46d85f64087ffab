"""Int4 weight-only linear layers: group-wise 4-bit weights with a scale and a zero per group; activations stay float.

`Int4Linear` holds, for a Linear of `in` inputs and `out` outputs, with G = GROUP_SIZE inputs per group:
- `weight` uint8 [out, in/2]: two 4-bit codes q in 0..15 per byte;
- `scale_zeros` bf16 [in/G, out, 2]: for group g of row n, (scale, zero) = scale_zeros[g, n];
and computes y = x @ W^T + bias with W[n, k] = (q[n, k] - 8) * scale + zero  (the group of k being k // G).

This is torch's asymmetric int4 format (the one `_weight_int4pack_mm_for_cpu` reads; torchao's int4 weight-only).
`quantize_groups` maps each group's [min, max] onto the 16 codes: scale = (max - min) / 15 and zero = the value of
code 8 (min + 8 * scale), both rounded to bf16 first and the codes rounded against the rounded values, so the
stored bf16 scales add no error of their own. GROUP_SIZE = 64: 4 bits + 32 bits per 64 weights = 4.5 bits per
weight, the size of llama.cpp's Q4_0 (32 weights + one fp16 scale), with about its error: relative error of a
matmul with random weights, this rule vs Q4_0's, 8.9% vs 8.6% (Gaussian), 13.2% vs 12.9% (Student-t 3, heavy
tails), 6.3% vs 6.5% (uniform). Groups of 32 would give 7.8% (Gaussian) at 5 bits, 128 10.0% at 4.25 bits; the
kernel runs all three at about the same speed per byte. A Linear whose `in` is not a multiple of GROUP_SIZE is left
as it is (int4_checkpoint.py).

Two layouts of `weight`, one per path (the load hook picks one per weight; `kernel_layout` says which):
- the kernel's: `torch.ops.aten._weight_int4pack_mm_for_cpu` (PyTorch's CPU int4 matmul, the "tinygemm" kernel) reads
  a layout that depends on the CPU (blocks of 64 rows with AVX-512, 32 with AVX2), written by
  `_convert_weight_to_int4pack_for_cpu`. It dequantises each weight in fp32 (code * scale + zero, one FMA), multiplies
  in fp32 and rounds the output once to bf16. It is vectorised for bf16 activations only (fp32/fp16 run a scalar loop
  30-60x slower), so it is used for CPU models loaded in bf16, where the load hook has checked, once per weight shape
  on the running machine, that it runs and agrees with the plain definition (`_int4pack_works`). Then the plain layout
  is not kept (the kernel layout is what this process can read). How many rows of x decide who reads it. The kernel
  streams the weight once per few rows of x, dequantising it again each time: ideal at decode (1 row), compute-bound
  at prefill (measured on a quiet Zen 5, one thread, 286 rows: 17920x1536 143 ms against the bf16 Linear's 47,
  1536x8960 65 against 29). So from MANY_ROWS rows on, `kernel_layout_matmul` reads the kernel's layout back
  (fast/int4_layout.py; the unpacking that gave this weight's codes back exactly at load, `kernel_unpack`),
  dequantises a block of rows at a time into reused buffers exactly as the plain path does and runs one F.linear per
  block (oneDNN's bf16 GEMM, AMX where the CPU has it): the plain path's numbers, bit for bit, in ~1 ns per weight
  (one thread) plus the GEMM: 2.8-5x faster than the kernel at 286 rows with one thread, 1.7-3.4x with two (busy
  machine, orientation only). Where bf16 is not native (`packing_support()`, e.g. AVX2) the blocks stay fp32 and so do
  the products, the output rounded once to bf16 as fast/upcast.py does (with torch, oneDNN and MKL held to AVX2:
  1.4-1.7x faster than the kernel). Below MANY_ROWS the kernel wins (crossover measured at 64-96 rows), and it runs
  wherever no unpacking was found.
- the plain one: byte j of row n holds q[n, 2j] (low nibble) and q[n, 2j+1] (high nibble). `blocked_int4_matmul`
  dequantises a block of rows at a time in fp32, rounds it to x's dtype and runs F.linear: `reference_int4_linear`
  computed blockwise. Every other case runs it (fp32/fp16 models, other devices, a kernel that fails its probe).
The two differ only by float rounding: the plain path rounds the dequantised weights to bf16, the kernel keeps
them fp32 (measured: within bf16 output rounding). Inference only: the weights are frozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minisail.errors import MinisailError
from minisail.fast.int4_layout import KernelLayout, find_kernel_layout, unpack_codes, unpack_kernel_rows
from minisail.fast.int8 import swap_linears
from minisail.fast.memory import scratch_buffer
from minisail.fast.packing import packing_support

GROUP_SIZE = 64  # inputs per (scale, zero) group; see the module docstring for why 64
QUANTIZE_BLOCK_ROWS = 1024  # rows quantised (or repacked) at a time: a multiple of the kernel's 64-row blocks
BLOCK_BYTES = 8 << 20  # dequantised float32 rows per matmul (both float paths; a multiple of 64 rows)
MANY_ROWS = 80  # rows of x from which the kernel-layout weight is dequantised block by block (measured crossover)
PROBE_ROWS = 128  # output rows at each end of a weight that the kernel probe checks against the definition


def quantize_groups(weight: torch.Tensor, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """A float [out, in] weight -> (codes uint8 [out, in/2] in the plain layout, scale_zeros bf16 [out, in/G, 2]).

    The scale_zeros come row-major here (one entry per row, so a fused Linear's parts join by rows like the
    weights); `Int4Linear.scale_zeros` is their transpose [in/G, out, 2]. A block of rows at a time goes through
    fp32: quantising one matrix never holds a float32 copy of all of it."""
    rows, columns = weight.shape
    if columns % group_size:
        raise ValueError(f"in_features {columns} is not a multiple of the int4 group size {group_size}")
    codes = torch.empty(rows, columns // 2, dtype=torch.uint8, device=weight.device)
    scale_zeros = torch.empty(rows, columns // group_size, 2, dtype=torch.bfloat16, device=weight.device)
    for start in range(0, rows, QUANTIZE_BLOCK_ROWS):
        block = weight[start : start + QUANTIZE_BLOCK_ROWS].to(torch.float32, copy=True)  # the one temporary
        groups = block.view(block.shape[0], -1, group_size)  # [r, in/G, G]
        low, high = torch.aminmax(groups, dim=-1)  # [r, in/G]
        scale = ((high - low) / 15).to(torch.bfloat16).float()
        zero = (low + 8 * scale).to(torch.bfloat16).float()  # the value code 8 stands for
        steps = 1 / scale.clamp_min(torch.finfo(torch.float32).tiny)  # a constant group: every code means `zero`
        q = groups.sub_(zero[..., None]).mul_(steps[..., None]).round_().add_(8).clamp_(0, 15)
        q = q.to(torch.uint8).view(block.shape[0], columns)
        codes[start : start + QUANTIZE_BLOCK_ROWS] = q[:, 0::2] | (q[:, 1::2] << 4)
        scale_zeros[start : start + QUANTIZE_BLOCK_ROWS] = torch.stack([scale, zero], dim=-1).to(torch.bfloat16)
    return codes, scale_zeros


def dequantize(codes: torch.Tensor, scale_zeros_rows: torch.Tensor) -> torch.Tensor:
    """The definition, in fp32: plain codes [r, in/2] and their scale_zeros [r, in/G, 2] -> W float32 [r, in]."""
    rows, groups = scale_zeros_rows.shape[:2]
    q = unpack_codes(codes).view(rows, groups, -1).float()  # [r, in/G, G]
    pairs = scale_zeros_rows.float()
    return torch.addcmul(pairs[..., 1:], q - 8, pairs[..., :1]).reshape(rows, -1)  # (q - 8) * scale + zero


def reference_int4_linear(x: torch.Tensor, codes, scale_zeros, bias=None) -> torch.Tensor:
    """The plain definition: dequantise in fp32, round once to x's dtype, an ordinary Linear. `scale_zeros` is
    the module's [in/G, out, 2]; `codes` the plain layout."""
    return F.linear(x, dequantize(codes, scale_zeros.transpose(0, 1)).to(x.dtype), bias)


def block_rows(in_features: int) -> int:
    """Weight rows dequantised per matmul: BLOCK_BYTES of float32, whole 64-row blocks of the kernel's layout. Both
    paths use it: oneDNN's bits depend on the shape of each product, so equal blocks give equal numbers."""
    return max(64, BLOCK_BYTES // (in_features * 4) // 64 * 64)


def blocked_int4_matmul(x: torch.Tensor, codes: torch.Tensor, scale_zeros: torch.Tensor) -> torch.Tensor:
    """x [M, in] @ W^T -> [M, out], dequantising a block of rows of the plain layout at a time."""
    rows = block_rows(codes.shape[1] * 2)
    parts = []
    for start in range(0, codes.shape[0], rows):
        pairs = scale_zeros[:, start : start + rows].transpose(0, 1)  # [r, in/G, 2]
        parts.append(F.linear(x, dequantize(codes[start : start + rows], pairs).to(x.dtype)))
    return torch.cat(parts, dim=-1)


def kernel_layout_matmul(x: torch.Tensor, packed: torch.Tensor, scale_zeros, layout: KernelLayout) -> torch.Tensor:
    """x [M, in] bf16 @ W^T -> [M, out] bf16 from the kernel's layout, a block of rows at a time into reused
    buffers: the plain path's numbers (the same blocks, the same dequantisation, bit for bit). Where bf16 is not
    native (`packing_support()`), the blocks stay float32 and so do the products, rounded once to bf16."""
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    rows = block_rows(in_features)
    native = packing_support().available
    inputs = x if native else x.float()  # [M, in]
    y = torch.empty(x.shape[0], out_features, dtype=x.dtype)  # [M, out]
    for start in range(0, out_features, rows):
        r = min(rows, out_features - start)
        weights = scratch_buffer(r * in_features, torch.float32, x.device).view(r, in_features)
        unpack_kernel_rows(packed[start : start + r], layout, weights)  # q - 8, exact
        pairs = scale_zeros[:, start : start + r].float()  # [in/G, r, 2]
        scale, zero = (pairs[..., i].t().contiguous()[..., None] for i in (0, 1))  # [r, in/G, 1] each
        # (q - 8) * scale is exact in fp32 (4 bits times bf16's 8), so + zero rounds once, as in `dequantize`
        weights.view(r, scale.shape[1], -1).mul_(scale).add_(zero)
        if native:
            weights = scratch_buffer(r * in_features, x.dtype, x.device).view(r, in_features).copy_(weights)
        y[:, start : start + r] = F.linear(inputs, weights)
    return y


def pack_for_kernel(codes: torch.Tensor, scale_zeros: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """Plain-layout codes [out, in/2] -> the CPU kernel's layout [out, in/2], or None where the kernel cannot run
    this shape here (`_int4pack_works`). Packed a block of rows at a time: the layout is blocked by 64 or 32 rows,
    so blocks of QUANTIZE_BLOCK_ROWS rows pack independently (the probe checks the result)."""
    key = (codes.shape[0], codes.shape[1] * 2, group_size)
    if _int4pack_checked.get(key) is False:
        return None
    try:
        blocks = [
            torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_codes(block).to(torch.int32), 2)
            for block in codes.split(QUANTIZE_BLOCK_ROWS)
        ]
        packed = torch.cat(blocks).view(codes.shape)
    except RuntimeError:  # e.g. `out` not a multiple of 16, or an op this build lacks
        _int4pack_checked[key] = False
        return None
    return packed if _int4pack_works(key, codes, packed, scale_zeros) else None


_int4pack_checked: dict[tuple[int, int, int], bool] = {}  # (out, in, group) -> does the kernel run and agree here?


def _int4pack_works(key, codes: torch.Tensor, packed: torch.Tensor, scale_zeros: torch.Tensor) -> bool:
    """Decided by trying, once per weight shape: does `_weight_int4pack_mm_for_cpu` on `packed` agree with the
    definition on the plain `codes` (two random bf16 rows; PROBE_ROWS outputs at each end of the weight, so the
    first and the last, possibly partial, row blocks of the layout; within 1% of the largest output, bf16's
    output rounding being 0.4%)? Where it raises or disagrees, the plain path runs."""
    if key not in _int4pack_checked:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(2, key[1], generator=generator).to(torch.bfloat16)
        out = codes.shape[0]
        rows = torch.cat([torch.arange(min(PROBE_ROWS, out)), torch.arange(max(out - PROBE_ROWS, 0), out)])
        try:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, key[2], scale_zeros).float()[:, rows]
            expected = F.linear(x.float(), dequantize(codes[rows], scale_zeros[:, rows].transpose(0, 1)))
            _int4pack_checked[key] = bool(torch.isfinite(y).all()) and bool(
                (y - expected).abs().max() <= 1e-2 * expected.abs().max().clamp_min(1e-6)
            )
        except RuntimeError:
            _int4pack_checked[key] = False
    return _int4pack_checked[key]


def kernel_note() -> str:
    """What int4's CPU kernel does on this CPU, in words (for the fast-path reasons a session logs).

    `_weight_int4pack_mm_for_cpu` has an AVX-512 loop and a plain one. Measured on the Zen 5 with torch held to AVX2
    (ATEN_CPU_CAPABILITY=avx2), one row times a 17920 x 1536 weight, 2 threads: 1.40 ms (9.6 GB/s of codes) against
    0.35 ms with AVX-512; the whole decode step of SAIL-VL-2B's language model, int4 11.99 tok/s against int8's
    21.64 (fbgemm's integer kernel, fast/int8_dot.py). So where torch runs AVX2 kernels, int8 is the faster format."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX2":
        return (
            "int4 on torch's int4 kernel, which has no AVX2 loop (CPU capability AVX2): measured 4x slower per weight "
            "than with AVX-512, and int8 (quantize='int8') decodes about 1.8x faster than int4 on such CPUs"
        )
    return f"int4 on torch's int4 kernel (CPU capability {capability})"


class Int4Linear(nn.Module):
    """A Linear with group-wise int4 weights (see the module docstring); `kernel_layout`: `weight` is in the CPU
    kernel's layout (set by the load hook), else in the plain one."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, group_size=GROUP_SIZE):
        super().__init__()
        if in_features % group_size or group_size % 2:
            raise ValueError(f"in_features {in_features} is not a multiple of the int4 group size {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        weight = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device)
        self.weight = nn.Parameter(weight, requires_grad=False)
        sz = torch.empty(in_features // group_size, out_features, 2, dtype=torch.bfloat16, device=device)
        self.register_buffer("scale_zeros", sz)
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None
        self.kernel_layout = False
        self.kernel_unpack: KernelLayout | None = None  # the kernel layout's unpacking (int4_layout.py), if found

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.kernel_layout:
            if rows.device.type != "cpu":
                raise MinisailError(
                    "this Int4Linear holds its weight in the CPU kernel's layout; load the model on the device it "
                    "runs on (minisail.load(..., device=...)) instead of moving it"
                )
            rows = rows.to(torch.bfloat16).contiguous()
            if rows.shape[0] >= MANY_ROWS and self.kernel_unpack is not None:
                y = kernel_layout_matmul(rows, self.weight, self.scale_zeros, self.kernel_unpack).to(x.dtype)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.weight, self.group_size, self.scale_zeros).to(
                    x.dtype
                )
        else:
            y = blocked_int4_matmul(rows, self.weight, self.scale_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def plain_codes(self) -> torch.Tensor:
        """The codes in the plain layout uint8 [out, in/2], from either layout (the kernel's read back)."""
        if not self.kernel_layout:
            return self.weight.detach()
        if self.kernel_unpack is None:
            raise MinisailError(
                "this Int4Linear's weight is in a layout of torch's int4 kernel that minisail cannot read back "
                f"(torch {torch.__version__}): load the model with dtype=torch.float32 to save or move its weights"
            )
        signed = unpack_kernel_rows(
            self.weight.detach(),
            self.kernel_unpack,
            torch.empty(self.weight.shape[0], self.in_features, dtype=torch.int8),
        )
        q = signed.view(torch.uint8).add_(8)  # q - 8 in two's complement, plus 8: the codes 0..15
        return q[:, 0::2] | (q[:, 1::2] << 4)

    # A state dict holds the plain layout whatever this machine's kernel reads: the kernel's layout differs between
    # CPUs (64-row blocks with AVX-512, 32 with AVX2), and a state dict saved on one must mean the same on another.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.plain_codes()

    def _load_from_state_dict(self, state_dict, prefix, *args):
        loading = self.__dict__.pop("layout_from_loader", None)  # (kernel_layout, kernel_unpack) from the load hook
        super()._load_from_state_dict(state_dict, prefix, *args)
        if loading is not None:  # minisail.load: the weight comes in the layout its hook chose (int4_checkpoint.py)
            self.kernel_layout, self.kernel_unpack = loading
        elif self.kernel_layout and prefix + "weight" in state_dict:  # a state dict: plain codes, repacked as at load
            codes = self.weight.detach().clone()
            packed = pack_for_kernel(codes, self.scale_zeros, self.group_size)
            self.kernel_layout = packed is not None
            self.kernel_unpack = None if packed is None else find_kernel_layout(codes, packed)
            self.weight.data = codes if packed is None else packed

    def _apply(self, fn, recurse=True):
        scale_zeros = self.scale_zeros
        super()._apply(fn, recurse)
        if self.scale_zeros.dtype != torch.bfloat16:  # the pairs stay bf16: their exact values, what the kernel reads
            self.scale_zeros = scale_zeros.to(self.scale_zeros.device)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"group_size={self.group_size}, kernel_layout={self.kernel_layout}"
        )


def swap_in_int4_linears(model: nn.Module, names: list[str]) -> None:
    """Replace the nn.Linear modules called `names` by Int4Linear of the same shape (on the meta-device model
    before loading, so the loader fills int4 weights directly)."""
    swap_linears(model, names, Int4Linear)
