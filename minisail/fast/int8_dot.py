"""CPU fast path for int8 decode: the weights on the CPU's int8 dot-product instructions (VNNI), through oneDNN.

`Int8Linear` (fast/int8.py) multiplies float activations by int8 weights with `_weight_int8pack_mm`, which turns
every weight into float32 and multiplies in float32: at one row it is compute-bound, 24-34 GB/s on a Zen 5 whose
memory streams 50-75 GB/s. llama.cpp's Q8_0 is faster there because it multiplies int8 by int8 (VNNI's `vpdpbusd`
does 64 multiply-adds an instruction), having rounded the activations to 8 bits. Rounding the activations to 8
bits is an error real checkpoints' outlier features punish, so here they are not rounded: they are *split*.

One row x [in] (float) becomes the three bytes of 24-bit integers, each byte one row of uint8 codes:

    T = round(x * FULL_SCALE / max|x|)        an integer, |T| <= FULL_SCALE + 1 (float32 rounding) with
                                              FULL_SCALE = 2^24 - 2 - OFFSET = 8355710 and
    U = T + OFFSET = b0 + 256 b1 + 256^2 b2   OFFSET = 128 * (1 + 256 + 256^2) = 8421504, so 0 < U < 2^24:
                                              U's three little-endian bytes b0, b1, b2
    x = (max|x| / FULL_SCALE) * T + e,        |e| <= max|x| / FULL_SCALE = max|x| * 1.2e-7

(half a unit from rounding to T, up to half a unit more from the float32 division x / step, whose result reaches
2^23), so each activation is represented to float32's precision relative to its row's largest (2^-23 = 1.2e-7):
the split is as exact as computing in float32. The three byte rows go through one oneDNN u8 x s8 matrix product against
the weight, prepacked once (`torch.ops.onednn.qlinear_prepack`, the x86 backend of PyTorch's quantisation), with
zero point 128 for every byte: sums_l = (b_l - 128) . w, exact in int32 (|sums| <= 128 * 127 * in), turned into
float32 and multiplied by each row's weight scale. Since U - OFFSET = T = sum_l 256^l (b_l - 128),

    y = (max|x| / FULL_SCALE) * (sums_0 + 256 sums_1 + 256^2 sums_2) * scale + bias      (float32, rounded once)

The weight is read once for all LEVELS rows; measured on a Zen 5 (AVX-512 VNNI), 2 threads, weights streamed
from memory: 17920x1536 at 63-73 GB/s for 1-3 rows against `_weight_int8pack_mm`'s 32, 1536x8960 at 62-69 GB/s
against 35. The numbers: closer to the exact product than the int8pack path (which rounds its sums to bf16, then
rounds again after the scale): |y - exact| <= in * 2^-23 * sum|scale * w * x| (float32 sums) + the split's error
(sum|scale * w| * max|x| * 1.2e-7), before the one rounding to x's dtype (tests/loading/test_int8_dot.py).

Many rows (prefill, vision) are not what this is for: LEVELS times the rows makes a compute-bound product LEVELS
times dearer (measured, 286 rows, 17920x1536: 44 ms against the plain int8 path's 21). From MANY_ROWS rows on, the
int8 weight is read back from the packed one (oneDNN's reorder, as [in, out]: 3.6 ms there) and
`blocked_int8_matmul` (fast/int8.py) runs on it, 28 ms there: the plain path's arithmetic (bit for bit on the Zen 5
it was measured on; oneDNN may pick another kernel for a transposed weight elsewhere: within bf16 rounding).

When (decided by trying, never from the build): oneDNN must have int8 kernels on this CPU that sum exactly, checked
once per process on a probe that would overflow the 16-bit intermediate sums of CPUs without VNNI (`vpmaddubsw`
saturates), and once per weight shape on the real weight (exact integer sums, compared with float64). And it must
be the kernel that is faster: with AVX2 and no VNNI (oneDNN held to AVX2) the same call streamed 11-15 GB/s
against int8pack's 24-28, so it runs only where torch reports AVX-512 and VNNI. A swap on a built model, like
fast/packing.py: `dot_int8_linears(model)`; `state_dict()` gives the plain weight and scale back, and
`undot_int8_linears` restores Int8Linears.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch
from torch import nn

from minisail.fast.int8 import Int8Linear, blocked_int8_matmul

LEVELS = 3  # byte rows per activation row: 3 represent it to float32's precision (module docstring)
MANY_ROWS = 128  # rows of x from which the weight is read back for the float path (measured: 3 bytes won at 64)
ZERO_POINT = 128  # every byte row's zero point (oneDNN's u8 x s8 kernels; VNNI multiplies u8 by s8)
OFFSET = ZERO_POINT * (1 + 256 + 256**2)  # 8421504: T + OFFSET has bytes b0, b1, b2 (module docstring)
FULL_SCALE = 2**24 - 2 - OFFSET  # 8355710: |T| <= FULL_SCALE + 1 (x / step rounds), so T + OFFSET < 2^24
_BYTE_WEIGHTS = torch.tensor([1.0, 256.0, 65536.0])  # 256^l: what bytes b0, b1, b2 of U are worth


@dataclass(frozen=True)
class DotSupport:
    """Whether int8 weights can run on oneDNN's int8 dot-product kernels here, and why (or why not), in words."""

    available: bool
    reason: str


def _qlinear(codes: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zeros=None) -> torch.Tensor:
    """uint8 codes [M, in] (value - ZERO_POINT) @ packed int8 weight^T, times scale [out] -> float32 [M, out].
    `zeros`: the weight's zero points, int64 [out] (all 0: symmetric int8), made here when not given."""
    zeros = torch.zeros(scale.shape[0], dtype=torch.int64) if zeros is None else zeros
    return torch.ops.onednn.qlinear_pointwise(
        codes, 1.0, ZERO_POINT, packed, scale, zeros, None, 1.0, 0, torch.float32, "none", [], ""
    )


def _exact_sums(codes: torch.Tensor, weight: torch.Tensor, block_rows: int = 4096) -> torch.Tensor:
    """The integer sums (codes - ZERO_POINT) @ weight^T, exact in float64 (|sum| < 2^53), rounded to float32.
    A block of weight rows at a time: a float64 copy of a whole head (151936x1536) would be 1.9 GB."""
    values = codes.double() - ZERO_POINT  # [M, in]
    blocks = [values @ block.double().t() for block in weight.split(block_rows)]  # each [M, block_rows]
    return torch.cat(blocks, dim=1).float()


def _sums_exact(codes: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor) -> bool:
    """Does oneDNN's product give the exact integer sums (rounded to float32 once, unit scales) on these codes?"""
    try:
        got = _qlinear(codes, packed, torch.ones(weight.shape[0]))
    except RuntimeError:
        return False
    return torch.equal(got, _exact_sums(codes, weight))


@functools.cache
def dot_support() -> DotSupport:
    """Decided by trying (module docstring): the op exists, the CPU has VNNI and AVX-512 per torch, and a probe
    whose pairs of products overflow 16 bits (255 * 127 * 2 > 32767) comes out exact."""
    if not hasattr(torch.ops, "onednn") or not hasattr(torch.ops.onednn, "qlinear_pointwise"):
        return DotSupport(False, "this torch build has no oneDNN int8 linear")
    if sys.byteorder != "little":  # split_levels reads an int32's low byte first
        return DotSupport(False, "a big-endian CPU")
    vnni = getattr(torch.cpu, "_is_vnni_supported", lambda: False)()
    if not vnni or torch.backends.cpu.get_cpu_capability() != "AVX512":
        return DotSupport(False, "no AVX-512 VNNI here: int8 x int8 is not faster than int8pack without it")
    generator = torch.Generator().manual_seed(0)
    weight = torch.randint(-127, 128, (64, 1024), dtype=torch.int8, generator=generator)
    weight[0], weight[1] = 127, -127  # rows whose every pair of products saturates 16-bit sums
    codes = torch.randint(0, 256, (3, 1024), dtype=torch.uint8, generator=generator)
    codes[0], codes[1] = 255, 1  # +127 and -127 after the zero point
    try:
        packed = torch.ops.onednn.qlinear_prepack(weight, None)
    except RuntimeError as error:
        return DotSupport(False, f"oneDNN cannot pack int8 weights here ({str(error).splitlines()[0][:160]})")
    if not _sums_exact(codes, weight, packed):
        return DotSupport(False, "oneDNN's int8 sums are not exact on this CPU")
    return DotSupport(True, "int8 decode on oneDNN's VNNI kernels, activations split exactly into 3 bytes")


_checked: dict[tuple[int, int], bool] = {}  # weight shape -> exact sums on a real weight of that shape?


def split_levels(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float rows [M, in] -> (uint8 codes [M * LEVELS, in], level weights float32 [M, 1, LEVELS]): row m's byte l
    is code row m * LEVELS + l, and rows[m] ~= sum_l weights[m, 0, l] * (codes[m * LEVELS + l] - 128) within
    max|rows[m]| * 1.2e-7 (module docstring)."""
    M, K = rows.shape
    largest = torch.linalg.vector_norm(rows, ord=float("inf"), dim=1, keepdim=True, dtype=torch.float32)  # [M, 1]
    step = largest.clamp_min_(1e-30).div_(FULL_SCALE)  # [M, 1]: rows ~= step * T
    whole = torch.round(rows / step)  # [M, in] float32 integers T, |T| <= FULL_SCALE + 1 (exact below 2^24)
    unsigned = whole.to(torch.int32).add_(OFFSET)  # [M, in] U = T + OFFSET in (0, 2^24)
    as_bytes = unsigned.view(torch.uint8).view(M, K, 4)[:, :, :LEVELS]  # [M, in, 3]: b0, b1, b2 (little-endian)
    codes = as_bytes.transpose(1, 2).contiguous().view(M * LEVELS, K)  # [M * 3, in]
    weights = step.unsqueeze(2) * _BYTE_WEIGHTS  # [M, 1, 3]: step * 256^l
    return codes, weights


class DotInt8Linear(nn.Module):
    """An Int8Linear whose weight is prepacked for oneDNN's int8 kernels (module docstring); CPU inference only."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, bias, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("packed", packed, persistent=False)  # opaque oneDNN int8 tensor, [in, out] to torch
        self.register_buffer("scale", scale)  # float32 [out]
        zeros = torch.zeros(out_features, dtype=torch.int64)  # the weight's zero points, made once, not per call
        self.register_buffer("weight_zeros", zeros, persistent=False)
        self.bias = bias  # the Int8Linear's own Parameter, or None

    @classmethod
    def from_int8_linear(cls, linear: Int8Linear) -> DotInt8Linear | None:
        """The prepacked twin of `linear`, or None where this weight's shape does not give exact sums."""
        weight = linear.weight.detach()
        if weight.device.type != "cpu" or linear.scale.dtype != torch.float32:
            return None
        try:
            packed = torch.ops.onednn.qlinear_prepack(weight, None)
        except RuntimeError:
            return None
        key = tuple(weight.shape)
        if key not in _checked:
            generator = torch.Generator().manual_seed(1)
            codes = torch.randint(0, 256, (LEVELS, weight.shape[1]), dtype=torch.uint8, generator=generator)
            _checked[key] = _sums_exact(codes, weight, packed)
        if not _checked[key]:
            return None
        return cls(packed, linear.scale, linear.bias, linear.in_features, linear.out_features)

    def plain_weight(self) -> torch.Tensor:
        """The int8 weight [out, in], read back from the packed one: a transposed view of a fresh [in, out] copy
        (oneDNN's reorder, ~7 GB/s)."""
        return self.packed.to_dense().t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # [M, in]
        if rows.shape[0] >= MANY_ROWS:
            return self._float_path(x, rows)
        codes, weights = split_levels(rows)  # [M * LEVELS, in] uint8, [M, 1, LEVELS]
        if not bool(torch.isfinite(weights).all()):  # an inf or nan in x: the float path propagates it as defined
            return self._float_path(x, rows)
        sums = _qlinear(codes, self.packed, self.scale, self.weight_zeros)  # [M * LEVELS, out] float32
        sums = sums.view(rows.shape[0], LEVELS, -1)  # [M, LEVELS, out]
        y = torch.bmm(weights, sums).squeeze(1)  # [M, out] float32
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def _float_path(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        y = blocked_int8_matmul(rows, self.plain_weight(), self.scale)  # [M, out], the plain path's way
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # The state dict of the Int8Linear this was made from: saving a model with this path on still works.
        destination[prefix + "weight"] = self.plain_weight().contiguous()
        destination[prefix + "scale"] = self.scale
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias

    def to_int8_linear(self) -> Int8Linear:
        with torch.device("meta"):
            linear = Int8Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight = nn.Parameter(self.plain_weight().contiguous(), requires_grad=False)
        linear.scale = self.scale
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, levels={LEVELS}"


def dot_int8_linears(module: nn.Module, *, force: bool = False) -> int:
    """Swap every CPU Int8Linear under `module` whose shape gives exact sums for a DotInt8Linear; return how many.
    Only where `dot_support()` says so, unless `force` (tests: the path on a CPU where it is not the faster one)."""
    if not (force or dot_support().available):
        return 0
    swapped = 0
    # Names only: a list of the modules themselves would keep every replaced int8 weight alive until the end,
    # holding the plain and the packed copies of the whole model at once.
    names = [name for name, child in module.named_modules() if type(child) is Int8Linear]
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        twin = DotInt8Linear.from_int8_linear(getattr(parent, leaf))
        if twin is not None:
            setattr(parent, leaf, twin)  # the plain weight's last reference goes here
            swapped += 1
    return swapped


def undot_int8_linears(module: nn.Module) -> None:
    """Undo `dot_int8_linears`: Int8Linears with plain int8 weights."""
    for name, child in list(module.named_modules()):
        if isinstance(child, DotInt8Linear):
            parent_name, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(parent_name), leaf, child.to_int8_linear())
