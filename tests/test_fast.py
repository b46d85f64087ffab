"""The bf16 CPU fast path (minisail/llm/fast.py): packed Linears compute exactly what the plain ones compute."""

from __future__ import annotations

import pytest
import torch
from checkpoints import GOLDEN
from safetensors.torch import load_file

import minisail
from minisail.generate import greedy_generate
from minisail.llm import fast
from minisail.llm.fast import PackedLinear, pack_linears, unpack_linears

pytestmark = pytest.mark.skipif(not fast.packing_available(), reason="this torch has no oneDNN linear packing")


def bf16_case(case: str):
    model = minisail.load(GOLDEN / case / "checkpoint", dtype=torch.bfloat16)
    model.image_token_id = {"internvl-qwen2-tiny": 384, "mono-internvl-tiny": 393}[case]
    inputs = load_file(GOLDEN / case / "inputs.safetensors")
    return model, (inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values"))


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


def test_mapped_weights_are_found_and_given_back_without_changing_values():
    model = minisail.load(GOLDEN / "internvl-qwen2-tiny" / "checkpoint", dtype=torch.float32)  # the file's dtype
    linear = model.language_model.layers[0].attn.o  # a plain rename: a zero-copy view into the checkpoint
    path, _offset = fast._file_backing(linear.weight.data_ptr())
    assert path.endswith(".safetensors")
    assert fast._file_backing(torch.zeros(4096).data_ptr()) is None  # ordinary memory is never touched
    before = linear.weight.detach().clone()
    fast._release_mapped_pages(linear.weight)
    assert torch.equal(linear.weight, before)  # pages come back from the file, unchanged
