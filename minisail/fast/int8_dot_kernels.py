"""The two integer matrix products that fast/int8_dot.py runs its split activations on, and how each is checked.

Both multiply unsigned activation digits by the signed int8 weight, sum in int32 and scale each output by its
weight row's float32 scale. Whether the int32 sums are exact depends on the CPU's instructions, which decides how
many bits a digit may have:

- `ONEDNN` (`torch.ops.onednn.qlinear_prepack` / `qlinear_pointwise`, the x86 backend of PyTorch's quantisation).
  With AVX-512 VNNI, `vpdpbusd` adds four u8 x s8 products straight into int32: full bytes are exact, so a 24-bit
  integer is 3 digits of 8 bits (zero point 128). Without VNNI oneDNN first adds pairs of products in 16 bits
  (`vpmaddubsw`, which saturates: 255 * 127 * 2 > 32767), so its sums are not exact there.
- `FBGEMM` (`torch.ops.quantized.linear_prepack` / `linear_with_input_q_dq_qweight_dq_output_fp32`: PyTorch's
  fbgemm backend with a float32 output). On AVX2 it adds pairs in 16 bits too, so its digits have 7 bits (zero
  point 64): 127 * 127 * 2 = 32258 < 32767 never saturates, and 3 digits hold a 21-bit integer. Its weight is
  packed with unit scales (the row scales are applied after the product, as oneDNN applies them inside).
  fbgemm's unpacking is slow (76 ms for 17920x1536), so many rows run the digits too instead of reading it back.

Each kernel says how digits are laid out for it (`digits`), what they are worth (`values`), and how to pack,
multiply and (for oneDNN) read back a weight. That a kernel sums exactly is never assumed: fast/int8_dot.py probes
it once per process and once per weight shape against `exact_sums`.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DigitKernel:
    """An int8 product on activation digits of `bits` bits, `levels` digits per activation. Each subclass gives
    `digits(U)` (int32 [M, in] -> its input [M * levels, in]), `values(inputs)` (what they stand for, float64),
    `exists()`, `pack(weight)`, `sums(inputs, packed, scale, zeros)` (float32 [M * levels, out]) and `unpack`."""

    name: str
    bits: int
    levels: int

    @property
    def zero_point(self) -> int:  # digit d stands for d - zero_point
        return 1 << (self.bits - 1)

    @property
    def offset(self) -> int:  # U = T + offset has only digits below 2^bits: zero_point in each place
        return self.zero_point * sum(1 << (self.bits * level) for level in range(self.levels))

    @property
    def full_scale(self) -> int:  # |T| <= full_scale + 1 (x / step may round up), so 0 < T + offset < 2^(bits*levels)
        return (1 << (self.bits * self.levels)) - 2 - self.offset

    @functools.cached_property
    def place_values(self) -> torch.Tensor:  # float32 [levels]: what each digit's place is worth, 2^(bits*l)
        return torch.tensor([float(1 << (self.bits * level)) for level in range(self.levels)])

    @functools.cached_property
    def shifts(self) -> torch.Tensor:  # int32 [1, levels, 1]: where each digit starts in U
        return torch.arange(0, self.bits * self.levels, self.bits, dtype=torch.int32).view(1, self.levels, 1)


class OneDnnDigits(DigitKernel):
    """3 digits of 8 bits on oneDNN's u8 x s8 kernels (exact where VNNI sums into int32)."""

    def digits(self, unsigned: torch.Tensor) -> torch.Tensor:
        """U int32 [M, in] -> uint8 codes [M * levels, in]: U's little-endian bytes, row m * levels + l = byte l."""
        M, K = unsigned.shape
        as_bytes = unsigned.view(torch.uint8).view(M, K, 4)[:, :, : self.levels]  # [M, in, 3]
        return as_bytes.transpose(1, 2).contiguous().view(M * self.levels, K)

    def values(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs.double() - self.zero_point

    def exists(self) -> bool:  # does this torch build have the ops?
        return hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qlinear_pointwise")

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.onednn.qlinear_prepack(weight, None)  # opaque, [in, out] to torch

    def sums(self, inputs, packed, scale: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        """(digit values) @ weight^T * scale -> float32 [M * levels, out]; `zeros` the weight's zero points (0)."""
        return torch.ops.onednn.qlinear_pointwise(
            inputs, 1.0, self.zero_point, packed, scale, zeros, None, 1.0, 0, torch.float32, "none", [], ""
        )

    def unpack(self, packed) -> torch.Tensor:
        """The int8 weight [out, in] read back (oneDNN's reorder, ~7 GB/s): a transposed view of an [in, out] copy."""
        return packed.to_dense().t()


class FbgemmDigits(DigitKernel):
    """3 digits of 7 bits on fbgemm's u8 x s8 kernels (exact on AVX2: pairs of products fit 16 bits)."""

    def digits(self, unsigned: torch.Tensor) -> torch.Tensor:
        """U int32 [M, in] -> float32 [M * levels, in]: digit l of U minus the zero point (fbgemm quantises float
        inputs itself; with scale 1 and this zero point it gets the digits back exactly)."""
        M, K = unsigned.shape
        digits = (unsigned.view(M, 1, K) >> self.shifts) & ((1 << self.bits) - 1)  # [M, levels, in]
        return digits.view(M * self.levels, K).sub_(self.zero_point).float()

    def values(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs.double()

    def exists(self) -> bool:  # does this torch build have the engine (x86 builds only) and the op?
        return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
            torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32"
        )

    def pack(self, weight: torch.Tensor):
        """fbgemm's packed weight (a TorchScript object, opaque), packed with unit scales. PyTorch warns that
        quantized tensors are deprecated: if a later torch removes them this raises, and the probe refuses."""
        rows = weight.shape[0]
        previous = torch.backends.quantized.engine
        try:
            torch.backends.quantized.engine = "fbgemm"  # the x86 engine may pick oneDNN for linear_prepack
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                quantized = torch._make_per_channel_quantized_tensor(
                    weight, torch.ones(rows, dtype=torch.float64), torch.zeros(rows, dtype=torch.int64), 0
                )
                return torch.ops.quantized.linear_prepack(quantized, None)
        finally:
            torch.backends.quantized.engine = previous

    def sums(self, inputs, packed, scale: torch.Tensor, zeros=None) -> torch.Tensor:
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(inputs, 1.0, self.zero_point, packed)
        return y.mul_(scale)  # float32 [M * levels, out]: the int32 sums, rounded once, times the row scales

    def unpack(self, packed) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.ops.quantized.linear_unpack(packed)[0].int_repr()


ONEDNN = OneDnnDigits("oneDNN", bits=8, levels=3)
FBGEMM = FbgemmDigits("fbgemm", bits=7, levels=3)


def exact_sums(values: torch.Tensor, weight: torch.Tensor, block_rows: int = 4096) -> torch.Tensor:
    """values [M, in] (float64 digit values) @ weight^T exactly in float64 (|sum| < 2^53), rounded to float32.
    A block of weight rows at a time: a float64 copy of a whole head (151936x1536) would be 1.9 GB."""
    blocks = [values @ block.double().t() for block in weight.split(block_rows)]  # each [M, block_rows]
    return torch.cat(blocks, dim=1).float()


def sums_exact(kernel: DigitKernel, inputs: torch.Tensor, weight: torch.Tensor, packed) -> bool:
    """Does `kernel` give the exact integer sums (rounded to float32 once, unit scales) on these digits?"""
    try:
        got = kernel.sums(inputs, packed, torch.ones(weight.shape[0]), torch.zeros(weight.shape[0], dtype=torch.int64))
    except RuntimeError:
        return False
    return torch.equal(got, exact_sums(kernel.values(inputs), weight))


def extreme_digits(kernel: DigitKernel, columns: int, generator: torch.Generator) -> torch.Tensor:
    """Random digits in the kernel's input form [levels, columns], the first row all at the largest digit and the
    second all at the smallest: against rows of +-127 they saturate any 16-bit pairing that cannot hold them."""
    top = (1 << kernel.bits) - 1
    digits = torch.randint(0, top + 1, (kernel.levels, columns), generator=generator, dtype=torch.int32)
    digits[0], digits[1] = top, 0
    unsigned = sum(digits[level].long() << (kernel.bits * level) for level in range(kernel.levels))
    return kernel.digits(unsigned.to(torch.int32).view(1, columns))[: kernel.levels]
