"""CPU fast path for bf16: Linear weights pre-packed once into oneDNN's blocked layout.

A decode step multiplies one row of activations by every weight matrix of the language model, so its speed is
how fast those weights stream through the matrix-vector kernel. PyTorch's bf16 `F.linear` on CPU hands oneDNN the
plain [out, in] matrix (its `brg_matmul` then reads it in the "ba" layout on every call); packing the weight once
into a blocked layout that kernel wants (e.g. `AB16b64a2b`, via `torch.ops.mkldnn._reorder_linear_weight`, what
`torch.compile`'s CPU backend does under `freezing`; for which batch size: `batch_hint`) and calling the same kernel
on it (`torch.ops.mkldnn._linear_pointwise`) reads the same bytes faster. Decode, bound by that streaming, gains the
most; prefill and vision, large matrix products either way, gain a little (README "Speed and memory" has the
measurements).

Every CPU: oneDNN's bf16 kernels need AVX-512 (BW/VL/DQ), AVX-NE-CONVERT or AMX; on an AVX2-only CPU the reorder
itself raises. So nothing is assumed from the build: `packing_support()` packs a small probe weight and compares
the product with F.linear's bits once per process, and any failure means plain Linears (the same numbers, the
slower path) with its reason in words for the log. Then, for each weight shape, `pack_linears` checks that the
packed call returns exactly `F.linear`'s bits (12 random rows one by one, then together) and leaves the Linear
alone otherwise (with AMX, 1536x8960 is left alone: there the two kernels sum in different orders).
Only bf16 CPU weights are packed (fp32 packing changes the accumulation order).

Memory: `minisail.load` keeps bf16 weights as views into the memory-mapped checkpoint. Reordering one faults
its pages in, and they would stay resident (and counted) next to the packed copy for as long as the file is
mapped, so once a weight is packed its whole pages are given back (fast/memory.py's `release_mapped_pages`).
Packing holds at most one extra matrix per thread, so loading + packing peaks at about the model's size.

A packed weight is an opaque oneDNN tensor: no storage, not traced by `torch.compile`. So packing is opt-in, for
eager CPU inference (`pack_linears(model)`); `state_dict()` still gives the plain weights, and `unpack_linears`
restores plain Linears (e.g. to compile the model).
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minisail.fast.memory import release_mapped_pages
from minisail.fast.prepared import apply_or_refuse, check_activation_dtype, refuse_state_dict_load


@dataclass(frozen=True)
class PackingSupport:
    """Whether bf16 Linears can be packed on this machine, and why (or why not), in words for a log line."""

    available: bool
    reason: str


PROBE_SHAPE = (48, 64)  # [out, in]: a weight small enough to cost nothing, large enough for the blocked kernel


@functools.cache
def packing_support() -> PackingSupport:
    """Decided by trying: pack a small bf16 weight and compare the packed product with F.linear's, bit for bit.

    oneDNN's bf16 kernels need AVX-512 (BW, VL, DQ), AVX-NE-CONVERT or AMX on x86; without them the reorder
    raises ("bf16 path needs the cpu support ..."), so whether this torch *has* the ops says nothing about
    whether they run here. Any failure, or any difference from F.linear, means: plain Linears, same numbers."""
    mkldnn = torch.ops.mkldnn
    if not torch.backends.mkldnn.is_available():
        return PackingSupport(False, "this torch build has no oneDNN")
    if not all(hasattr(mkldnn, op) for op in ("_reorder_linear_weight", "_linear_pointwise")):
        return PackingSupport(False, "this torch build has no oneDNN linear packing ops")
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(PROBE_SHAPE, generator=generator).to(torch.bfloat16)
    x = torch.randn(3, PROBE_SHAPE[1], generator=generator).to(torch.bfloat16)
    try:
        packed = mkldnn._reorder_linear_weight(weight, batch_hint())
        same = torch.equal(mkldnn._linear_pointwise(x, packed, None, "none", [], ""), F.linear(x, weight))
    except RuntimeError as error:  # e.g. "bf16 path needs the cpu support avx_ne_convert or avx512bw, ..."
        return PackingSupport(False, f"oneDNN cannot pack bf16 weights on this CPU ({first_line(error)})")
    if not same:
        return PackingSupport(False, "oneDNN's packed bf16 product differs from F.linear's on this CPU")
    return PackingSupport(True, "oneDNN runs bf16 packed Linears on this CPU (the same bits as F.linear)")


@functools.cache
def amx_usable() -> bool:
    """Can this process run AMX (Intel's tile matrix unit, which oneDNN's bf16 kernels use where present)? Asked
    of torch, which enables it for the process (`torch._C._cpu._init_amx`); no such function, or an error: no."""
    init_amx = getattr(getattr(torch._C, "_cpu", None), "_init_amx", None)
    try:
        return bool(init_amx is not None and init_amx())
    except RuntimeError:
        return False


@functools.cache
def batch_hint() -> int | None:
    """The batch size oneDNN is told to pack for: 1 (decode), or None (unknown) where the CPU runs AMX.

    Measured, one row and 286 rows, packed with each hint, weights streamed from memory (2 threads):
    - Xeon with AMX (Granite Rapids class): without a hint, SAIL-VL-2B's gate_up (17920x1536) took 4.0 ms a row
      against 5.7 ms with hint 1, its head (151936x1536) 40.9 against 51.6 ms, and 286 rows 20-22 against
      44-47 ms; the other shapes about equal. Both give F.linear's bits (each shape is still probed).
    - AVX-512 BF16 without AMX (Zen 5): hint 1 is what reached 75% of the bf16 decode roofline (README); the
      unhinted layout was not measured there, so it is kept."""
    return None if amx_usable() else 1


def packing_available() -> bool:
    return packing_support().available


def first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:200]


_checked: dict[tuple, bool] = {}  # (out, in, dtype, bias?) -> does the packed kernel give F.linear's bits?
PROBE_SINGLE_ROWS = 12  # one-row calls compared per shape (each its own random row), then all of them at once


def _same_numbers(weight: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Does the packed call return exactly F.linear's output, one row at a time and for several rows? (Once per
    shape: the kernel oneDNN picks depends on the shapes.)

    Equal bits on one input do not prove equal bits on all: where the two kernels sum in a different order (seen
    with AMX for in=8960: 1536x8960, SAIL-VL-2B's MLP down projection), only some outputs round differently, one
    bf16 step apart, and a single random row agreed. So PROBE_SINGLE_ROWS independent rows are compared one by
    one (the decode case) and then together; there, 12 of 12 agreeing by chance had odds below 1 in 400."""
    key = (*weight.shape, weight.dtype, bias is not None)
    if key not in _checked:
        generator = torch.Generator().manual_seed(0)
        probe = torch.randn(PROBE_SINGLE_ROWS, weight.shape[1], generator=generator).to(weight.dtype)
        try:
            _checked[key] = all(
                torch.equal(
                    torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], ""), F.linear(x, weight, bias)
                )
                for x in (*probe.split(1), probe)
            )
        except RuntimeError:  # a shape this CPU's kernels refuse: that weight stays a plain Linear
            _checked[key] = False
    return _checked[key]


class PackedLinear(nn.Module):
    """`F.linear(x, weight, bias)` with `weight` held in oneDNN's blocked layout (bf16, CPU, inference only)."""

    def __init__(self, packed: torch.Tensor, bias: torch.Tensor | None, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("packed", packed, persistent=False)  # opaque oneDNN tensor [out, in]
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear | None:
        """The packed twin of `linear`, or None when packing would not give exactly F.linear's numbers."""
        weight = linear.weight.detach()
        bias = None if linear.bias is None else linear.bias.detach()
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint())
        except RuntimeError:  # packing_support() said yes for its probe; this shape may still be refused
            return None
        if not _same_numbers(weight, packed, bias):
            return None
        release_mapped_pages(weight)
        return cls(packed, bias, weight.shape[1], weight.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():  # oneDNN's packed product has no gradient; the plain one
            return F.linear(x, self.packed.to_dense(), self.bias)  # (the same numbers: `_same_numbers`)
        check_activation_dtype(self, x, torch.bfloat16)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # A state dict holds the plain weight, as nn.Linear's would: saving a packed model still works.
        destination[prefix + "weight"] = self.packed.to_dense()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias

    def check_state_dict_load(self, state_dict, prefix: str) -> None:
        refuse_state_dict_load(self, state_dict, prefix)  # no plain weight to load into (fast/prepared.py)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        self.check_state_dict_load(state_dict, prefix)

    def check_conversion(self, fn) -> None:
        """Raise a MinisailError where `fn` (what .to()/.float() apply) cannot apply to the packed weight."""
        apply_or_refuse(self, lambda: fn(self.packed))

    def _apply(self, fn, recurse=True):
        self.check_conversion(fn)
        return super()._apply(fn, recurse)

    def to_linear(self) -> nn.Linear:
        with torch.device("meta"):
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight = nn.Parameter(self.packed.to_dense(), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias, requires_grad=False)
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(module: nn.Module, threads: int | None = None) -> int:
    """Replace every bf16 CPU nn.Linear under `module` by a PackedLinear (same numbers); return how many.

    Each weight is read and reordered on its own (the reorder is single-threaded, so `threads` of them run side
    by side), and each plain weight is dropped as soon as its packed copy is in place: packing holds at most
    `threads` (default: torch's thread count) extra matrices at any moment."""
    if not packing_available():
        return 0
    names = [name for name, child in module.named_modules() if type(child) is nn.Linear]

    def pack(name: str) -> bool:
        parent_name, _, leaf = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        linear = getattr(parent, leaf)
        if linear.weight.dtype != torch.bfloat16 or linear.weight.device.type != "cpu":
            return False
        packed = PackedLinear.from_linear(linear)
        if packed is not None:
            setattr(parent, leaf, packed)
        return packed is not None

    with ThreadPoolExecutor(max(1, threads or torch.get_num_threads())) as pool:
        return sum(pool.map(pack, names))


def unpack_linears(module: nn.Module) -> None:
    """Undo `pack_linears`: plain nn.Linear modules with ordinary weights."""
    for name, child in list(module.named_modules()):
        if isinstance(child, PackedLinear):
            parent_name, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(parent_name), leaf, child.to_linear())


# Share of the memory the OS reports as available that float32 weights may take before bf16 is kept instead.
FLOAT32_MEMORY_SHARE = 0.6


def cpu_default_dtype(stored: torch.dtype, float32_bytes: int, available_bytes: int | None) -> tuple[torch.dtype, str]:
    """The dtype to run a checkpoint stored in `stored` on this CPU when the user did not choose one, and why.

    bf16 halves the weights' memory and the bytes a decode step streams, but its matrix products are only fast
    where the CPU has native bf16 support (what `packing_support` proves by running oneDNN's bf16 kernel); on
    other CPUs PyTorch emulates them, and a prefill runs several times slower than in float32 (README: "Which
    dtype"). So: the stored dtype where bf16 is native (or the checkpoint is not bf16); float32 where it is not
    and the float32 weights fit in FLOAT32_MEMORY_SHARE of the available memory; else bf16 all the same."""
    if stored != torch.bfloat16:
        return stored, f"{_name(stored)}, as the checkpoint stores it"
    support = packing_support()
    if support.available:
        return torch.bfloat16, "bfloat16, as stored: this CPU runs bf16 matrix products natively (oneDNN)"
    size = f"{float32_bytes / 1e9:.1f} GB"
    if available_bytes is None or float32_bytes <= FLOAT32_MEMORY_SHARE * available_bytes:
        return torch.float32, (
            f"float32 ({size}): this CPU has no native bf16 matrix products, where bf16 prefill runs several "
            "times slower than float32; --dtype bfloat16 halves the memory"
        )
    return torch.bfloat16, (
        f"bfloat16, as stored: this CPU has no native bf16 (prefill will be slow), but the float32 weights "
        f"({size}) would not fit in the {available_bytes / 1e9:.1f} GB of memory available"
    )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
