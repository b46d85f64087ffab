"""The bf16 CPU fast path (minisail/fast/packing.py): packed Linears compute exactly what the plain ones compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.checkpoints import GOLDEN
from safetensors.torch import load_file

import minisail
from minisail.fast import memory, packing
from minisail.fast.packing import PackedLinear, pack_linears, unpack_linears
from minisail.generate import greedy_generate

needs_onednn_bf16 = pytest.mark.skipif(not packing.packing_available(), reason=packing.packing_support().reason)


def bf16_case(case: str):
    model = minisail.load(GOLDEN / case / "checkpoint", dtype=torch.bfloat16)
    model.image_token_id = {"internvl-qwen2-tiny": 384, "mono-internvl-tiny": 393}[case]
    inputs = load_file(GOLDEN / case / "inputs.safetensors")
    return model, (inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values"))


@needs_onednn_bf16
@pytest.mark.parametrize("case", ["internvl-qwen2-tiny", "mono-internvl-tiny"])
def test_packed_model_gives_the_same_bits(case):
    model, (ids, mask, pixels) = bf16_case(case)
    with torch.inference_mode():
        logits = model(ids, mask, pixels)
        vision = model.encode_images(pixels)
    tokens = greedy_generate(model, ids, mask, pixels, max_new_tokens=6)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    assert pack_linears(model) > 0
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    with torch.inference_mode():
        assert torch.equal(model(ids, mask, pixels), logits)
        assert torch.equal(model.encode_images(pixels), vision)
    assert torch.equal(greedy_generate(model, ids, mask, pixels, max_new_tokens=6), tokens)
    packed_state = model.state_dict()  # still the plain weights, under the plain names
    assert set(packed_state) == set(state) and all(torch.equal(packed_state[k], v) for k, v in state.items())

    unpack_linears(model)
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    with torch.inference_mode():
        assert torch.equal(model(ids, mask, pixels), logits)


def test_fp32_linears_are_left_alone():
    model = minisail.load(GOLDEN / "internvl-qwen2-tiny" / "checkpoint", dtype=torch.float32)
    assert pack_linears(model) == 0


def test_mapped_weights_are_found_and_given_back_without_changing_values(views_of_any_size):
    model = minisail.load(GOLDEN / "internvl-qwen2-tiny" / "checkpoint", dtype=torch.float32)  # the file's dtype
    linear = model.language_model.layers[0].attn.o  # a plain rename: a zero-copy view into the checkpoint
    path, _offset = memory.file_backing(linear.weight.data_ptr())
    assert path.endswith(".safetensors")
    assert memory.file_backing(torch.zeros(4096).data_ptr()) is None  # ordinary memory is never touched
    before = linear.weight.detach().clone()
    memory.release_mapped_pages(linear.weight)
    assert torch.equal(linear.weight, before)  # pages come back from the file, unchanged


def _outputs(model, ids, mask, pixels):
    with torch.inference_mode():
        return model(ids, mask, pixels), greedy_generate(model, ids, mask, pixels, max_new_tokens=4)


def test_where_onednn_refuses_bf16_nothing_is_packed_and_the_numbers_stay(onednn_refuses_bf16):
    support = packing.packing_support()
    assert not support.available and "avx512bw" in support.reason  # the CPU's own words reach the log line
    model, inputs = bf16_case("internvl-qwen2-tiny")
    logits, tokens = _outputs(model, *inputs)
    assert pack_linears(model) == 0
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    after = _outputs(model, *inputs)
    assert torch.equal(after[0], logits) and torch.equal(after[1], tokens)


def test_a_shape_the_kernel_refuses_stays_plain(onednn_packs_bf16, monkeypatch):
    """The probe passed, but one weight shape is refused (or gives other bits): only that Linear stays plain."""
    reorder = torch.ops.mkldnn._reorder_linear_weight

    def refuse_wide(weight, batch):
        if weight.shape[0] > 100:
            raise RuntimeError("unsupported shape")
        return reorder(weight, batch)

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse_wide)
    model, inputs = bf16_case("internvl-qwen2-tiny")
    logits, tokens = _outputs(model, *inputs)
    packed = pack_linears(model)
    kinds = {type(m).__name__ for m in model.modules() if isinstance(m, (torch.nn.Linear, PackedLinear))}
    assert packed > 0 and kinds == {"Linear", "PackedLinear"}
    assert all(m.out_features <= 100 for m in model.modules() if isinstance(m, PackedLinear))
    after = _outputs(model, *inputs)
    assert torch.equal(after[0], logits) and torch.equal(after[1], tokens)


def test_a_kernel_that_differs_on_a_few_inputs_only_is_refused(onednn_packs_bf16, monkeypatch):
    """Seen with AMX for in=8960: the packed kernel sums in another order, so about 4 rows in 10 round one output
    one bf16 step away from F.linear's. A kernel that agrees on the first rows but not on a later one is refused."""
    calls = {"n": 0}

    def sometimes_off(x, weight, bias, *attr):
        calls["n"] += 1
        y = F.linear(x, weight, bias)
        return torch.nextafter(y, torch.full_like(y, float("inf"))) if calls["n"] == 9 else y  # the 9th row

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", sometimes_off)
    linear = torch.nn.Linear(64, 48, dtype=torch.bfloat16)
    assert PackedLinear.from_linear(linear) is None  # stays a plain Linear: F.linear's bits, not nearly them
    assert calls["n"] >= 9


@pytest.mark.parametrize(("amx", "hint"), [(True, None), (False, 1)])
def test_the_batch_hint_follows_amx(monkeypatch, amx, hint):
    # Where AMX runs, oneDNN packs for an unknown batch (measured faster there at 1 and 286 rows); elsewhere for 1.
    monkeypatch.setattr(torch._C._cpu, "_init_amx", lambda: amx, raising=False)
    packing.batch_hint.cache_clear()
    packing.amx_usable.cache_clear()
    try:
        assert packing.batch_hint() == hint
        seen = []
        monkeypatch.setattr(
            torch.ops.mkldnn, "_reorder_linear_weight", lambda w, batch: seen.append(batch) or w.clone()
        )
        monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda x, w, b, *attr: F.linear(x, w, b))
        packing._checked.clear()
        assert PackedLinear.from_linear(torch.nn.Linear(64, 48, dtype=torch.bfloat16)) is not None
        assert seen == [hint]
    finally:
        packing.batch_hint.cache_clear()
        packing.amx_usable.cache_clear()
        packing._checked.clear()


@needs_onednn_bf16
def test_both_batch_hints_give_f_linears_bits_here():
    # The probe still checks every shape; on this machine both layouts give F.linear's bits for a decoder shape.
    weight = torch.randn(256, 192, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    x = torch.randn(5, 192, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    for hint in (1, None):
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, hint)
        for rows in (x[:1], x):
            assert torch.equal(
                torch.ops.mkldnn._linear_pointwise(rows, packed, None, "none", [], ""), F.linear(rows, weight)
            )


def test_packed_plumbing_on_every_machine(onednn_packs_bf16):
    """With the kernel stood in for, the packed modules, their state dict and unpacking run wherever tests run."""
    assert packing.packing_support().available
    model, inputs = bf16_case("mono-internvl-tiny")
    logits, tokens = _outputs(model, *inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert pack_linears(model) > 0 and not any(type(m) is torch.nn.Linear for m in model.modules())
    after = _outputs(model, *inputs)
    assert torch.equal(after[0], logits) and torch.equal(after[1], tokens)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    unpack_linears(model)
    assert not any(isinstance(m, PackedLinear) for m in model.modules())


def test_the_default_dtype_follows_the_cpu(onednn_refuses_bf16):
    gb = 1e9
    assert packing.cpu_default_dtype(torch.bfloat16, 8 * gb, 24 * gb)[0] == torch.float32  # fits: float32
    dtype, why = packing.cpu_default_dtype(torch.bfloat16, 100 * gb, 24 * gb)  # does not fit: stay bf16, say why
    assert dtype == torch.bfloat16 and "would not fit" in why
    assert packing.cpu_default_dtype(torch.float32, 8 * gb, 24 * gb)[0] == torch.float32
    assert packing.cpu_default_dtype(torch.float16, 8 * gb, 24 * gb)[0] == torch.float16


def test_where_bf16_is_native_the_stored_dtype_is_kept(onednn_packs_bf16):
    assert packing.cpu_default_dtype(torch.bfloat16, 8e9, 24e9)[0] == torch.bfloat16
