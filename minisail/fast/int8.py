"""Int8 weight-only linear layers: the weights stay int8 in memory, the activations stay float.

`Int8Linear` holds `weight` int8 [out, in] and `scale` float32 [out] (one scale per output row) and computes

    y = x @ (weight * scale[:, None])^T + bias

which is a float Linear on the dequantised weights. The int8 weights come from either
- a bitsandbytes LLM.int8 checkpoint (InternVL-Chat-V1-5-Int8): `X.weight` int8 and `X.SCB` = each row's absmax,
  so scale = SCB / 127 (fast/int8_checkpoint.py); or
- `minisail.load(..., quantize="int8")`, which quantises a float checkpoint as it is read with the same rule
  (`quantize_rows`): absmax = max |w| over the row, weight = round(w * 127 / absmax).

This is not bitsandbytes' forward: on CUDA it quantises the activations too (int8 x int8, with the columns holding
an |x| > 6 outlier in fp16). Weight-only is closer to the float model, and runs on any device.

Kernels (README "Speed and memory" has their timings, dated and tied to the machine they were measured on):
- `torch.ops.aten._weight_int8pack_mm` (PyTorch's CPU int8 weight-only matmul) is the fastest decode kernel in
  bf16, faster than the bf16 Linear. But it is a matrix-vector kernel whose cost grows with every row of x, its
  fp32 path is not vectorised, it needs the scale in x's dtype (bf16: rounded to 8 bits), and on torch 2.13 it
  returns garbage or crashes for bf16 with `in` not a multiple of 16. Hence: CPU, bf16, at most
  INT8PACK_MAX_ROWS rows, `in` % 16 == 0, and, decided by trying once per weight shape on the running machine
  (`_int8pack_works`), the kernel runs and agrees with the blocked path; anywhere it raises or disagrees, the
  blocked path runs instead. Its tiles load with aligned loads, which crash the process (torch 2.13, measured):
  x is copied where it does not start on 32 bytes, and 4 rows or more need a 16-byte aligned weight (a weight
  taken as stored can start at any byte of a mapped file: at 8 bytes off, 1-3 rows ran and 4 crashed).
- One row on the kernel's AVX-512 variant, short rows: the fold (`int8pack_fold`, `folded_int8pack_mm`). The
  kernel walks the weight 4 rows at a time and streams short rows slowly (in = 1536: 8-10 GB/s, in = 8960:
  14-19 GB/s). Viewing the weight as [out / f, f * in] (f rows side by side, no copy) against f rows of x laid
  block-diagonally gives the same sums from longer rows, for f times the arithmetic (on zeros). ms per call, one
  bf16 row, weights streamed from memory, on the Granite Rapids-class Xeon (AVX-512), 2 threads, medians of 15
  interleaved; the machine is shared and noisy (runs disagreed by up to 25%): orientation only.

      [out, in]     f  ms, unfolded -> folded
      8192x1024     4  1.24 -> 0.91
      17920x1536    4  3.13 -> 2.65; another run 3.19 -> 2.45
      151936x1536   4  29.8 -> 28.7; another run 23.7 -> 18.5 (SAIL-VL-2B's head)
      12288x2048    2  3.36 -> 2.53 (f = 4: 2.65)
      13824x2560    2  3.96 -> 2.84
      16384x3072    2  4.52 -> 3.65
      37888x3584    2  10.5 -> 9.3
      24576x4096    1  f = 2: 6.98 -> 6.28 once, slower in two other runs
      1536x8960     1  f = 4: 1.02 -> 1.27, f = 2: 1.02 -> 1.06
      4096x8960     1  f = 4: 2.69 -> 3.28, f = 2: equal

  So f is the most of FOLDS whose folded row stays within FOLDED_MAX_IN = 7168 (f = 4 at in = 2048 gained less
  than f = 2; f = 8 lost everywhere). Square shapes up to 3 MB gain 0.94-1.10x: the fold's few small extra ops.
  Held to the AVX2 kernel (ATEN_CPU_CAPABILITY=avx2, a simulation of an AVX2 CPU) f = 4 lost and f = 2 ranged
  0.94-1.20x, noisily: it runs only where torch reports "AVX512". Numbers: the kernel's sums are the unfolded
  ones bit for bit; it rounds them to bf16, then each is multiplied by its float32 scale and rounded to bf16
  again: |y - exact| <= ~2^-7 |y| plus the float32 sum's error (up to in * 2^-24 * sum |s w x|), the unfolded
  call's size of error (it rounds the scale to bf16, then y).
- Everything else converts `weight` to x's dtype a block of rows (~8 MB) at a time into one reused buffer, does
  a float matmul and scales the output columns. The block stays in cache and no memory is allocated per call:
  converting the whole matrix at once costs several times more, mostly page faults for the fresh float copy. In
  fp32 it beats the fp32 Linear at decode (it streams 4x fewer bytes) and stays close to it at prefill. With two
  threads on a busy machine each block can wait for the second thread to wake up.
- Devices other than the CPU use the same blocked path (int8pack's speed and correctness were measured only here).

`reference_int8_linear` is the plain definition the int8pack probe (and the tests) compare against. Inference only:
the weights are frozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minisail.fast.memory import scratch_buffer, thread_buffers
from minisail.fast.packing import packing_support

BLOCK_BYTES = 8 << 20  # float rows converted per matmul in the blocked path
INT8PACK_MAX_ROWS = 8  # above this many rows of x, the blocked path wins (measured crossover: 8-12)
QUANTIZE_BLOCK_ROWS = 1024  # rows converted to fp32 at a time by quantize_rows


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8 (bitsandbytes' LLM.int8 weight rule): (int8 [out, in], absmax float32 [out]).

    weight ~= int8 * absmax[:, None] / 127. A block of rows at a time goes through fp32, so quantising one
    matrix never holds a float32 copy of all of it. An all-zero row gets absmax 0 and int8 zeros.
    """
    rows = weight.shape[0]
    absmax = torch.empty(rows, dtype=torch.float32, device=weight.device)
    values = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    for start in range(0, rows, QUANTIZE_BLOCK_ROWS):
        block = weight[start : start + QUANTIZE_BLOCK_ROWS].to(torch.float32, copy=True)  # the one temporary
        low, high = torch.aminmax(block, dim=1)
        block_absmax = torch.maximum(-low, high)
        absmax[start : start + QUANTIZE_BLOCK_ROWS] = block_absmax
        steps = 127 / block_absmax.clamp_min(torch.finfo(torch.float32).tiny)
        values[start : start + QUANTIZE_BLOCK_ROWS] = block.mul_(steps[:, None]).round_()
    return values, absmax


def reference_int8_linear(x, weight, scale, bias=None) -> torch.Tensor:
    """The definition: dequantise in float32, round once to x's dtype, then an ordinary Linear."""
    return F.linear(x, (weight.float() * scale.float()[:, None]).to(x.dtype), bias)


def blocked_int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, in] @ (weight * scale)^T -> [M, out], converting weight a block of rows at a time.

    bf16 on a CPU without native bf16 matrix products (fast/packing.py `packing_support`, e.g. AVX2): PyTorch
    emulates a bf16 F.linear several times slower than float32 (a 286-token prefill took 34 s against llama.cpp
    Q8_0's 8 s, AVX2 simulated), so the blocks and products are float32 and the output is rounded to bf16 once,
    the rule fast/upcast.py follows for bf16 Linears."""
    out_features, in_features = weight.shape
    upcast = x.dtype == torch.bfloat16 and x.device.type == "cpu" and not packing_support().available
    compute = torch.float32 if upcast else x.dtype
    inputs = x.float() if upcast else x  # [M, in]
    rows = max(1, BLOCK_BYTES // (in_features * inputs.element_size()))
    buffer = scratch_buffer(min(rows, out_features) * in_features, compute, x.device)
    scale = scale.to(compute)
    # Scaling the outputs is cheapest, but the unscaled products are up to 127x larger than the true ones, more
    # than float16's range (65504) may hold: in float16 the weights are scaled instead, block by block.
    scale_weights = compute == torch.float16
    # A transposed weight (an [in, out] matrix's .t(), as fast/int8_dot.py reads one back) is copied as it lies,
    # [in, rows] (runs of `rows` bytes), and used transposed: copied as [rows, in] it would be read byte by byte.
    transposed = weight.stride(0) == 1 and weight.stride(1) == out_features and out_features > 1
    parts = []
    for start in range(0, out_features, rows):
        block = weight[start : start + rows]
        if transposed:
            as_float = buffer[: block.numel()].view(block.shape[::-1]).copy_(block.t()).t()  # [rows, in] view
        else:
            as_float = buffer[: block.numel()].view(block.shape).copy_(block)  # exact: |int8| <= 127
        if scale_weights:
            as_float.mul_(scale[start : start + rows, None])
        parts.append(F.linear(inputs, as_float))
    y = torch.cat(parts, dim=-1)
    return (y if scale_weights else y * scale).to(x.dtype)


def _int8pack_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and 1 <= x.shape[0] <= INT8PACK_MAX_ROWS
        and weight.shape[1] % 16 == 0
        # the 4-row tiles load the weight aligned (torch.compile cannot read addresses: its graph keeps today's call)
        and (x.shape[0] < 4 or torch.compiler.is_compiling() or weight.data_ptr() % 16 == 0)
        and hasattr(torch.ops.aten, "_weight_int8pack_mm")
        and _int8pack_works(weight, scale_dtype=x.dtype)
    )


PROBE_ROWS = 256  # weight rows the int8pack probe checks against the definition (dequantised in float32)
_int8pack_checked: dict[tuple[int, int], bool] = {}  # weight shape -> does int8pack run and agree here?


def _int8pack_works(weight: torch.Tensor, scale_dtype: torch.dtype) -> bool:
    """Decided by trying, once per weight shape: does `_weight_int8pack_mm` run on this CPU and agree with the
    definition on this weight (two random rows, its first PROBE_ROWS outputs, within bf16 rounding)? Where it
    fails, the blocked path runs."""
    key = tuple(weight.shape)
    if key not in _int8pack_checked:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(2, weight.shape[1], generator=generator).to(scale_dtype)
        scale = torch.rand(weight.shape[0], generator=generator).add_(0.5).div_(127)
        try:
            y = torch.ops.aten._weight_int8pack_mm(x, weight, scale.to(scale_dtype)).float()[:, :PROBE_ROWS]
            expected = reference_int8_linear(x.float(), weight[:PROBE_ROWS], scale.to(scale_dtype)[:PROBE_ROWS])
            _int8pack_checked[key] = bool(torch.isfinite(y).all()) and bool(
                (y - expected).abs().max() <= 2e-2 * expected.abs().max().clamp_min(1e-6)
            )
        except RuntimeError:
            _int8pack_checked[key] = False
    return _int8pack_checked[key]


FOLDS = (4, 2)  # weight rows the one-row int8pack call may lay side by side, most first (8: slower everywhere)
FOLDED_MAX_IN = 7168  # the longest folded row: the most rows whose side-by-side length stays within it


def _int8pack_is_avx512() -> bool:
    """Does torch run its AVX-512 int8pack kernel here? ATen picks one variant per process, the CPU's best unless
    ATEN_CPU_CAPABILITY asks for less ("AVX2", "DEFAULT"): the fold was measured faster only with this one."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def int8pack_fold(x: torch.Tensor, weight: torch.Tensor) -> int:
    """How many weight rows the int8pack call for x [M, in] folds into one: for one row of x with the AVX-512
    kernel, the most of FOLDS whose folded row (fold * in) is at most FOLDED_MAX_IN long, that divide `out` and
    that the kernel agrees with the definition on (`_int8pack_works` on the folded shape); 1 everywhere else.
    Never while torch.compile traces: inductor replaces the eager kernel the fold was measured with. Never for a
    weight not 16-byte aligned (a view into a mapped file can be): the kernel's 4-row tiles load the weight with
    aligned loads, and one at an 8-byte offset crashed the process (its inputs, the buffer below, are aligned)."""
    out_features, in_features = weight.shape
    if torch.compiler.is_compiling() or x.shape[0] != 1 or not weight.is_contiguous() or weight.data_ptr() % 16:
        return 1
    if not _int8pack_is_avx512():
        return 1
    for fold in FOLDS:
        if fold * in_features <= FOLDED_MAX_IN and out_features % fold == 0 and fold * in_features % 16 == 0:
            folded = weight.view(out_features // fold, fold * in_features)
            return fold if _int8pack_works(folded, x.dtype) else 1
    return 1


def folded_int8pack_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, fold: int) -> torch.Tensor:
    """One row x [1, in] @ (weight * scale)^T -> [1, out] by one int8pack call on `fold` rows of inputs against
    the weight viewed as [out / fold, fold * in] (its row j is rows fold*j .. fold*j + fold - 1 side by side).

    Row r of the inputs holds x in its block r and zeros elsewhere (block-diagonal), so the kernel's
    sums[r, j] = weight[fold*j + r] . x, exactly its unfolded sum: the zeros add exact zeros to the same float32
    accumulators. With unit scales the kernel rounds those sums to bf16; each is then multiplied by its float32
    scale and rounded to bf16 again. The inputs are one buffer per weight shape whose diagonal blocks alone are
    ever written, so they stay zero elsewhere; no call allocates more than its output."""
    out_features, in_features = weight.shape
    key, buffers = (in_features, out_features, fold, x.dtype, x.device), thread_buffers("int8 fold")
    if key not in buffers:
        with torch.inference_mode(False):  # normal tensors, writable both inside and outside inference mode
            inputs = torch.zeros(fold, fold * in_features, dtype=x.dtype, device=x.device)
            diagonal = inputs.as_strided((fold, in_features), ((fold + 1) * in_features, 1))  # block r of row r
            ones = torch.ones(out_features // fold, dtype=x.dtype, device=x.device)
            buffers[key] = inputs, diagonal, ones
    inputs, diagonal, ones = buffers[key]  # [fold, fold * in], [fold, in] inside it, [out / fold]
    diagonal.copy_(x)  # x [1, in] broadcast to every diagonal block
    folded = weight.view(out_features // fold, fold * in_features)
    sums = torch.ops.aten._weight_int8pack_mm(inputs, folded, ones)  # [fold, out / fold]
    # sums.t()[j, r] is output fold*j + r: multiplied in float32, rounded once more as it is written, in order
    y = torch.empty(1, out_features, dtype=x.dtype, device=x.device)
    torch.mul(sums.t(), scale.view(out_features // fold, fold), out=y.view(out_features // fold, fold))
    return y


def _aligned(rows: torch.Tensor) -> torch.Tensor:
    """rows, contiguous and 32-byte aligned (a fresh copy where a view starts elsewhere): the int8pack kernel
    loads them with aligned loads, which crash the process on a view 8 or 16 bytes off."""
    rows = rows.contiguous()
    if torch.compiler.is_compiling():  # addresses are not traced; the graph's own intermediates are fresh memory
        return rows
    return rows if rows.data_ptr() % 32 == 0 else rows.clone()


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias=None) -> torch.Tensor:
    """x [..., in] -> [..., out] through int8 `weight` [out, in] and float `scale` [out], by the fastest kernel
    that fits."""
    rows = x.reshape(-1, x.shape[-1])
    if _int8pack_fits(rows, weight):
        fold = int8pack_fold(rows, weight)
        if fold > 1:
            y = folded_int8pack_mm(rows, weight, scale, fold)
        else:
            y = torch.ops.aten._weight_int8pack_mm(_aligned(rows), weight, scale.to(x.dtype))
    else:
        y = blocked_int8_matmul(rows, weight, scale)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])


class Int8Linear(nn.Module):
    """A Linear whose weight is int8 [out, in] with a float32 scale per output row (see the module docstring).

    The scale stays float32 whatever the model dtype: bf16 would round every row's scale by up to 0.4%.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        weight = torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def swap_in_int8_linears(model: nn.Module, names: list[str]) -> None:
    """Replace the nn.Linear modules called `names` by Int8Linear of the same shape, on the same device.

    Done on the meta-device model before loading, so the loader fills int8 weights directly.
    """
    swap_linears(model, names, Int8Linear)


def swap_linears(model: nn.Module, names: list[str], cls) -> None:
    """Replace each nn.Linear called `names` by `cls(in_features, out_features, bias, device)` (int8, int4)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, not an nn.Linear")
        bias = linear.bias is not None
        setattr(parent, child, cls(linear.in_features, linear.out_features, bias, linear.weight.device))
