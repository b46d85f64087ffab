"""CPU fast path for bf16 decode: a one-row product as a matrix-vector product, `torch.mv(weight, x)`.

A decode step multiplies one row of activations by every weight matrix of the language model, so its speed is
how fast those weights stream through the kernel. `F.linear(x, weight)` hands oneDNN the 1 x in row as the
source and the [out, in] weight as the (transposed) second operand; `torch.mv(weight, x)` (`torch.addmv` with a
bias) hands it the weight as the row-major source and x as a one-column operand. Same library, same bf16 inputs,
float32 sums rounded once to bf16, but the second form streams the weight faster. Measured on an Intel Xeon with
AMX (oneDNN's brg_matmul:avx10_1_512_amx), 2 threads, weights streamed from memory, SAIL-VL-2B's shapes, ms per
product (F.linear / oneDNN-packed for an unknown batch, fast/packing.py / torch.mv):

    qkv 2048x1536   0.63 / 0.62 / 0.45      gate_up 17920x1536   4.79 / 4.05 / 3.47
    o 1536x1536     0.53 / 0.43 / 0.38      down 1536x8960       1.84 / 2.25 / 1.70
    head 151936x1536                        43.0 / 37.2 / 34.9

and a whole decode step 1.13-1.28x faster than with packed weights (three interleaved runs, noisy host). Not so
elsewhere: on an AMD Zen 5 (AVX-512 BF16, no AMX) the decode products took 268 ms a token with torch.mv against
251 with F.linear and 169 packed for batch 1 (README, 2026-11), and with torch held to AVX2 (no native bf16:
fast/upcast.py's CPUs) the two forms run at the same speed. So this path is chosen where AMX runs
(`packing.amx_usable()`, with `packing_support()`); everywhere else packing stays the decode path.

The numbers: on most shapes the two forms sum in the same order and give the same bits, but not on all (with
AMX, in=8960: about 1 row in 4 differs by one bf16 step). So, as for packing, each weight shape is probed once per
process on the running machine: PROBE_ROWS random rows, one at a time, must give exactly F.linear's bits (bias
included: `torch.addmv(bias, weight, x)` adds it before the one rounding, as F.linear does; `mv(...) + bias` would
round twice). A shape that fails keeps F.linear. Two or more rows always run F.linear. So a MatVecLinear returns
F.linear's bits for every input the probe covers; the bits of bf16 products may also change with the thread count
(seen with K=8960), so the promise is per thread count.

`MatVecLinear` is an nn.Linear (same parameters, same state_dict; `torch.compile` sees an ordinary Linear when
its probe fails) and the weight stays the plain [out, in] tensor: unlike packing there is no second layout, so the
language model's weights are not packed (its prefill runs the plain F.linear; vision tower and projector, never a
single row, still pack). Like the other fast paths, a module swap on a built model: `matvec_linears(model)`,
undone by `unswap_matvec_linears`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minisail.fast.packing import amx_usable, packing_support

PROBE_ROWS = 12  # one-row products compared with F.linear per weight shape (as fast/packing.py probes)

_probed: dict[tuple, bool] = {}  # (out, in, dtype, bias?, threads) -> does the one-row form give F.linear's bits?


def one_row_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [in] -> [out]: the weight as the row-major source of a matrix-vector product."""
    return torch.mv(weight, x) if bias is None else torch.addmv(bias, weight, x)


def same_bits_as_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Does `one_row_product` return exactly F.linear's output for this weight's shape, on PROBE_ROWS random rows
    one at a time? Decided once per (shape, dtype, bias, thread count) by trying; an error means no."""
    key = (*weight.shape, weight.dtype, bias is not None, torch.get_num_threads())
    if key not in _probed:
        generator = torch.Generator().manual_seed(0)
        rows = torch.randn(PROBE_ROWS, weight.shape[1], generator=generator).to(weight.dtype)
        try:
            _probed[key] = all(
                torch.equal(one_row_product(row, weight, bias), F.linear(row[None], weight, bias)[0]) for row in rows
            )
        except RuntimeError:
            _probed[key] = False
    return _probed[key]


class MatVecLinear(nn.Linear):
    """An nn.Linear whose one-row inputs run `torch.mv` / `torch.addmv` (F.linear's bits, checked per shape);
    every other input runs F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A 1-D x is left to F.linear: it takes another path there (matmul, then the bias) than for a row of a
        # 2-D or 3-D x (addmm), with other bits (seen with in=1), and the probe compares the 2-D one
        if x.dim() > 1 and x.numel() == self.in_features and same_bits_as_linear(self.weight, self.bias):
            return one_row_product(x.reshape(-1), self.weight, self.bias).view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> MatVecLinear:
        """The same parameters (shared, not copied) under this class's forward."""
        with torch.device("meta"):
            twin = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        twin.weight, twin.bias = linear.weight, linear.bias
        return twin


def matvec_wanted() -> bool:
    """Is this a CPU where the one-row form was measured faster: oneDNN runs bf16 natively (decided by trying),
    on AMX?"""
    return packing_support().available and amx_usable()


def matvec_linears(module: nn.Module, *, force: bool = False) -> int:
    """Swap every bf16 CPU nn.Linear under `module` whose shape passes the probe for a MatVecLinear; return how
    many. Only where `matvec_wanted()`, unless `force` (tests: the numbers can be checked on any CPU)."""
    if not (force or matvec_wanted()):
        return 0
    swapped = 0
    for name, child in list(module.named_modules()):
        if type(child) is not nn.Linear or child.weight.dtype != torch.bfloat16 or child.weight.device.type != "cpu":
            continue
        with torch.inference_mode():
            if not same_bits_as_linear(child.weight, child.bias):
                continue
        parent_name, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(parent_name), leaf, MatVecLinear.from_linear(child))
        swapped += 1
    return swapped


def unswap_matvec_linears(module: nn.Module) -> None:
    """Undo `matvec_linears`: plain nn.Linear modules holding the same parameters."""
    from minisail.fast.upcast import restore_linears

    restore_linears(module, classes=(MatVecLinear,))
