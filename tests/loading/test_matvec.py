"""bf16 decode's one-row products as torch.mv (minisail/fast/matvec.py): F.linear's bits wherever used, decided
per weight shape by a probe that a kernel differing on one row of twelve fails; forced on so any CPU runs it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.checkpoints import GOLDEN
from hypothesis import given, settings
from hypothesis import strategies as st

import minisail
from minisail.fast import matvec
from minisail.fast.matvec import MatVecLinear, matvec_linears, one_row_product, same_bits_as_linear


@pytest.fixture(autouse=True)
def fresh_probes():
    matvec._probed.clear()
    yield
    matvec._probed.clear()


@settings(max_examples=25, deadline=None)
@given(out=st.integers(1, 300), inp=st.integers(1, 300), bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_a_swapped_linear_returns_f_linears_bits_for_every_row_count(out, inp, bias, seed):
    generator = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(inp, out, bias=bias).bfloat16()
    fast = MatVecLinear.from_linear(linear)
    assert fast.weight is linear.weight and fast.bias is linear.bias  # shared, not copied
    with torch.inference_mode():
        for shape in ((inp,), (1, inp), (1, 1, inp), (3, inp), (2, 5, inp)):
            x = torch.randn(shape, generator=generator).bfloat16()
            y = fast(x)
            assert y.shape == (*shape[:-1], out)
            if x.dim() == 1 or same_bits_as_linear(linear.weight, linear.bias) or x.numel() != inp:
                assert torch.equal(y, F.linear(x, linear.weight, linear.bias))


def test_a_1d_input_gets_f_linears_bits_which_round_twice_with_a_bias():
    # Found by CI: F.linear on a 1-D x takes another path than on a 2-D row (which the probe compares with
    # addmv). 0.6602 * 0.7266 - 0.2793 = 0.2004: 0.2002 through F.linear (one rounding), 0.2012 through addmv
    linear = torch.nn.Linear(1, 1).bfloat16()
    with torch.no_grad():
        linear.weight.fill_(1.0)
        linear.bias.fill_(0.5)
        assert same_bits_as_linear(linear.weight, linear.bias)  # the shape's probe passes (exact sums)
        linear.weight.fill_(0.7266)  # the same shape: the probe is not asked again
        linear.bias.fill_(-0.2793)
    fast, x = MatVecLinear.from_linear(linear), torch.tensor([0.6602]).bfloat16()
    with torch.inference_mode():
        assert torch.equal(fast(x), F.linear(x, linear.weight, linear.bias))
        assert fast(x).item() == F.linear(x, linear.weight, linear.bias).item()


def test_the_bias_is_added_before_the_one_rounding():
    """addmv adds the bias inside the product, as F.linear does; mv then + bias would round twice."""
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(64, 48, generator=generator).bfloat16(), torch.randn(64, generator=generator).bfloat16()
    x = torch.randn(48, generator=generator).bfloat16()
    assert torch.equal(one_row_product(x, weight, bias), torch.addmv(bias, weight, x))


def test_a_kernel_that_differs_on_one_probe_row_is_refused(monkeypatch):
    calls = []
    real = matvec.one_row_product

    def differs_on_the_ninth_row(x, weight, bias):
        calls.append(1)
        y = real(x, weight, bias)
        return y + 1 if len(calls) == 9 else y

    monkeypatch.setattr(matvec, "one_row_product", differs_on_the_ninth_row)
    linear = torch.nn.Linear(32, 16, bias=False).bfloat16()
    assert not same_bits_as_linear(linear.weight, None)
    assert len(calls) == 9  # it stopped at the first difference
    model = torch.nn.Sequential(linear)
    assert matvec_linears(model, force=True) == 0 and type(model[0]) is torch.nn.Linear


def test_a_kernel_that_raises_is_refused(monkeypatch):
    def raises(*args):
        raise RuntimeError("no such kernel here")

    monkeypatch.setattr(matvec, "one_row_product", raises)
    linear = torch.nn.Linear(32, 16).bfloat16()
    assert not same_bits_as_linear(linear.weight, linear.bias)
    with torch.inference_mode():  # the swap refused, a forward still works through F.linear
        x = torch.ones(1, 32).bfloat16()
        assert torch.equal(MatVecLinear.from_linear(linear)(x), linear(x))


def test_the_probe_is_per_thread_count(monkeypatch):
    linear = torch.nn.Linear(32, 16).bfloat16()
    same_bits_as_linear(linear.weight, linear.bias)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)
    same_bits_as_linear(linear.weight, linear.bias)
    assert {key[-1] for key in matvec._probed} >= {97}
    assert len(matvec._probed) == 2


def test_only_where_bf16_is_native_unless_forced(onednn_refuses_bf16):
    model = torch.nn.Sequential(torch.nn.Linear(32, 16).bfloat16(), torch.nn.Linear(16, 8))  # bf16, fp32
    assert matvec_linears(model) == 0
    assert matvec_linears(model, force=True) <= 1 and type(model[1]) is torch.nn.Linear  # fp32 is left alone


def test_unswap_gives_plain_linears_with_the_same_parameters():
    linear = torch.nn.Linear(32, 16).bfloat16()
    model = torch.nn.Sequential(MatVecLinear.from_linear(linear))
    matvec.unswap_matvec_linears(model)
    assert type(model[0]) is torch.nn.Linear and model[0].weight is linear.weight


def test_a_bf16_model_decodes_the_same_tokens_and_logits():
    case = GOLDEN / "internvl-qwen2-tiny" / "checkpoint"
    plain = minisail.load(case, dtype=torch.bfloat16)
    fast = minisail.load(case, dtype=torch.bfloat16)
    if matvec_linears(fast.language_model, force=True) == 0:
        pytest.skip("no weight shape of this model gives F.linear's bits through torch.mv on this CPU")
    decoder, fast_decoder = plain.language_model, fast.language_model
    ids = torch.tensor([[5, 17, 3, 99, 42]])
    with torch.inference_mode():
        cache, fast_cache = decoder.new_cache(1, 16), fast_decoder.new_cache(1, 16)
        positions = torch.arange(5)[None]
        logits = decoder(decoder.embed(ids), positions, cache)[:, -1]
        fast_logits = fast_decoder(fast_decoder.embed(ids), positions, fast_cache)[:, -1]
        assert torch.equal(logits, fast_logits)
        for step in range(5, 10):  # one row at a time: the torch.mv path
            token = logits.argmax(-1, keepdim=True)
            position = torch.tensor([[step]])
            logits = decoder(decoder.embed(token), position, cache)[:, -1]
            fast_logits = fast_decoder(fast_decoder.embed(token), position, fast_cache)[:, -1]
            assert torch.equal(logits, fast_logits)


@pytest.mark.parametrize("amx", [True, False])
def test_chosen_only_where_amx_runs(monkeypatch, onednn_packs_bf16, amx):
    """Measured faster than packing on AMX, slower on Zen 5 (AVX-512 BF16 without AMX): the rule follows AMX."""
    monkeypatch.setattr(matvec, "amx_usable", lambda: amx)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16).bfloat16())
    assert matvec.matvec_wanted() is amx
    assert (matvec_linears(model) > 0) == (amx and same_bits_as_linear(model[0].weight, model[0].bias))
