"""Int8 decode on oneDNN's int8 dot-product kernels (minisail/fast/int8_dot.py): activations split into 3 bytes.

The split is arithmetic and is checked everywhere. The products need oneDNN's u8 x s8 kernels to sum exactly: where
they run (with or without VNNI) the module is checked against the exact float64 product; where the running CPU's
kernels are not exact the swap must refuse, which is forced here with a kernel that is off by one.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minisail.fast import int8_dot
from minisail.fast.int8 import Int8Linear, quantize_rows
from minisail.fast.int8_dot import (
    FULL_SCALE,
    LEVELS,
    MANY_ROWS,
    DotInt8Linear,
    dot_int8_linears,
    split_levels,
    undot_int8_linears,
)

U_BF16 = 2.0**-8


@pytest.fixture(autouse=True)
def fresh_decisions():
    """Each test decides anew: a forced refusal must not stay cached for the next test's shapes."""
    from conftest import _reset_fast_path_decisions

    _reset_fast_path_decisions()
    yield
    _reset_fast_path_decisions()


def recombined(codes: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_l weights[m, 0, l] * (codes[m * 3 + l] - 128), in float64: what the split says the rows are."""
    rows = weights.shape[0]
    values = codes.double().view(rows, LEVELS, -1) - int8_dot.ZERO_POINT  # [M, 3, in]
    return (weights.double().view(rows, LEVELS, 1) * values).sum(1)  # [M, in]


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 5),
    columns=st.sampled_from([1, 7, 64, 1536]),
    outlier=st.floats(1.0, 1e4),
    dtype=st.sampled_from([torch.bfloat16, torch.float32, torch.float16]),
)
def test_split_levels_holds_each_row_to_float32_precision(seed, rows, columns, outlier, dtype):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, columns, generator=generator)
    x[:, 0] *= outlier  # one large feature per row, either sign
    x = x.to(dtype)
    codes, weights = split_levels(x)
    assert codes.dtype == torch.uint8 and codes.shape == (rows * LEVELS, columns)
    largest = x.double().abs().amax(dim=1, keepdim=True)
    error = (recombined(codes, weights) - x.double()).abs()
    assert (error <= largest / FULL_SCALE * 1.01).all()  # |e| <= max|x| / FULL_SCALE, a little float32 slack


def test_the_largest_value_of_either_sign_fits_in_three_bytes():
    # x / step can round one unit above FULL_SCALE; T + OFFSET must still be below 2^24 (it once wrapped to 0)
    for value in (113.0, -113.0, 86.5, 3.0e38, 1.0e-29, 1.0):
        x = torch.tensor([[value, value / 3, -value / 7]], dtype=torch.float32)
        codes, weights = split_levels(x)
        assert torch.allclose(recombined(codes, weights), x.double(), rtol=0, atol=abs(value) / FULL_SCALE)
    assert FULL_SCALE + 1 + int8_dot.OFFSET < 2**24


def test_zero_rows_split_to_zero():
    codes, weights = split_levels(torch.zeros(2, 16, dtype=torch.bfloat16))
    assert (recombined(codes, weights) == 0).all()


def int8_linear(out_features: int, in_features: int, seed: int = 0, bias: bool = False) -> Int8Linear:
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.logspace(-3, 0, out_features)[torch.randperm(out_features, generator=generator)]
    weight, absmax = quantize_rows(torch.randn(out_features, in_features, generator=generator) * sizes[:, None])
    linear = Int8Linear(in_features, out_features, bias=bias)
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    linear.scale = absmax / 127
    if bias:
        linear.bias = torch.nn.Parameter(torch.randn(out_features, generator=generator), requires_grad=False)
    return linear


def dot_twin(linear: Int8Linear) -> DotInt8Linear:
    twin = DotInt8Linear.from_int8_linear(linear)
    if twin is None:
        pytest.skip("oneDNN's int8 sums are not exact on this CPU (the swap refuses, as it must)")
    return twin


def exact(linear: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    weight = linear.weight.double() * linear.scale.double()[:, None]
    y = x.double() @ weight.t()
    return y if linear.bias is None else y + linear.bias.double()


@pytest.mark.parametrize("shape", [(48, 64), (96, 1536), (40, 8960)])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_few_rows_are_the_exact_product_rounded_once(shape, rows, bias):
    linear = int8_linear(*shape, seed=rows, bias=bias)
    twin = dot_twin(linear)
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(rows, shape[1], generator=generator)
    x[:, 3] *= 300  # an outlier feature: what rounding activations to 8 bits would lose
    x = x.to(torch.bfloat16)
    with torch.inference_mode():
        y = twin(x)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, shape[0])
    expected = exact(linear, x)
    magnitude = x.double().abs() @ (linear.weight.double().abs() * linear.scale.double()[:, None]).t()
    row_sums = (linear.weight.double().abs() * linear.scale.double()[:, None]).sum(1)  # [out]
    split = x.double().abs().amax(dim=1, keepdim=True) / FULL_SCALE * row_sums  # the split's error, carried
    bound = U_BF16 * expected.abs() + shape[1] * 2.0**-23 * magnitude + split  # bf16 rounding, fp32, split
    assert ((y.double() - expected).abs() <= bound).all()


def test_three_dimensional_inputs_and_float32_models():
    linear = int8_linear(32, 64)
    twin = dot_twin(linear)
    x = torch.randn(2, 1, 64)
    with torch.inference_mode():
        y = twin(x)
    assert y.shape == (2, 1, 32) and y.dtype == torch.float32
    assert torch.allclose(y.double(), exact(linear, x), rtol=1e-5, atol=1e-5)


def test_many_rows_read_the_weight_back_and_run_the_plain_path():
    linear = int8_linear(80, 256, bias=True)
    twin = dot_twin(linear)
    x = torch.randn(MANY_ROWS + 3, 256).to(torch.bfloat16)
    with torch.inference_mode():
        plain, dotted = linear(x), twin(x)
    # the same arithmetic on the weight read back (transposed): within one bf16 rounding, equal where oneDNN
    # picks the same kernel for the transposed weight (the Zen 5 it was measured on)
    assert torch.allclose(dotted.float(), plain.float(), rtol=2 * U_BF16, atol=1e-3)


def test_infinite_inputs_take_the_float_path():
    linear = int8_linear(16, 64)
    twin = dot_twin(linear)
    x = torch.randn(1, 64)
    x[0, 5] = float("inf")
    with torch.inference_mode():
        assert torch.equal(twin(x).isnan(), linear(x).isnan())


def test_state_dict_and_undo_give_the_int8_linear_back():
    linear = int8_linear(24, 64, bias=True)
    model = torch.nn.Sequential(linear)
    saved = {name: value.clone() for name, value in model.state_dict().items()}
    assert dot_int8_linears(model, force=True) in (0, 1)
    if not isinstance(model[0], DotInt8Linear):
        pytest.skip("oneDNN's int8 sums are not exact on this CPU (the swap refuses, as it must)")
    assert {name: torch.equal(value, saved[name]) for name, value in model.state_dict().items()} == dict.fromkeys(
        saved, True
    )
    undot_int8_linears(model)
    assert type(model[0]) is Int8Linear
    assert torch.equal(model[0].weight, saved["0.weight"]) and torch.equal(model[0].scale, saved["0.scale"])


def test_exact_sums_blockwise_match_the_whole_product():
    weight = torch.randint(-127, 128, (37, 50), dtype=torch.int8)
    codes = torch.randint(0, 256, (3, 50), dtype=torch.uint8)
    whole = ((codes.double() - 128) @ weight.double().t()).float()
    assert torch.equal(int8_dot._exact_sums(codes, weight, block_rows=8), whole)


def off_by_one(real):
    def qlinear(codes, packed, scale, zeros=None):
        y = real(codes, packed, scale, zeros)
        y[..., -1] += 1
        return y

    return qlinear


def test_a_kernel_whose_sums_are_not_exact_is_refused(monkeypatch):
    monkeypatch.setattr(int8_dot, "_qlinear", off_by_one(int8_dot._qlinear))
    int8_dot.dot_support.cache_clear()
    int8_dot._checked.clear()
    support = int8_dot.dot_support()
    assert not support.available
    if "VNNI" not in support.reason:  # on a CPU with VNNI the probe itself must have caught it
        assert "not exact" in support.reason or "cannot pack" in support.reason
    model = torch.nn.Sequential(int8_linear(16, 64))
    assert dot_int8_linears(model, force=True) == 0 and type(model[0]) is Int8Linear  # the per-shape probe too


def test_without_vnni_the_path_stays_off(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False)
    int8_dot.dot_support.cache_clear()
    support = int8_dot.dot_support()
    assert not support.available and "VNNI" in support.reason
    model = torch.nn.Sequential(int8_linear(16, 64))
    assert dot_int8_linears(model) == 0 and type(model[0]) is Int8Linear


def test_the_swap_keeps_only_the_packed_weight():
    model = torch.nn.Sequential(int8_linear(16, 64), int8_linear(8, 16))
    if dot_int8_linears(model, force=True) != 2:
        pytest.skip("oneDNN's int8 sums are not exact on this CPU (the swap refuses, as it must)")
    assert all(not hasattr(module, "weight") for module in model)
    assert {name for name, _ in model.named_buffers()} == {
        f"{i}.{name}" for i in (0, 1) for name in ("packed", "scale", "weight_zeros")
    }
