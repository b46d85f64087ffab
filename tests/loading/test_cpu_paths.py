"""The CPU fast paths chosen for a loaded model (minisail/fast/cpu.py), on both kinds of CPU (forced here): native
bf16 -> torch.mv for the language model's one-row products and packing elsewhere; no native bf16 -> float32
prefill; any dtype -> the language model's weights in huge pages; and the numbers stay the plain model's."""

from __future__ import annotations

import pytest
import torch
from helpers.checkpoints import GOLDEN

import minisail
from minisail.fast import huge_pages, matvec
from minisail.fast.cpu import speed_up_on_cpu
from minisail.fast.int8 import Int8Linear
from minisail.fast.int8_dot import DotInt8Linear, dot_int8_linears, dot_support
from minisail.fast.int8_dot_kernels import FBGEMM, ONEDNN
from minisail.fast.matvec import MatVecLinear
from minisail.fast.packing import PackedLinear
from minisail.fast.upcast import Float32ComputeLinear

CASE = GOLDEN / "internvl-qwen2-tiny" / "checkpoint"


def kinds(module):
    return {type(m) for m in module.modules()}


def last_logits(model):
    decoder = model.language_model
    ids = torch.tensor([[5, 17, 3, 99, 42]])
    with torch.inference_mode():
        cache = decoder.new_cache(1, 8)
        prompt = decoder(decoder.embed(ids), torch.arange(5)[None], cache)[:, -1]
        token = prompt.argmax(-1, keepdim=True)
        return prompt, decoder(decoder.embed(token), torch.tensor([[5]]), cache)[:, -1]


@pytest.mark.parametrize("amx", [True, False])
def test_native_bf16_packs_and_on_amx_decodes_through_matvec(onednn_packs_bf16, monkeypatch, amx):
    monkeypatch.setattr(matvec, "amx_usable", lambda: amx)
    model = minisail.load(CASE, dtype=torch.bfloat16)
    plain = last_logits(minisail.load(CASE, dtype=torch.bfloat16))
    done = speed_up_on_cpu(model)
    assert done.packed > 0 and done.upcast == 0
    assert PackedLinear in kinds(model.vision_model) and MatVecLinear not in kinds(model.vision_model)
    assert all(torch.equal(a, b) for a, b in zip(last_logits(model), plain, strict=True))
    if not amx:  # packing stays the decode path
        assert done.matvec == 0 and PackedLinear in kinds(model.language_model)
        return
    if done.matvec == 0:
        pytest.skip("no language-model shape gives F.linear's bits through torch.mv on this CPU")
    assert MatVecLinear in kinds(model.language_model) and "torch.mv" in done.summary()


def test_without_native_bf16_prefill_runs_in_float32(onednn_refuses_bf16):
    model = minisail.load(CASE, dtype=torch.bfloat16)
    done = speed_up_on_cpu(model)
    assert done.packed == 0 and done.matvec == 0 and done.upcast > 0
    assert Float32ComputeLinear in kinds(model) and MatVecLinear not in kinds(model)
    assert any("avx512bw" in reason for reason in done.reasons)


def test_float32_models_only_move_to_huge_pages(monkeypatch):
    monkeypatch.setattr(huge_pages, "huge_pages_support", lambda: (True, "forced"))
    model = minisail.load(CASE, dtype=torch.float32)
    done = speed_up_on_cpu(model)
    assert (done.packed, done.matvec, done.upcast) == (0, 0, 0)
    assert kinds(model) == kinds(minisail.load(CASE, dtype=torch.float32))
    assert "forced" in done.reasons


def test_int8_language_model_on_an_avx2_cpu(onednn_refuses_bf16, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False)  # as on an AVX2-only CPU
    model = minisail.load(CASE, dtype=torch.bfloat16, quantize="int8")
    done = speed_up_on_cpu(model)
    assert MatVecLinear not in kinds(model) and done.upcast > 0  # the bf16 vision tower and projector
    if dot_support().available:  # fbgemm's digits (x86), never oneDNN's bytes without VNNI
        assert Int8Linear not in kinds(model.language_model) and done.int8_dot > 0
        assert {m.kernel for m in model.language_model.modules() if isinstance(m, DotInt8Linear)} == {FBGEMM}
    else:
        assert Int8Linear in kinds(model.language_model) and done.int8_dot == 0


@pytest.mark.parametrize("kernel", [ONEDNN, FBGEMM], ids=lambda kernel: kernel.name)
def test_int8_decode_on_each_kernel_gives_the_plain_paths_tokens(kernel, monkeypatch):
    model = minisail.load(CASE, dtype=torch.bfloat16, quantize="int8")
    prompt, step = last_logits(model)
    if dot_int8_linears(model.language_model, kernel=kernel) == 0:
        pytest.skip(f"{kernel.name} is not here or does not sum exactly on this CPU")
    assert {m.kernel for m in model.modules() if isinstance(m, DotInt8Linear)} == {kernel}
    fast_prompt, fast_step = last_logits(model)
    for fast, plain in ((fast_prompt, prompt), (fast_step, step)):  # bf16 rounding either way
        assert torch.allclose(fast.float(), plain.float(), rtol=0.05, atol=0.05 * plain.float().abs().max())
        assert fast.argmax() == plain.argmax()


def test_int8_decode_on_int8_dot_products_where_they_are_exact():
    model = minisail.load(CASE, dtype=torch.bfloat16, quantize="int8")
    prompt, step = last_logits(model)
    done = speed_up_on_cpu(model)
    if not dot_support().available:
        assert done.int8_dot == 0 and Int8Linear in kinds(model.language_model)
        pytest.skip(f"int8 dot products are off here: {dot_support().reason}")
    assert done.int8_dot > 0 and Int8Linear not in kinds(model.language_model)
    assert DotInt8Linear in kinds(model.language_model)
    fast_prompt, fast_step = last_logits(model)
    # the products are closer to exact than int8pack's (bf16 rounding either way): logits agree to bf16 steps
    for fast, plain in ((fast_prompt, prompt), (fast_step, step)):
        assert torch.allclose(fast.float(), plain.float(), rtol=0.05, atol=0.05 * plain.float().abs().max())
        assert fast.argmax() == plain.argmax()


def test_huge_pages_can_be_left_out():
    model = minisail.load(CASE, dtype=torch.float32)
    assert speed_up_on_cpu(model, move_to_huge_pages=False).huge_page_bytes == 0


@pytest.mark.parametrize("amx", [True, False])
def test_vision_attention_moves_to_bf16_products_without_amx(onednn_packs_bf16, monkeypatch, amx):
    from minisail.fast import vit_attention

    monkeypatch.setattr(vit_attention, "amx_usable", lambda: amx)
    model = minisail.load(CASE, dtype=torch.bfloat16)
    done = speed_up_on_cpu(model)
    attends = {m.attend for m in model.vision_model.modules() if hasattr(type(m), "attend")}
    if amx:  # SDPA stays, and the log says why
        assert done.vit_attention == 0 and attends == {vit_attention.vit_attention}
        assert any("AMX" in reason for reason in done.reasons)
    else:
        assert done.vit_attention == len(model.vision_model.encoder.layers) and "vision attentions" in done.summary()
        assert attends == {vit_attention.max_shifted_attention}


def test_float32_models_keep_sdpa(onednn_packs_bf16):
    model = minisail.load(CASE, dtype=torch.float32)
    assert speed_up_on_cpu(model).vit_attention == 0


def test_vision_attention_moves_even_where_no_linear_is_bf16(onednn_packs_bf16, monkeypatch):
    # An int8 checkpoint (bitsandbytes) may hold every Linear in int8: the tower's activations are still bf16.
    from minisail.fast import cpu, vit_attention

    monkeypatch.setattr(vit_attention, "amx_usable", lambda: False)
    monkeypatch.setattr(cpu, "has_bf16_linears", lambda module: False)
    model = minisail.load(CASE, dtype=torch.bfloat16)
    done = speed_up_on_cpu(model)
    assert done.packed == 0 and done.vit_attention > 0


def test_int8_weights_are_packed_before_the_bf16_ones(onednn_packs_bf16, monkeypatch):
    # Each int8 weight is held twice while it is packed: better before the bf16 packing makes the tower resident.
    from minisail.fast import cpu

    order = []
    monkeypatch.setattr(cpu, "dot_int8_linears", lambda module: order.append("int8") or 0)
    monkeypatch.setattr(cpu, "pack_linears", lambda module: order.append("bf16") or 0)
    monkeypatch.setattr(cpu, "dot_support", lambda: type("Support", (), {"available": True, "reason": "forced"})())
    speed_up_on_cpu(minisail.load(CASE, dtype=torch.bfloat16, quantize="int8"))
    assert order == ["int8", "bf16"]


@pytest.mark.parametrize("capability", ["AVX2", "AVX512"])
def test_an_int4_model_says_what_its_kernel_does_here(monkeypatch, capability):
    model = minisail.load(CASE, dtype=torch.bfloat16, quantize="int4")
    if not any(getattr(m, "kernel_layout", False) for m in model.modules()):
        pytest.skip("torch's int4 kernel does not run on this CPU: the plain path, nothing to say")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    reasons = speed_up_on_cpu(model, move_to_huge_pages=False).reasons
    (note,) = [reason for reason in reasons if reason.startswith("int4")]
    assert (capability == "AVX2") == ("quantize='int8'" in note) and capability in note


def test_a_float_model_says_nothing_about_int4():
    model = minisail.load(CASE, dtype=torch.bfloat16)
    assert not any(r.startswith("int4") for r in speed_up_on_cpu(model, move_to_huge_pages=False).reasons)
