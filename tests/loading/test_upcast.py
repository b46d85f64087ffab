"""bf16 models on CPUs without native bf16 (minisail/fast/upcast.py): large matrix products computed in float32 from
the bf16 weights, within one bf16 rounding of F.linear; chosen only where oneDNN refuses bf16 (forced here)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.checkpoints import GOLDEN
from safetensors.torch import load_file

import minisail
from minisail.fast import packing, upcast
from minisail.fast.upcast import Float32ComputeLinear, float32_linear, restore_linears, upcast_linears


def within_one_bf16_rounding(y, reference, x, weight):
    """The module docstring's bound: both are one rounding to bf16 of float32 sums of the same exact products."""
    y, reference = y.double(), reference.double()
    accumulation = 2 * weight.shape[1] * 2.0**-24 * (x.double().abs() @ weight.double().abs().T)
    return bool(((y - reference).abs() <= 2.0**-8 * (y.abs() + reference.abs()) + accumulation).all())


@pytest.mark.parametrize("rows, bias", [(8, False), (37, True), (300, True)])
def test_float32_compute_is_within_one_bf16_rounding_of_f_linear(rows, bias, monkeypatch):
    monkeypatch.setattr(upcast, "BLOCK_BYTES", 64 * 48 * 4)  # several blocks, the last one partial
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(200, 48, generator=generator).bfloat16()
    x = torch.randn(rows, 48, generator=generator).bfloat16()
    b = torch.randn(200, generator=generator).bfloat16() if bias else None
    y = float32_linear(x, weight, b)
    reference = F.linear(x, weight, b)
    assert y.dtype == torch.bfloat16 and y.shape == reference.shape
    assert within_one_bf16_rounding(y, reference, x, weight)
    assert not within_one_bf16_rounding(y * 1.02, reference, x, weight)  # the bound is tight enough to catch 2%
    exact = F.linear(x.double(), weight.double(), None if b is None else b.double())
    assert within_one_bf16_rounding(y, exact, x, weight)


def test_few_rows_run_f_linear_bit_for_bit():
    linear = torch.nn.Linear(48, 64).bfloat16()
    fast = Float32ComputeLinear.from_linear(linear)
    x = torch.randn(1, upcast.MIN_ROWS - 1, 48).bfloat16()  # rows = all but the last dim: below MIN_ROWS
    assert torch.equal(fast(x), F.linear(x, linear.weight, linear.bias))
    assert fast.weight is linear.weight and fast.bias is linear.bias  # shared, not copied


def test_not_chosen_where_bf16_is_native(onednn_packs_bf16):
    model = minisail.load(GOLDEN / "internvl-qwen2-tiny" / "checkpoint", dtype=torch.bfloat16)
    assert packing.packing_available() and upcast_linears(model) == 0


def test_fp32_linears_are_left_alone(onednn_refuses_bf16):
    model = minisail.load(GOLDEN / "internvl-qwen2-tiny" / "checkpoint", dtype=torch.float32)
    assert upcast_linears(model) == 0


def test_bf16_model_without_native_bf16_keeps_its_numbers(onednn_refuses_bf16):
    case = GOLDEN / "internvl-qwen2-tiny"
    model = minisail.load(case / "checkpoint", dtype=torch.bfloat16)
    model.image_token_id = 384
    inputs = load_file(case / "inputs.safetensors")
    ids, mask, pixels = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"].bfloat16()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        logits, vision = model(ids, mask, pixels), model.encode_images(pixels)
        reference = minisail.load(case / "checkpoint", dtype=torch.float32)
        reference.image_token_id = 384
        fp32_logits = reference(ids, mask, pixels.float())

    assert not packing.packing_available() and upcast_linears(model) > 0
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    with torch.inference_mode():
        fast_logits, fast_vision = model(ids, mask, pixels), model.encode_images(pixels)
    assert fast_vision.dtype == torch.bfloat16  # still a bf16 model
    # As close to the plain bf16 model as bf16 itself is to float32 (both are bf16 roundings of one computation).
    bf16_error = (logits - fp32_logits).abs().max()
    assert (fast_logits - logits).abs().max() <= 2 * bf16_error
    assert (fast_logits - fp32_logits).abs().max() <= 2 * bf16_error
    assert (fast_vision.float() - vision.float()).abs().max() <= 0.05 * vision.float().abs().max()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())  # the same weights, not copies

    restore_linears(model)
    assert not any(isinstance(m, Float32ComputeLinear) for m in model.modules())
    with torch.inference_mode():
        assert torch.equal(model(ids, mask, pixels), logits)
