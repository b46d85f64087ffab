"""The decode step is one fixed-shape graph: torch.compile captures it with zero graph breaks, once per generation.

`Decoder.decode_step` is the tensor work every generated token runs: `Decoder.forward` does the step's Python
bookkeeping (`begin_step`) and hands a one-token step to it. `torch._dynamo.explain` must find a single graph
for every family's decoder, Mono's routed visual experts included; compiled (dynamo's capture, run eagerly:
fast and exact) and swapped in as the benchmark does, it must run a whole generation without recompiling and
give the same tokens as the eager decoder.
"""

from __future__ import annotations

import pytest
import torch
from helpers.checkpoints import GOLDEN
from safetensors.torch import load_file

import minisail
from minisail.generate import greedy_generate, prefill
from minisail.llm.decoder import positions_from_mask

CASES = {  # case -> <IMG_CONTEXT> id
    "internvl-qwen2-batch": 384,
    "internvl-internlm2-ntk": 393,
    "mono-internvl-tiny": 393,
    "sail-vl2-tiny": 388,
    "yi-vl-textonly": None,
}


@torch.inference_mode()
def prefilled(case: str, new_tokens: int):
    """The model, its prefilled cache and the first decode step's token and position for the case's prompt."""
    model = minisail.load(GOLDEN / case / "checkpoint", dtype=torch.float32)
    if CASES[case] is not None:
        model.image_token_id = CASES[case]
    inputs = load_file(GOLDEN / case / "inputs.safetensors")
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    decoder = model.language_model
    prepared = model.prepare_inputs(input_ids, attention_mask, inputs.get("pixel_values"))
    B, T = prepared.attention_mask.shape
    cache = decoder.new_cache(B, T + new_tokens)
    positions = positions_from_mask(prepared.attention_mask)
    token = prefill(decoder, prepared, positions, cache).argmax(-1, keepdim=True)  # [B, 1]
    return model, (input_ids, attention_mask, inputs.get("pixel_values")), cache, token, positions[:, -1:] + 1


def step_inputs(model, cache, token, position):
    """`decode_step`'s arguments, after the bookkeeping `Decoder.forward` does before calling it."""
    decoder = model.language_model
    step = decoder.begin_step(position, cache)
    return decoder.embed(token), step, cache, model.visual_mask(token)


@pytest.mark.parametrize("case", sorted(CASES))
def test_decode_step_has_no_graph_breaks(case):
    model, _, cache, token, position = prefilled(case, new_tokens=2)
    with torch.inference_mode():
        args = step_inputs(model, cache, token, position)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model.language_model.decode_step)(*args)
    assert explained.graph_break_count == 0, [str(reason.reason)[:200] for reason in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("case", ["internvl-qwen2-batch", "mono-internvl-tiny"])
def test_compiled_decode_step_runs_without_recompiling_and_gives_the_same_tokens(case):
    steps = 6
    model, (input_ids, attention_mask, pixel_values), *_ = prefilled(case, new_tokens=steps)
    want = greedy_generate(model, input_ids, attention_mask, pixel_values, max_new_tokens=steps)
    decoder = model.language_model
    torch._dynamo.reset()
    compiled = torch.compile(decoder.decode_step, backend="eager", fullgraph=True, dynamic=False)
    calls = []

    def counted(*args):
        calls.append(args[0].shape)
        return compiled(*args)

    decoder.decode_step = counted  # as `bench --compile` does: forward's decode steps run the compiled graph
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = greedy_generate(model, input_ids, attention_mask, pixel_values, max_new_tokens=steps)
    finally:
        del decoder.decode_step
    assert got.tolist() == want.tolist()
    assert len(calls) == steps - 1 and all(shape[1] == 1 for shape in calls)  # every decode step, no prefill
