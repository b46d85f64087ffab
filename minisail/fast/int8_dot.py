"""CPU fast path for int8 decode: the weights on the CPU's integer dot products (oneDNN with VNNI, or fbgemm).

`Int8Linear` (fast/int8.py) multiplies float activations by int8 weights with `_weight_int8pack_mm`, which turns
every weight into float32 and multiplies in float32: at one row it is compute-bound, 24-34 GB/s on a Zen 5 whose
memory streams 50-75 GB/s. llama.cpp's Q8_0 is faster because it multiplies int8 by int8 (VNNI's `vpdpbusd` does
64 multiply-adds an instruction; AVX2's `vpmaddubsw` 32), having rounded the activations to 8 bits. Rounding the
activations to 8 bits is an error real checkpoints' outlier features punish, so here they are not rounded: they
are *split* into digits, each digit row one row of an integer product against the weight.

One row x [in] (float) becomes integers T of one row-wise scale, written in LEVELS digits of `bits` bits:

    T = round(x / step), step = max|x| / FULL_SCALE       |T| <= FULL_SCALE + 1 (float32 rounding)
    U = T + OFFSET = sum_l 2^(bits l) d_l, 0 <= d_l < 2^bits   OFFSET = zero point 2^(bits-1) in every place
    x = step * T + e,  |e| <= step = max|x| / FULL_SCALE

(half a unit from rounding to T, up to half a unit more from the float32 division). The digit rows go through one
integer product against the weight, prepacked once, each digit taken minus its zero point: sums_l = (d_l - zp) . w,
exact in int32 when no intermediate saturates, turned into float32 and multiplied by each row's weight scale. Since
T = sum_l 2^(bits l) (d_l - zp),

    y = step * sum_l 2^(bits l) sums_l * scale + bias      (float32, rounded once to x's dtype)

The two kernels (fast/int8_dot_kernels.py; the CPU decides which, below):
- oneDNN with AVX-512 VNNI: 3 digits of 8 bits, FULL_SCALE 8355710: the split is float32's precision
  (1.2e-7 of the row's largest). Measured on a Zen 5, 2 threads, weights streamed from memory (copies cycled):
  17920x1536 at 63-73 GB/s for 1-3 rows against `_weight_int8pack_mm`'s 32, 1536x8960 at 62-69 GB/s against 35
  (session 7's host); on a slower host whose plain reads gave 37-39 GB/s, 29-32 against int8pack's 19-24 (session
  11); one call after an L3 flush, 30-37 GB/s like every int8 kernel (session 10). The host sets the rate.
- fbgemm where there is no VNNI (AVX2): its 16-bit pair sums hold 7-bit digits only, so 3 digits of 7 bits,
  FULL_SCALE 1040318 (9.6e-7 of the row's largest: still 2000 times finer than the bf16 rounding of the
  activations themselves, and far below the int8 weights' own rounding). Measured with torch and fbgemm held to
  AVX2 (`FBGEMM_ENABLE_INSTRUCTIONS=AVX2`) on that Zen 5: 17920x1536 at 45-48 GB/s for 1-4 rows against int8pack's
  24, 1536x8960 at 42-43 against 27.
The numbers: |y - exact| <= in * 2^-23 * sum|scale * w * x| (float32 sums) + the split's error
(sum|scale * w| * max|x| / FULL_SCALE), before the one rounding to x's dtype (tests/loading/test_int8_dot.py):
closer to the exact product than the int8pack path, which rounds its sums to bf16, then again after the scale.

Many rows (prefill) are not what this is for: LEVELS times the rows makes a compute-bound product LEVELS times
dearer. From MANY_ROWS rows on, oneDNN's weight is read back (its reorder, as [in, out]: 3.6 ms for 17920x1536)
and `blocked_int8_matmul` (fast/int8.py) runs on it, the plain path's arithmetic (286 rows: 28 ms against the
plain path's 21, 44 for the digits). fbgemm's read-back is too slow (76 ms there), so its digits run (286 rows,
AVX2: 116 ms against the plain float32 path's 88). Only the language model is swapped (cpu.py): it decodes.

When (decided by trying, never from the build): the kernel must sum exactly on this CPU, checked once per process
on a probe that would saturate 16-bit pair sums (`extreme_digits`) and once per weight shape on the real weight
(exact integer sums, compared with float64). oneDNN runs where torch reports AVX-512 and VNNI (without VNNI the
same call streamed 11-15 GB/s, slower than int8pack); fbgemm where it does not (x86 CPUs: fbgemm is x86-only).
A swap on a built model, like fast/packing.py: `dot_int8_linears(model)`; `state_dict()` gives the plain weight
and scale back, and `undot_int8_linears` restores Int8Linears.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass

import torch
from torch import nn

from minisail.fast.int8 import Int8Linear, blocked_int8_matmul, int8_linear
from minisail.fast.int8_dot_kernels import (
    FBGEMM,
    ONEDNN,
    DigitKernel,
    extreme_digits,
    sums_exact,
)
from minisail.fast.memory import release_mapped_pages, trim_heap
from minisail.fast.prepared import refuse_move, refuse_state_dict_load

MANY_ROWS = 128  # rows of x from which oneDNN's weight is read back for the float path (3 bytes won at 64)


@dataclass(frozen=True)
class DotSupport:
    """Which integer kernel int8 weights can run on here (None: neither), and why, in words."""

    kernel: DigitKernel | None
    reason: str

    @property
    def available(self) -> bool:
        return self.kernel is not None


def kernel_sums_exactly(kernel: DigitKernel) -> str | None:
    """None where `kernel` packs a probe and sums it exactly (saturating digits against rows of +-127), else why not."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randint(-127, 128, (64, 1024), dtype=torch.int8, generator=generator)
    weight[0], weight[1] = 127, -127  # rows whose every pair of products saturates 16-bit sums with large digits
    try:
        packed = kernel.pack(weight)
    except RuntimeError as error:
        return f"{kernel.name} cannot pack int8 weights here ({str(error).splitlines()[0][:160]})"
    if not sums_exact(kernel, extreme_digits(kernel, 1024, generator), weight, packed):
        return f"{kernel.name}'s int8 sums are not exact on this CPU"
    return None


@functools.cache
def dot_support() -> DotSupport:
    """Decided by trying (module docstring): oneDNN where torch reports AVX-512 VNNI, then fbgemm; the first whose
    ops exist and whose probe (which would saturate 16-bit pair sums) comes out exact."""
    if sys.byteorder != "little":  # the digit splits read an int32's low byte first
        return DotSupport(None, "a big-endian CPU")
    vnni = getattr(torch.cpu, "_is_vnni_supported", lambda: False)()
    candidates = [ONEDNN, FBGEMM] if vnni and torch.backends.cpu.get_cpu_capability() == "AVX512" else [FBGEMM]
    refusals = []
    for kernel in candidates:
        refusal = (
            kernel_sums_exactly(kernel) if kernel.exists() else f"this torch build has no {kernel.name} int8 linear"
        )
        if refusal is None:
            why = "AVX-512 VNNI: 3 bytes" if kernel is ONEDNN else "3 digits of 7 bits, which 16-bit pair sums hold"
            tried = f"; {'; '.join(refusals)}" if refusals else ""
            return DotSupport(
                kernel, f"int8 decode on {kernel.name}'s integer kernels, activations split exactly ({why}{tried})"
            )
        refusals.append(refusal)
    return DotSupport(None, "; ".join(refusals))


_checked: dict[tuple[str, int, int], bool] = {}  # (kernel, out, in) -> exact sums on a real weight of that shape?


def split_levels(rows: torch.Tensor, kernel: DigitKernel = ONEDNN) -> tuple[torch.Tensor, torch.Tensor]:
    """Float rows [M, in] -> (digits [M * levels, in] in `kernel`'s input form, level weights float32 [M, 1, levels]):
    row m's digit l is digit row m * levels + l, and rows[m] ~= sum_l weights[m, 0, l] * value(digit row) within
    max|rows[m]| / full_scale (module docstring)."""
    largest = rows.abs().amax(dim=1, keepdim=True).float()  # [M, 1] (exact in any float dtype; nan stays nan)
    step = largest.clamp_min_(1e-30).div_(kernel.full_scale)  # [M, 1]: rows ~= step * T
    whole = torch.round(rows / step)  # [M, in] float32 integers T, |T| <= full_scale + 1 (exact below 2^24)
    unsigned = whole.to(torch.int32).add_(kernel.offset)  # [M, in] U = T + offset, digits below 2^bits
    weights = step.unsqueeze(2) * kernel.place_values  # [M, 1, levels]: step * 2^(bits l)
    return kernel.digits(unsigned), weights


class DotInt8Linear(nn.Module):
    """An Int8Linear whose weight is prepacked for an integer kernel (module docstring); CPU inference only."""

    def __init__(self, kernel: DigitKernel, packed, scale: torch.Tensor, bias, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel
        if isinstance(packed, torch.Tensor):  # oneDNN: an opaque int8 tensor, [in, out] to torch
            self.register_buffer("packed", packed, persistent=False)
        else:  # fbgemm: a TorchScript object holding the packed weight
            self.packed = packed
        self.register_buffer("scale", scale)  # float32 [out]
        zeros = torch.zeros(out_features, dtype=torch.int64)  # the weight's zero points, made once, not per call
        self.register_buffer("weight_zeros", zeros, persistent=False)
        self.bias = bias  # the Int8Linear's own Parameter, or None

    @property
    def opaque_weight_bytes(self) -> int:
        """Bytes of a packed weight that is not a tensor (fbgemm's), for those who count weight bytes."""
        return 0 if isinstance(self.packed, torch.Tensor) else self.in_features * self.out_features

    @classmethod
    def from_int8_linear(cls, linear: Int8Linear, kernel: DigitKernel = ONEDNN) -> DotInt8Linear | None:
        """The prepacked twin of `linear`, or None where this weight's shape does not give exact sums."""
        weight = linear.weight.detach()
        if weight.device.type != "cpu" or linear.scale.dtype != torch.float32:
            return None
        try:
            packed = kernel.pack(weight)
        except RuntimeError:
            return None
        key = (kernel.name, *weight.shape)
        if key not in _checked:
            generator = torch.Generator().manual_seed(1)
            _checked[key] = sums_exact(kernel, extreme_digits(kernel, weight.shape[1], generator), weight, packed)
        if not _checked[key]:
            return None
        release_mapped_pages(weight)  # a bitsandbytes weight is a view into the file: its pages are a second copy
        return cls(kernel, packed, linear.scale, linear.bias, linear.in_features, linear.out_features)

    def plain_weight(self) -> torch.Tensor:
        """The int8 weight [out, in], read back from the packed one (for oneDNN a transposed view)."""
        return self.kernel.unpack(self.packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():  # the integer kernels have no gradient: the plain path's
            return int8_linear(x, self.plain_weight().contiguous(), self.scale, self.bias)
        rows = x.reshape(-1, self.in_features)  # [M, in]
        if rows.shape[0] == 0:  # nothing to multiply (the kernels would be handed an empty product)
            return x.new_empty(*x.shape[:-1], self.out_features)
        if rows.shape[0] == 1:
            return self._one_row(x, rows)
        if rows.shape[0] >= MANY_ROWS and self.kernel is ONEDNN:
            return self._float_path(x, rows)
        digits, weights = split_levels(rows, self.kernel)  # [M * levels, in], [M, 1, levels]
        if not math.isfinite(weights[:, 0, 0].sum().item()):  # an inf or nan in x: the float path, as defined
            return self._float_path(x, rows)
        sums = self.kernel.sums(digits, self.packed, self.scale, self.weight_zeros)  # [M * levels, out] float32
        y = torch.bmm(weights, sums.view(rows.shape[0], self.kernel.levels, -1)).squeeze(1)  # [M, out] float32
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def _one_row(self, x: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        """`split_levels` and the recombination for decode's one row, its step a Python number: the same numbers
        in fewer tensor operations (each costs microseconds, and a decode step makes 113 of these calls)."""
        kernel = self.kernel
        largest = row.abs().max().item()
        if not math.isfinite(largest):  # an inf or nan in x: the float path, as defined
            return self._float_path(x, row)
        step = max(largest, 1e-30) / kernel.full_scale  # rounded to float32 by the division below, as a tensor's
        unsigned = row.to(torch.float32, copy=True).div_(step).round_().to(torch.int32).add_(kernel.offset)  # [1, in]
        sums = kernel.sums(kernel.digits(unsigned), self.packed, self.scale, self.weight_zeros)  # [levels, out]
        y = (kernel.place_values * step) @ sums  # [out] float32
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

    def check_state_dict_load(self, state_dict, prefix: str) -> None:
        refuse_state_dict_load(self, state_dict, prefix)  # no plain weight to load into (fast/prepared.py)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        self.check_state_dict_load(state_dict, prefix)

    def check_conversion(self, fn) -> None:
        """Raise a MinisailError where `fn` would move the weight: a packed one cannot follow a device change."""
        trial = fn(self.scale)  # what this call does to a tensor
        if trial.device != self.scale.device:
            refuse_move(self, trial.device)

    def _apply(self, fn, recurse=True):
        self.check_conversion(fn)
        scale = self.scale
        super()._apply(fn, recurse)
        self.scale = scale  # float32 whatever the model's dtype: the kernels take float32 scales
        return self

    def to_int8_linear(self) -> Int8Linear:
        with torch.device("meta"):
            linear = Int8Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight = nn.Parameter(self.plain_weight().contiguous(), requires_grad=False)
        linear.scale = self.scale
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel.name}"


def dot_int8_linears(module: nn.Module, *, kernel: DigitKernel | None = None) -> int:
    """Swap every CPU Int8Linear under `module` whose shape gives exact sums for a DotInt8Linear; return how many.
    On the kernel `dot_support()` picks, or on `kernel` if given (tests: a path this CPU would not pick)."""
    kernel = kernel or dot_support().kernel
    if kernel is None:
        return 0
    swapped = 0
    # Names only: a list of the modules themselves would keep every replaced int8 weight alive until the end,
    # holding the plain and the packed copies of the whole model at once.
    names = [name for name, child in module.named_modules() if type(child) is Int8Linear]
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        twin = DotInt8Linear.from_int8_linear(getattr(parent, leaf), kernel)
        if twin is not None:
            setattr(parent, leaf, twin)  # the plain weight's last reference goes here
            trim_heap()  # and its memory back to the OS before the next packed copy (fast/memory.py)
            swapped += 1
    return swapped


def undot_int8_linears(module: nn.Module) -> None:
    """Undo `dot_int8_linears`: Int8Linears with plain int8 weights."""
    for name, child in list(module.named_modules()):
        if isinstance(child, DotInt8Linear):
            parent_name, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(parent_name), leaf, child.to_int8_linear())
