"""The int8pack fold (minisail/fast/int8.py `folded_int8pack_mm`): one row of x against weight rows side by side.

Whether the fold runs is a speed decision (torch's AVX-512 int8pack kernel, short rows), so these tests force it on
and off: its numbers are checked on any machine where the int8pack kernel runs, the scalar and AVX2 ones included.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minisail.fast import int8 as int8_kernels
from minisail.fast.int8 import folded_int8pack_mm, int8_linear, int8pack_fold, quantize_rows, reference_int8_linear
from minisail.fast.memory import thread_buffers

FOLD = int8_kernels.FOLDS[0]  # the most rows folded, where they fit
U_BF16, U_FP32 = 2.0**-8, 2.0**-24  # unit roundoffs: bf16 keeps 8 significant bits, float32 24


def operands(seed: int, out_features: int, in_features: int):
    """A quantised weight [out, in] with rows of very different sizes, its float32 scale, and one bf16 row of x."""
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.logspace(-3, 1, out_features)[torch.randperm(out_features, generator=generator)]
    weight, absmax = quantize_rows(torch.randn(out_features, in_features, generator=generator) * sizes[:, None])
    x = (torch.randn(1, in_features, generator=generator) * 3).to(torch.bfloat16)
    return x, weight, absmax / 127


def unscaled_sums(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The unfolded kernel's sums weight . x, rounded to bf16 (unit scales multiply exactly)."""
    return torch.ops.aten._weight_int8pack_mm(x, weight, torch.ones(weight.shape[0], dtype=x.dtype))


@pytest.fixture
def fold_forced(monkeypatch):
    """The fold runs wherever the shape allows, as on the AVX-512 machine it was measured on."""
    from conftest import _reset_fast_path_decisions

    _reset_fast_path_decisions()
    monkeypatch.setattr(int8_kernels, "_int8pack_is_avx512", lambda: True)
    yield
    _reset_fast_path_decisions()


shapes = st.tuples(st.integers(1, 96).map(lambda a: FOLD * a), st.integers(1, 40).map(lambda b: 16 * b))


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16), fold=st.sampled_from([2, FOLD]))
def test_the_fold_gives_exactly_the_unfolded_kernels_sums(shape, seed, fold):
    # Row r of the block-diagonal inputs meets the folded row j only in block r: the other blocks add exact zeros
    # to the same float32 accumulators, so the sums are the unfolded ones bit for bit (unit scales: no rounding).
    x, weight, _ = operands(seed, *shape)
    ones = torch.ones(shape[0], dtype=torch.float32)
    assert torch.equal(folded_int8pack_mm(x, weight, ones, fold), unscaled_sums(x, weight))


def fold_error_bound(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, expected: torch.Tensor):
    """|folded - definition| per output: the kernel's float32 sum of `in` products (each exact: 8-bit integer
    times 8-bit significand) is off by at most gamma_in * sum |w x|; rounding it to bf16, the float32 product with
    the scale and rounding that to bf16 multiply it by (1 + d1)(1 + d2)(1 + d3), |d1|, |d3| <= 2^-8, |d2| <= 2^-24.
    The definition (float32 dequantised weights, float64 product) is within 2^-24 * sum |s w x| of exact."""
    in_features = weight.shape[1]
    magnitude = (weight.double().abs() * scale.double()[:, None]) @ x.double().abs()[0]  # sum_k |s w x|, [out]
    gamma = in_features * U_FP32 / (1 - in_features * U_FP32)
    relative = (1 + U_BF16) ** 2 * (1 + U_FP32) - 1  # ~ 2^-7
    return relative * (expected.abs() + U_FP32 * magnitude) + (1 + relative) * gamma * magnitude + U_FP32 * magnitude


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_the_folded_linear_is_the_definition_within_two_bf16_roundings(shape, seed):
    x, weight, scale = operands(seed, *shape)
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(int8_kernels, "_int8pack_is_avx512", lambda: True)
        patch.setattr(int8_kernels, "FOLDED_MAX_IN", 1 << 20)
        real = int8_kernels.folded_int8pack_mm
        patch.setattr(int8_kernels, "folded_int8pack_mm", lambda *a: calls.append(a[3]) or real(*a))
        y = int8_linear(x, weight, scale)
    assert calls == [FOLD] and y.dtype == torch.bfloat16 and y.shape == (1, shape[0])
    expected = reference_int8_linear(x.double(), weight, scale.double())[0]
    bound = fold_error_bound(x, weight, scale, expected)
    assert bool(((y[0].double() - expected).abs() <= bound).all())
    # and it is the kernel's sums, scaled in float32, rounded once more
    assert torch.equal(y, (unscaled_sums(x, weight).float() * scale).to(torch.bfloat16))


def test_the_fold_is_chosen_only_where_it_fits_and_was_measured_faster(fold_forced, monkeypatch):
    one = torch.ones(1, 64, dtype=torch.bfloat16)
    weight = torch.ones(32, 64, dtype=torch.int8)
    assert int8pack_fold(one, weight) == FOLD
    assert int8pack_fold(torch.ones(2, 64, dtype=torch.bfloat16), weight) == 1  # two rows: the kernel as it is
    assert int8pack_fold(one, weight[:30]) == 2  # out % 4 != 0: two rows side by side
    assert int8pack_fold(one, weight[:31]) == 1  # odd: none
    assert int8pack_fold(one, torch.ones(64, 32, dtype=torch.int8).t()) == 1  # a transposed view cannot fold
    longest = int8_kernels.FOLDED_MAX_IN
    for in_features, fold in [(longest // 4, 4), (longest // 4 + 16, 2), (longest // 2, 2), (longest // 2 + 16, 1)]:
        x = torch.ones(1, in_features, dtype=torch.bfloat16)
        assert int8pack_fold(x, torch.ones(8, in_features, dtype=torch.int8)) == fold, in_features
    monkeypatch.setattr(int8_kernels, "_int8pack_is_avx512", lambda: False)  # AVX2, the scalar kernel: no gain
    assert int8pack_fold(one, weight) == 1


def test_a_weight_off_16_byte_alignment_is_not_folded(fold_forced):
    # As a weight taken as stored can be, a view into a mapped file at any byte: the kernel's 4-row tiles use
    # aligned loads (torch 2.13, AVX-512: such a weight crashed the process), the one-row call does not.
    x, weight, scale = operands(4, 32, 64)
    storage = torch.empty(weight.numel() + 64, dtype=torch.int8)
    start = (-storage.data_ptr() % 16) + 8  # 8 bytes past a 16-byte boundary
    shifted = storage[start : start + weight.numel()].view_as(weight).copy_(weight)
    assert shifted.data_ptr() % 16 == 8 and int8pack_fold(x, shifted) == 1 and int8pack_fold(x, weight) == FOLD
    unfolded = torch.ops.aten._weight_int8pack_mm(x, weight, scale.to(torch.bfloat16))
    assert torch.equal(int8_linear(x, shifted, scale), unfolded)  # today's one-row call, as on such a checkpoint


def test_int8_linear_runs_the_fold_or_the_kernel_as_it_is(fold_forced, monkeypatch):
    x, weight, scale = operands(5, 64, 128)
    shapes_seen = []
    real = torch.ops.aten._weight_int8pack_mm
    monkeypatch.setattr(
        torch.ops.aten, "_weight_int8pack_mm", lambda a, w, s: shapes_seen.append(w.shape) or real(a, w, s)
    )
    folded = int8_linear(x, weight, scale)
    assert shapes_seen[-1] == (64 // FOLD, FOLD * 128)
    monkeypatch.setattr(int8_kernels, "_int8pack_is_avx512", lambda: False)
    plain = int8_linear(x, weight, scale)
    assert shapes_seen[-1] == (64, 128)
    # today's path rounds the scale to bf16 before the sum, the fold the sum before the scale: both within bound
    expected = reference_int8_linear(x.double(), weight, scale.double())[0]
    for y in (folded, plain):
        assert bool(((y[0].double() - expected).abs() <= fold_error_bound(x, weight, scale, expected)).all())


def test_the_reused_inputs_stay_zero_off_the_diagonal(fold_forced, monkeypatch):
    # One buffer per weight shape, written only on its diagonal blocks: a second row of x leaves nothing of the
    # first, inside inference mode and out of it.
    thread_buffers("int8 fold").clear()  # made afresh, inside inference mode
    _, weight, scale = operands(7, 32, 48)
    rows = [operands(seed, 32, 48)[0] for seed in (8, 9)]
    with torch.inference_mode():
        first = folded_int8pack_mm(rows[0], weight, scale, FOLD)
    second = folded_int8pack_mm(rows[1], weight, scale, FOLD)
    for x, y in zip(rows, (first, second), strict=True):
        assert torch.equal(y, (unscaled_sums(x, weight).float() * scale).to(torch.bfloat16))
    inputs = thread_buffers("int8 fold")[(48, 32, FOLD, torch.bfloat16, torch.device("cpu"))][0]
    blocks = inputs.view(FOLD, FOLD, 48)
    for r in range(FOLD):
        assert torch.equal(blocks[r, r], rows[1][0])
        assert not blocks[r, [c for c in range(FOLD) if c != r]].any()


def test_where_int8pack_fails_the_fold_is_not_tried(fold_forced, int8pack_fails, monkeypatch):
    calls = []
    monkeypatch.setattr(int8_kernels, "folded_int8pack_mm", lambda *a: calls.append(a))
    x, weight, scale = operands(1, 32, 64)
    y = int8_linear(x, weight, scale)
    assert calls == [] and int8_kernels._int8pack_checked == {(32, 64): False}
    expected = reference_int8_linear(x.double(), weight, scale.double())
    assert (y.double() - expected).abs().max().item() <= 2e-2 * expected.abs().max().item()


def test_a_kernel_wrong_on_the_folded_shape_only_leaves_the_fold_off(fold_forced, monkeypatch):
    # The probe decides per shape: the folded view [out / FOLD, FOLD * in] is tried too, before it is used.
    real = torch.ops.aten._weight_int8pack_mm

    def wrong_when_folded(a, w, s):
        return torch.zeros(a.shape[0], w.shape[0], dtype=a.dtype) if w.shape == (8, 256) else real(a, w, s)

    monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", wrong_when_folded)
    x, weight, scale = operands(2, 32, 64)
    y = int8_linear(x, weight, scale)
    assert int8_kernels._int8pack_checked == {(32, 64): True, (8, 256): False}
    assert torch.equal(y, real(x, weight, scale.to(torch.bfloat16)))  # today's path, as it was


def test_torch_compile_traces_the_unfolded_kernel(fold_forced):
    # One graph, no break (bench --compile uses fullgraph): while tracing, the fold is off, as measured.
    x, weight, scale = operands(3, 64, 128)
    int8_linear(x, weight, scale)  # eager first, as a generation's prefill is: the probes are decided
    torch._dynamo.reset()
    with torch.inference_mode():
        explained = torch._dynamo.explain(lambda x: int8_linear(x, weight, scale))(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    kernels = [n for n in explained.graphs[0].graph.nodes if n.target is torch.ops.aten._weight_int8pack_mm]
    assert len(kernels) == 1 and kernels[0].args[1].meta["example_value"].shape == (64, 128)
    torch._dynamo.reset()


FOLD_CHECK = """
import torch
from minisail.fast import int8
x = torch.randn(1, 96).bfloat16()
weight = torch.randint(-127, 128, (24, 96), dtype=torch.int8)
sums = torch.ops.aten._weight_int8pack_mm(x, weight, torch.ones(24).bfloat16())
assert torch.equal(int8.folded_int8pack_mm(x, weight, torch.ones(24), 4), sums)
print(torch.backends.cpu.get_cpu_capability(), int8._int8pack_is_avx512())
"""


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_the_fold_is_exact_with_every_int8pack_kernel_and_off_without_avx512(capability):
    # ATen picks its kernels' CPU variant once per process: a fresh one, held to the scalar or the AVX2 kernel.
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    done = subprocess.run([sys.executable, "-c", FOLD_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    reported, avx512 = done.stdout.split()
    assert reported in {"DEFAULT", "AVX2", "NO AVX"} and avx512 == "False"
