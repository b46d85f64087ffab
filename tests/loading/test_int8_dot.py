"""Int8 decode on integer dot-product kernels (minisail/fast/int8_dot.py): activations split exactly into digits,
3 bytes for oneDNN (VNNI), 3 digits of 7 bits for fbgemm (AVX2).

The split is arithmetic and is checked everywhere, for both kernels' digits. The products need the kernel to sum
exactly: both kernels are run here whatever this CPU would pick (a kernel that is not exact on this CPU is refused
by its probe, and the test that needs it skips, saying so), each checked against the exact float64 product; a
kernel that is off by one must be refused, which is forced.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minisail.fast import int8_dot
from minisail.fast.int8 import Int8Linear, quantize_rows
from minisail.fast.int8_dot import MANY_ROWS, DotInt8Linear, dot_int8_linears, split_levels, undot_int8_linears
from minisail.fast.int8_dot_kernels import FBGEMM, ONEDNN, FbgemmDigits, exact_sums

KERNELS = [pytest.param(kernel, id=kernel.name) for kernel in (ONEDNN, FBGEMM)]

U_BF16 = 2.0**-8


@pytest.fixture(autouse=True)
def fresh_decisions():
    """Each test decides anew: a forced refusal must not stay cached for the next test's shapes."""
    from conftest import _reset_fast_path_decisions

    _reset_fast_path_decisions()
    yield
    _reset_fast_path_decisions()


def recombined(kernel, digits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_l weights[m, 0, l] * value(digits[m * levels + l]), in float64: what the split says the rows are."""
    rows, levels = weights.shape[0], kernel.levels
    values = kernel.values(digits).view(rows, levels, -1)  # [M, levels, in]
    assert (values >= -kernel.zero_point).all() and (values < kernel.zero_point).all()  # digits in range
    return (weights.double().view(rows, levels, 1) * values).sum(1)  # [M, in]


@pytest.mark.parametrize("kernel", KERNELS)
@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 5),
    columns=st.sampled_from([1, 7, 64, 1536]),
    outlier=st.floats(1.0, 1e4),
    dtype=st.sampled_from([torch.bfloat16, torch.float32, torch.float16]),
)
def test_split_levels_holds_each_row_to_its_precision(kernel, seed, rows, columns, outlier, dtype):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, columns, generator=generator)
    x[:, 0] *= outlier  # one large feature per row, either sign
    x = x.to(dtype)
    digits, weights = split_levels(x, kernel)
    assert digits.shape == (rows * kernel.levels, columns)
    largest = x.double().abs().amax(dim=1, keepdim=True)
    error = (recombined(kernel, digits, weights) - x.double()).abs()
    assert (error <= largest / kernel.full_scale * 1.01).all()  # |e| <= max|x| / full_scale, float32 slack


def test_the_kernels_precision():
    assert (ONEDNN.full_scale, ONEDNN.offset, ONEDNN.zero_point) == (8355710, 8421504, 128)  # float32's 2^-23
    assert (FBGEMM.full_scale, FBGEMM.offset, FBGEMM.zero_point) == (1040318, 1056832, 64)  # 2^-20
    assert FBGEMM.zero_point * 2 * 127 * 2 < 2**15  # two 7-bit digits times int8 weights: 16-bit pair sums hold


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_largest_value_of_either_sign_fits_in_the_digits(kernel):
    # x / step can round one unit above full_scale; T + offset must still fit the digits (it once wrapped to 0)
    for value in (113.0, -113.0, 86.5, 3.0e38, 1.0e-29, 1.0):
        x = torch.tensor([[value, value / 3, -value / 7]], dtype=torch.float32)
        digits, weights = split_levels(x, kernel)
        got = recombined(kernel, digits, weights)
        assert torch.allclose(got, x.double(), rtol=0, atol=abs(value) / kernel.full_scale)
    lowest, highest = kernel.offset - kernel.full_scale - 1, kernel.offset + kernel.full_scale + 1  # U's range
    assert 0 < lowest and highest < 2 ** (kernel.bits * kernel.levels)


@pytest.mark.parametrize("kernel", KERNELS)
def test_zero_rows_split_to_zero(kernel):
    digits, weights = split_levels(torch.zeros(2, 16, dtype=torch.bfloat16), kernel)
    assert (recombined(kernel, digits, weights) == 0).all()


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


def dot_twin(linear: Int8Linear, kernel) -> DotInt8Linear:
    if not kernel.exists():
        pytest.skip(f"this torch build has no {kernel.name} int8 linear")
    twin = DotInt8Linear.from_int8_linear(linear, kernel)
    if twin is None:
        pytest.skip(f"{kernel.name}'s int8 sums are not exact on this CPU (the swap refuses, as it must)")
    return twin


def exact(linear: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    weight = linear.weight.double() * linear.scale.double()[:, None]
    y = x.double() @ weight.t()
    return y if linear.bias is None else y + linear.bias.double()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", [(48, 64), (96, 1536), (40, 8960)])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_few_rows_are_the_exact_product_rounded_once(kernel, shape, rows, bias):
    linear = int8_linear(*shape, seed=rows, bias=bias)
    twin = dot_twin(linear, kernel)
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
    split = x.double().abs().amax(dim=1, keepdim=True) / kernel.full_scale * row_sums  # the split's error
    bound = U_BF16 * expected.abs() + shape[1] * 2.0**-23 * magnitude + split  # bf16 rounding, fp32, split
    assert ((y.double() - expected).abs() <= bound).all()


@pytest.mark.parametrize("kernel", KERNELS)
def test_three_dimensional_inputs_and_float32_models(kernel):
    linear = int8_linear(32, 64)
    twin = dot_twin(linear, kernel)
    x = torch.randn(2, 1, 64)
    with torch.inference_mode():
        y = twin(x)
    assert y.shape == (2, 1, 32) and y.dtype == torch.float32
    assert torch.allclose(y.double(), exact(linear, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_many_rows(kernel):
    linear = int8_linear(80, 256, bias=True)
    twin = dot_twin(linear, kernel)
    x = torch.randn(MANY_ROWS + 3, 256).to(torch.bfloat16)
    with torch.inference_mode():
        dotted = twin(x)
    # oneDNN: the plain path's arithmetic on the weight read back (bf16 products: a rounding of the product before
    # the scale and one after); fbgemm: its digits (one rounding). Either within two bf16 roundings of the sizes.
    magnitude = x.double().abs() @ (linear.weight.double().abs() * linear.scale.double()[:, None]).t()
    magnitude += linear.bias.double().abs()
    assert ((dotted.double() - exact(linear, x)).abs() <= 2 * U_BF16 * magnitude).all()


@pytest.mark.parametrize("kernel", KERNELS)
def test_empty_inputs_give_empty_outputs(kernel):
    linear = int8_linear(48, 64)
    twin = dot_twin(linear, kernel)
    for shape in [(0, 64), (1, 0, 64), (2, 0, 64)]:
        x = torch.randn(*shape).to(torch.bfloat16)
        with torch.inference_mode():
            assert twin(x).shape == linear(x).shape == (*shape[:-1], 48)


@pytest.mark.parametrize("kernel", KERNELS)
def test_infinite_inputs_take_the_float_path(kernel):
    linear = int8_linear(16, 64)
    twin = dot_twin(linear, kernel)
    for bad, rows in itertools.product((float("inf"), float("-inf"), float("nan")), (1, 2)):  # decode's one row too
        x = torch.randn(rows, 64)
        x[-1, 5] = bad
        with torch.inference_mode():
            assert torch.equal(twin(x).isnan(), linear(x).isnan()) and torch.equal(twin(x).isinf(), linear(x).isinf())


@pytest.mark.parametrize("kernel", KERNELS)
def test_state_dict_and_undo_give_the_int8_linear_back(kernel):
    dot_twin(int8_linear(24, 64), kernel)  # skips where this kernel is not here or not exact
    linear = int8_linear(24, 64, bias=True)
    model = torch.nn.Sequential(linear)
    saved = {name: value.clone() for name, value in model.state_dict().items()}
    assert dot_int8_linears(model, kernel=kernel) == 1 and isinstance(model[0], DotInt8Linear)
    assert {name: torch.equal(value, saved[name]) for name, value in model.state_dict().items()} == dict.fromkeys(
        saved, True
    )
    undot_int8_linears(model)
    assert type(model[0]) is Int8Linear
    assert torch.equal(model[0].weight, saved["0.weight"]) and torch.equal(model[0].scale, saved["0.scale"])


def test_exact_sums_blockwise_match_the_whole_product():
    weight = torch.randint(-127, 128, (37, 50), dtype=torch.int8)
    values = torch.randint(-128, 128, (3, 50)).double()
    whole = (values @ weight.double().t()).float()
    assert torch.equal(exact_sums(values, weight, block_rows=8), whole)


def off_by_one(real):
    def sums(*args):
        y = real(*args)
        y[..., -1] += 1
        return y

    return sums


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_kernel_whose_sums_are_not_exact_is_refused(kernel, monkeypatch):
    if not kernel.exists():
        pytest.skip(f"this torch build has no {kernel.name} int8 linear")
    monkeypatch.setattr(type(kernel), "sums", off_by_one(type(kernel).sums))
    assert "not exact" in int8_dot.kernel_sums_exactly(kernel)
    model = torch.nn.Sequential(int8_linear(16, 64))
    assert dot_int8_linears(model, kernel=kernel) == 0 and type(model[0]) is Int8Linear  # the per-shape probe too
    if kernel is FBGEMM:
        monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False)  # so that it is the kernel picked
    support = int8_dot.dot_support()
    assert support.kernel is not kernel
    vnni = torch.cpu._is_vnni_supported() and torch.backends.cpu.get_cpu_capability() == "AVX512"
    if kernel is FBGEMM:  # the last candidate: nothing runs
        assert not support.available and "not exact" in support.reason
    elif vnni:  # oneDNN refused: fbgemm is tried next, and the reason says why oneDNN was not taken
        assert support.kernel in (FBGEMM, None) and "oneDNN's int8 sums are not exact" in support.reason


def test_without_vnni_fbgemm_runs_or_nothing(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False)  # as on an AVX2-only CPU
    support = int8_dot.dot_support()
    assert support.kernel in (FBGEMM, None)
    model = torch.nn.Sequential(int8_linear(16, 64))
    expected = 1 if support.available else 0
    assert dot_int8_linears(model) == expected
    if support.available:
        assert model[0].kernel is FBGEMM and "7 bits" in support.reason
    else:
        assert type(model[0]) is Int8Linear


def test_without_either_kernel_the_path_stays_off(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False)
    monkeypatch.setattr(FbgemmDigits, "exists", lambda self: False)  # fbgemm is x86-only: as on ARM
    support = int8_dot.dot_support()
    assert not support.available and "no fbgemm" in support.reason
    model = torch.nn.Sequential(int8_linear(16, 64))
    assert dot_int8_linears(model) == 0 and type(model[0]) is Int8Linear


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_swap_keeps_only_the_packed_weight(kernel):
    dot_twin(int8_linear(16, 64), kernel)
    model = torch.nn.Sequential(int8_linear(16, 64), int8_linear(8, 16))
    assert dot_int8_linears(model, kernel=kernel) == 2
    assert all(not hasattr(module, "weight") for module in model)
    buffers = {name for name, _ in model.named_buffers()}
    packed = {f"{i}.packed" for i in (0, 1)} if kernel is ONEDNN else set()  # fbgemm's is no tensor
    assert buffers == packed | {f"{i}.{name}" for i in (0, 1) for name in ("scale", "weight_zeros")}
    assert sum(module.opaque_weight_bytes for module in model) == (0 if kernel is ONEDNN else 16 * 64 + 8 * 16)


@pytest.mark.parametrize("kernel", KERNELS)
def test_each_freed_plain_weight_goes_back_to_the_os_before_the_next_copy(kernel, monkeypatch):
    # A weight under glibc's 32 MB mmap threshold sits in the heap once freed: resident, unless the heap is trimmed.
    from minisail.fast import int8_dot

    model = torch.nn.Sequential(int8_linear(16, 64), int8_linear(8, 16), int8_linear(4, 8))
    kind_at_each_trim = []
    monkeypatch.setattr(int8_dot, "trim_heap", lambda: kind_at_each_trim.append(type(model[len(kind_at_each_trim)])))
    assert dot_int8_linears(model, kernel=kernel) == 3
    assert kind_at_each_trim == [DotInt8Linear] * 3  # each trim right after its own swap
