"""The vision towers' bf16 attention on bf16 products (minisail/fast/vit_attention.py): its error against a float64
attention stays within the stated multiples of SDPA's own, over flat to peaky scores and every kind of scale, and
the row-max shift is what keeps it there (the same products without it fail the bound)."""

from __future__ import annotations

import pytest
import torch
from helpers.checkpoints import GOLDEN
from safetensors.torch import load_file

import minisail
from minisail.fast import vit_attention as fast
from minisail.fast.vit_attention import (
    RMS_BOUND,
    WORST_BOUND,
    attention_errors,
    max_shifted_attention,
    use_fast_vit_attention,
    use_sdpa_vit_attention,
)
from minisail.layers import vit_attention


def random_qkv(N, L, heads, D, sharpness, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(N, L, heads * D, generator=generator) for _ in range(3))
    return (q * sharpness).bfloat16(), (k * sharpness).bfloat16(), v.bfloat16()  # sharpness: how peaky the softmax


SHAPES = [  # N, L, heads, D, scale (None: head_dim^-0.5, a power of two only for D = 64)
    (2, 257, 4, 64, None),
    (1, 100, 3, 128, None),  # 128^-0.5: the scores are multiplied after the shift; 3 heads: a partial last group
    (1, 65, 2, 80, 1.0),  # CLIP: q scaled before the call
    (3, 17, 5, 16, None),
    (1, 257, 2, 96, None),  # where the worst element came closest to its bound (2.3x) in a sweep of 800 cases
    (1, 130, 2, 128, -0.3),  # a negative scale: q negated, so the shift is still by the row's maximum
]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("sharpness", [0.25, 1.0, 2.0, 4.0, 8.0])
@pytest.mark.parametrize("shape", SHAPES)
def test_error_within_the_stated_multiples_of_sdpa(shape, sharpness, seed):
    N, L, heads, D, scale = shape
    q, k, v = random_qkv(N, L, heads, D, sharpness, seed)
    ours_rms, ours_worst = attention_errors(max_shifted_attention, q, k, v, heads, scale)
    sdpa_rms, sdpa_worst = attention_errors(vit_attention, q, k, v, heads, scale)
    assert ours_rms <= RMS_BOUND * sdpa_rms and ours_worst <= WORST_BOUND * sdpa_worst


def unshifted_attention(q, k, v, num_heads, scale=None):
    """The same bf16 products without the row-max shift (a naive bf16 attention): the control."""
    N, L, C = q.shape
    D = C // num_heads
    q, k, v = (t.view(N, L, num_heads, D).transpose(1, 2) for t in (q, k, v))
    scores = torch.matmul(q, k.transpose(-1, -2)) * (D**-0.5 if scale is None else scale)
    return torch.matmul(torch.softmax(scores, -1), v).transpose(1, 2).reshape(N, L, C)


@pytest.mark.parametrize("sharpness", [2.0, 4.0])
def test_without_the_shift_the_bound_fails(sharpness):
    q, k, v = random_qkv(2, 257, 4, 64, sharpness)
    naive_rms, _ = attention_errors(unshifted_attention, q, k, v, 4)
    sdpa_rms, _ = attention_errors(vit_attention, q, k, v, 4)
    assert naive_rms > 1.5 * RMS_BOUND * sdpa_rms  # 5-6x SDPA's error


def test_other_dtypes_take_sdpa_itself():
    q, k, v = (t.float() for t in random_qkv(1, 33, 2, 16, 1.0))
    assert torch.equal(max_shifted_attention(q, k, v, 2), vit_attention(q, k, v, 2))


@pytest.mark.parametrize("shape", [(0, 33, 32), (1, 0, 32)])
def test_empty_inputs_give_sdpas_empty_output(shape):
    q = torch.zeros(shape, dtype=torch.bfloat16)
    assert max_shifted_attention(q, q, q, 2).shape == vit_attention(q, q, q, 2).shape


def test_a_traced_call_takes_sdpa():
    q, k, v = random_qkv(1, 33, 2, 16, 1.0)
    compiled = torch.compile(max_shifted_attention, backend="eager", fullgraph=True)
    assert torch.equal(compiled(q, k, v, 2), vit_attention(q, k, v, 2))


def test_a_gradient_through_the_inputs_takes_sdpa():
    q, k, v = random_qkv(1, 33, 2, 16, 1.0)
    q.requires_grad_(True)
    y = max_shifted_attention(q, k, v, 2)
    assert torch.equal(y, vit_attention(q, k, v, 2))
    y.float().sum().backward()  # the buffers of the fast path would refuse this
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_a_tower_still_gives_gradients_to_its_pixels():
    model = minisail.load(GOLDEN / "internvl-qwen2-tiny" / "checkpoint", dtype=torch.bfloat16)
    use_fast_vit_attention(model)
    pixels = torch.randn(1, 3, 112, 112, requires_grad=True)
    model.encode_images(pixels).float().sum().backward()
    assert pixels.grad is not None and torch.isfinite(pixels.grad).all()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_any_number_of_heads_per_product_gives_the_same_numbers(threads):
    q, k, v = random_qkv(2, 40, 3, 32, 2.0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        reference = max_shifted_attention(q, k, v, 3)
        torch.set_num_threads(threads)
        assert torch.equal(max_shifted_attention(q, k, v, 3), reference)
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- towers: swapped per module, within the bound


TOWERS = ["internvl-qwen2-tiny", "sail-vl2-tiny", "yi-vl-tiny"]  # InternViT, SAIL-ViT, CLIP


@pytest.mark.parametrize("case", TOWERS)
def test_a_tower_on_the_fast_attention_stays_within_the_bound(case):
    folder = GOLDEN / case / "checkpoint"
    pixels = load_file(GOLDEN / case / "inputs.safetensors")["pixel_values"]
    exact = minisail.load(folder, dtype=torch.float64)
    model = minisail.load(folder, dtype=torch.bfloat16)
    with torch.inference_mode():
        reference = exact.encode_images(pixels.double())
        sdpa = model.encode_images(pixels.bfloat16()).double() - reference
        assert use_fast_vit_attention(model) > 0
        ours = model.encode_images(pixels.bfloat16()).double() - reference
        use_sdpa_vit_attention(model)
        assert torch.equal(model.encode_images(pixels.bfloat16()).double() - reference, sdpa)  # undone
    rms = lambda error: error.pow(2).mean().sqrt().item()  # noqa: E731
    assert rms(ours) <= RMS_BOUND * rms(sdpa) and ours.abs().max() <= WORST_BOUND * sdpa.abs().max()


def test_the_decoder_has_nothing_to_swap():
    model = minisail.load(GOLDEN / "internvl-qwen2-textonly" / "checkpoint", dtype=torch.bfloat16)
    assert use_fast_vit_attention(model.language_model) == 0


# ---------------------------------------------------------------- when it is used


def test_support_needs_native_bf16(onednn_refuses_bf16):
    support = fast.fast_attention_support()
    assert not support.available and "native bf16" in support.reason


def test_support_leaves_amx_to_sdpa(onednn_packs_bf16, monkeypatch):
    monkeypatch.setattr(fast, "amx_usable", lambda: True)
    support = fast.fast_attention_support()
    assert not support.available and "AMX" in support.reason


def test_support_refuses_a_kernel_outside_the_bound(onednn_packs_bf16, monkeypatch):
    monkeypatch.setattr(fast, "amx_usable", lambda: False)
    monkeypatch.setattr(fast, "max_shifted_attention", unshifted_attention)  # as if the products rounded badly
    support = fast.fast_attention_support()
    assert not support.available and "too far off" in support.reason


def test_support_accepts_the_real_kernel(onednn_packs_bf16, monkeypatch):
    monkeypatch.setattr(fast, "amx_usable", lambda: False)
    assert fast.fast_attention_support().available
