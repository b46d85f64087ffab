"""CPU fast path for bf16 models where the CPU has no native bf16: large matrix products computed in float32.

Without AVX-512 (BW/VL/DQ), AVX-NE-CONVERT or AMX, PyTorch emulates bf16 matrix products, and a bf16 prefill or
vision tower runs 3-7x slower than the same model in float32 (README "Which dtype on which CPU"), while a decode
step, one row of activations, is as fast in emulated bf16 as anything else (it streams half of float32's bytes).
So on such a CPU a bf16 Linear is swapped for `Float32ComputeLinear`, which keeps the bf16 weight (the same tensor,
no copy: memory stays that of a bf16 model) and, for inputs of at least MIN_ROWS rows:

    y = round_bf16( x_fp32 @ w_fp32^T + b_fp32 ),    w converted to float32 a block of rows (~BLOCK_BYTES) at a time

into one reused buffer, so no float32 copy of the whole matrix is ever made and the block stays in cache for
float32's fast GEMM. Fewer rows (decode) go to `F.linear` unchanged, bit for bit.

The rule (when): chosen where `packing_support()` (fast/packing.py) says oneDNN cannot run bf16 on this CPU,
decided by trying; never where bf16 is native (there bf16 is faster than float32 and packing is the fast path).

The numbers: bf16 values are exact in float32, so the products are exact, and the sums accumulate in float32 and
are rounded once to bf16, the activation dtype, as the bf16 `F.linear` does on CPU (float32 accumulation, one
rounding, the bias added before it). Only the order of the float32 additions may differ, so each output is within
one bf16 rounding of `F.linear`'s: |y - y_F.linear| <= 2^-8 (|y| + |y_F.linear|) + 2 * in_features * 2^-24 *
(|x| @ |w|^T) (tests/loading/test_upcast.py checks that bound). The model stays a bf16 model: every activation is
bf16, as it would be without this path.

Like packing, a module swap on a built model, never imported by layers/vision/llm/models: `upcast_linears(model)`
swaps, `restore_linears(model)` undoes it. `Float32ComputeLinear` is an nn.Linear (same parameters, same
state_dict), so saving, loading and `torch.compile` see an ordinary Linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minisail.fast.memory import scratch_buffer
from minisail.fast.packing import packing_support

MIN_ROWS = 8  # rows of x from which float32 compute wins (measured crossover in emulated bf16: 4-8 rows)
BLOCK_BYTES = 4 << 20  # float32 weight rows converted per matrix product


def upcast_wanted() -> bool:
    """Is this the CPU this path is for: one where oneDNN cannot run bf16 matrix products (decided by trying)?"""
    return not packing_support().available


def float32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, in] bf16 @ weight [out, in] bf16 (+ bias [out]) computed in float32 block by block -> [M, out] bf16."""
    out_features, in_features = weight.shape
    x32 = x.float()  # [M, in], exact
    y = torch.empty(x.shape[0], out_features, dtype=x.dtype, device=x.device)  # [M, out], the activation dtype
    rows = max(1, BLOCK_BYTES // (4 * in_features))
    buffer = scratch_buffer(min(rows, out_features) * in_features, torch.float32, x.device)
    for start in range(0, out_features, rows):
        block = weight[start : start + rows]  # [rows, in] bf16
        block32 = buffer[: block.numel()].view(block.shape).copy_(block)  # exact
        block_bias = None if bias is None else bias[start : start + rows].float()
        y[:, start : start + rows] = F.linear(x32, block32, block_bias)  # float32 sums, rounded once to bf16
    return y


class Float32ComputeLinear(nn.Linear):
    """An nn.Linear with a bf16 weight that computes inputs of MIN_ROWS rows or more in float32 (module docstring);
    fewer rows run `F.linear` itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(1, x.shape[-1])
        if rows < MIN_ROWS or x.dtype != torch.bfloat16 or self.weight.dtype != torch.bfloat16:
            return F.linear(x, self.weight, self.bias)
        y = float32_linear(x.reshape(rows, x.shape[-1]), self.weight, self.bias)
        return y.view(*x.shape[:-1], self.out_features)  # [..., out]

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Float32ComputeLinear:
        """The same parameters (shared, not copied) under this class's forward."""
        with torch.device("meta"):
            twin = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        twin.weight = linear.weight
        twin.bias = linear.bias
        return twin


def _swap(module: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(parent_name), leaf, new)


def upcast_linears(module: nn.Module, *, force: bool = False) -> int:
    """Swap every bf16 CPU nn.Linear under `module` for a Float32ComputeLinear; return how many.

    Only where `upcast_wanted()` (no native bf16 on this CPU), unless `force`: where bf16 is native, the bf16
    kernels are faster than float32 ones and this path would only slow the model down."""
    if not (force or upcast_wanted()):
        return 0
    names = [
        name
        for name, child in module.named_modules()
        if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16 and child.weight.device.type == "cpu"
    ]
    for name in names:
        _swap(module, name, Float32ComputeLinear.from_linear(module.get_submodule(name)))
    return len(names)


def restore_linears(module: nn.Module, classes: tuple[type, ...] = (Float32ComputeLinear,)) -> None:
    """Undo `upcast_linears` (or, with `classes`, another swap of nn.Linear subclasses: fast/matvec.py's): each
    module of those classes under `module` becomes a plain nn.Linear holding the same parameters."""
    for name, child in list(module.named_modules()):
        if type(child) in classes:
            with torch.device("meta"):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
            linear.weight, linear.bias = child.weight, child.bias
            _swap(module, name, linear)
