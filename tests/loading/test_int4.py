"""Int4 weights: group-wise quantisation, the CPU kernel against the plain path, its forced fallback, and
quantize="int4" at load on every golden case (how far it moves the logits from the float model).

Measured on the golden cases (tiny random models: hidden 64, so one group per row; torch 2.13, AVX-512 CPU), int4
against fp32, relative error of the logits ||int4 - fp32|| / ||fp32|| and top-1 agreement over all positions:
rel 0.071-0.183 (mean ~0.14), top-1 0.696-0.955 (mean ~0.84), the same in fp32 (plain path) and bf16 (kernel);
bf16 alone: rel 0.005-0.013, top-1 0.94-1.0. A tiny random model has nearly flat logits, so its top-1 is fragile:
the bounds below (rel < 0.25, top-1 >= 0.6 per case, mean >= 0.75) hold with margin and still fail for a wrong
scale or zero (tests here flip one), a swapped nibble or group layout (rel ~1.4).
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers.checkpoints import GOLDEN, golden_config, golden_tensors, write_checkpoint
from torch import nn

import minisail
from minisail.errors import ConfigError, MinisailError
from minisail.fast import int4 as int4_kernels
from minisail.fast.int4 import (
    GROUP_SIZE,
    Int4Linear,
    blocked_int4_matmul,
    dequantize,
    pack_for_kernel,
    quantize_groups,
    reference_int4_linear,
)
from minisail.fast.int4_checkpoint import int4_linear_names
from minisail.fast.int8 import Int8Linear
from minisail.generate import greedy_generate
from minisail.models.registry import detect_family
from minisail.parity import image_token_id, read_tensors

CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "meta.json").is_file())
SAIL = "sail-vl2-tiny"


@pytest.fixture(autouse=True)
def fresh_decisions():
    int4_kernels._int4pack_checked.clear()
    yield
    int4_kernels._int4pack_checked.clear()


def logits_of(case: str, **load_options) -> tuple[nn.Module, torch.Tensor]:
    """(model, float32 logits [positions, V]) of the case's inputs (the real positions; every one for Yi-VL, whose
    image expands the sequence beyond the mask)."""
    model = minisail.load(GOLDEN / case / "checkpoint", **load_options)
    if model.image_token_id is None:  # the golden checkpoints carry no tokenizer: the case's meta says
        model.image_token_id = image_token_id(json.loads((GOLDEN / case / "meta.json").read_text()))
    inputs = read_tensors(GOLDEN / case / "inputs.safetensors")
    with torch.inference_mode():
        logits = model(inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values")).float()
    mask = inputs["attention_mask"].bool()
    return model, logits[mask] if mask.shape == logits.shape[:2] else logits.reshape(-1, logits.shape[-1])


def int4_modules(model) -> list[Int4Linear]:
    return [m for m in model.modules() if isinstance(m, Int4Linear)]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# --- quantisation ------------------------------------------------------------------------------------------------


def test_quantize_round_trip_is_within_half_a_step_per_weight():
    w = torch.randn(96, 4 * GROUP_SIZE, generator=torch.Generator().manual_seed(0))
    w[3, :GROUP_SIZE] = 0.25  # a constant group: every code means its zero, exactly
    codes, scale_zeros = quantize_groups(w)
    assert codes.dtype == torch.uint8 and codes.shape == (96, 2 * GROUP_SIZE)
    assert scale_zeros.dtype == torch.bfloat16 and scale_zeros.shape == (96, 4, 2)
    back = dequantize(codes, scale_zeros)
    step = scale_zeros[..., 0].float().repeat_interleave(GROUP_SIZE, dim=1)
    # The codes round against the bf16 scale and zero; the bf16 scale may be up to 2^-9 short of (max - min)/15,
    # so the group's extreme clamps at most 15 * 2^-9 steps further.
    assert bool(((back - w).abs() <= step * (0.5 + 15 * 2**-9) + 1e-7).all())
    assert torch.equal(back[3, :GROUP_SIZE], torch.full((GROUP_SIZE,), 0.25))
    # Gaussian weights, groups of 64: 9.0% relative error (measured; 16 levels over ~4.6 sigma)
    assert 0.08 < relative(back, w) < 0.10


def test_quantize_refuses_a_width_that_is_not_a_multiple_of_the_group():
    with pytest.raises(ValueError, match="multiple of the int4 group size"):
        quantize_groups(torch.randn(4, GROUP_SIZE + 32))
    with pytest.raises(ValueError, match="multiple of the int4 group size"):
        Int4Linear(GROUP_SIZE + 32, 16)


def test_plain_path_is_the_definition():
    generator = torch.Generator().manual_seed(1)
    codes, scale_zeros = quantize_groups(torch.randn(200, 2 * GROUP_SIZE, generator=generator))
    scale_zeros = scale_zeros.transpose(0, 1).contiguous()
    x = torch.randn(3, 2 * GROUP_SIZE, generator=generator)
    expected = reference_int4_linear(x, codes, scale_zeros)
    old_block = int4_kernels.BLOCK_BYTES
    try:
        int4_kernels.BLOCK_BYTES = 64 * 2 * GROUP_SIZE * 4  # 64 rows a block: several blocks and a partial one
        assert torch.equal(blocked_int4_matmul(x, codes, scale_zeros), expected)
    finally:
        int4_kernels.BLOCK_BYTES = old_block


# --- the CPU kernel and its fallback -----------------------------------------------------------------------------


def kernel_or_skip(codes, scale_zeros):
    packed = pack_for_kernel(codes, scale_zeros, GROUP_SIZE)
    if packed is None:
        pytest.skip("torch's CPU int4 kernel does not run (or agree) on this machine: the plain path runs instead")
    return packed


@pytest.mark.parametrize("out_features", [64, 1040, 2112])  # one block; 1024-row pack blocks + a partial one
def test_kernel_agrees_with_the_plain_path(out_features):
    generator = torch.Generator().manual_seed(2)
    codes, scale_zeros = quantize_groups(torch.randn(out_features, 3 * GROUP_SIZE, generator=generator))
    scale_zeros = scale_zeros.transpose(0, 1).contiguous()
    packed = kernel_or_skip(codes, scale_zeros)
    x = torch.randn(5, 3 * GROUP_SIZE, generator=generator).to(torch.bfloat16)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP_SIZE, scale_zeros)
    expected = reference_int4_linear(x.float(), codes, scale_zeros)  # fp32 weights and products
    assert relative(y, expected) < 4e-3  # bf16 output rounding (measured 2.8e-3 on every row)
    assert relative(blocked_int4_matmul(x, codes, scale_zeros), expected) < 4e-3


def test_probe_refuses_a_kernel_that_disagrees(monkeypatch):
    codes, scale_zeros = quantize_groups(torch.randn(64, GROUP_SIZE))
    scale_zeros = scale_zeros.transpose(0, 1).contiguous()
    wrong = lambda x, w, group, sz: torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype)  # noqa: E731
    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", wrong)
    assert pack_for_kernel(codes, scale_zeros, GROUP_SIZE) is None


@pytest.fixture
def int4pack_fails(monkeypatch):
    """torch's int4 kernel raises, as a CPU or build without it would."""

    def fail(*args, **kwargs):
        raise RuntimeError("_weight_int4pack_mm_for_cpu: not implemented for this CPU")

    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", fail)


def test_a_failing_kernel_falls_back_to_the_plain_path_with_the_same_numbers(monkeypatch):
    kernel_model, kernel_logits = logits_of(SAIL, dtype=torch.bfloat16, quantize="int4")
    if not all(m.kernel_layout for m in int4_modules(kernel_model)):
        pytest.skip("torch's CPU int4 kernel does not run here: nothing to fall back from")
    int4_kernels._int4pack_checked.clear()
    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", lambda *a: (_ for _ in ()).throw(RuntimeError))
    model, logits = logits_of(SAIL, dtype=torch.bfloat16, quantize="int4")
    linears = int4_modules(model)
    assert linears and not any(m.kernel_layout for m in linears)
    # The same codes, scales and zeros; the plain path rounds the dequantised weights to bf16, the kernel does not.
    assert relative(logits, kernel_logits) < 2e-2  # measured 6e-3 (bf16 alone vs fp32: 9e-3): float rounding
    assert float((logits.argmax(-1) == kernel_logits.argmax(-1)).float().mean()) >= 0.9


def test_a_kernel_layout_weight_refuses_another_device():
    linear = Int4Linear(GROUP_SIZE, 16)
    linear.kernel_layout = True
    with pytest.raises(MinisailError, match="CPU kernel's layout"):
        linear(torch.zeros(1, GROUP_SIZE, device="meta"))


# --- quantize="int4" at load ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp32_logits():
    return {case: logits_of(case, dtype=torch.float32)[1] for case in CASES}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-plain", "bf16"])
def test_int4_logits_stay_near_the_float_model_on_every_golden_case(fp32_logits, dtype):
    agreement = []
    for case in CASES:
        model, logits = logits_of(case, dtype=dtype, quantize="int4")
        linears = int4_modules(model)
        decoder = [m for m in model.language_model.layers.modules() if isinstance(m, (nn.Linear, Int4Linear))]
        assert linears and linears == decoder, case  # every decoder Linear (all widths here are multiples of 64)
        assert isinstance(model.language_model.lm_head, Int8Linear)  # the head: int8 rows (int8_checkpoint.py)
        if dtype == torch.float32:
            assert not any(m.kernel_layout for m in linears)  # the kernel is bf16-only: fp32 runs the plain path
        reference = fp32_logits[case]
        error = relative(logits, reference)
        top1 = float((logits.argmax(-1) == reference.argmax(-1)).float().mean())
        assert 0.02 < error < 0.25, (case, error)  # quantised (not the float weights), and not broken
        assert top1 >= 0.6, (case, top1)
        agreement.append(top1)
    assert sum(agreement) / len(agreement) >= 0.75


def test_int4_decodes_greedily_through_the_cache():
    case = "sail-vl2-textonly"
    model = minisail.load(GOLDEN / case / "checkpoint", dtype=torch.bfloat16, quantize="int4")
    ids = read_tensors(GOLDEN / case / "inputs.safetensors")["input_ids"]  # [1, 22]
    with torch.inference_mode():
        tokens = greedy_generate(model, ids, torch.ones_like(ids), max_new_tokens=4)
        full = model(torch.cat([ids, tokens[:, :-1]], 1), torch.ones(1, ids.shape[1] + 3, dtype=torch.long))
    assert tokens.shape == (1, 4)
    assert torch.equal(full[:, -4:].argmax(-1), tokens)  # the cached steps agree with one full forward


def test_unknown_quantize_is_refused():
    for bad in ("int3", "INT4", 4, "nf4"):
        with pytest.raises(ConfigError, match="unknown quantize"):
            minisail.load(GOLDEN / SAIL / "checkpoint", quantize=bad)


def test_int4_refuses_a_prequantised_checkpoint(tmp_path):
    config = {**golden_config(SAIL), "quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}}
    folder = write_checkpoint(tmp_path / "bnb", config, golden_tensors(SAIL))
    with pytest.raises(ConfigError, match="already quantised"):
        minisail.load(folder, quantize="int4")


def test_a_linear_whose_width_is_not_a_multiple_of_the_group_stays_float():
    class Layers(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(GROUP_SIZE, 16), nn.Linear(GROUP_SIZE + 32, 16)])

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.language_model = Layers()

    assert int4_linear_names(Model()) == ["language_model.layers.0"]


def test_an_int4_model_is_not_exported_as_if_it_were_float():
    from minisail.checkpoint.export import to_official_state_dict

    model = minisail.load(GOLDEN / SAIL / "checkpoint", quantize="int4")
    with pytest.raises(MinisailError, match="int4 model"):
        to_official_state_dict(model, detect_family(golden_config(SAIL)).weight_map(model.config))
