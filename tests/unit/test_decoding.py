"""The KV cache and dtypes: cached decoding equals the uncached forward; bf16 runs and stays close to fp32."""

from __future__ import annotations

import pytest
import torch
from helpers.checkpoints import GOLDEN
from safetensors.torch import load_file

import minisail
from minisail.errors import PromptError
from minisail.generate import greedy_generate
from minisail.llm.decoder import positions_from_mask


def case_inputs(case):
    inputs = load_file(GOLDEN / case / "inputs.safetensors")
    return inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values")


@pytest.mark.parametrize("case", ["internvl-qwen2-batch", "internvl-internlm2-tiny", "internvl-internlm2-ntk"])
def test_cached_decoding_equals_the_full_forward(case):
    """Every cached step's logits equal a full forward over prompt + tokens so far.

    Except past InternLM2's dynamic-NTK limit, where upstream (and so minisail) keeps cached keys rotated with
    the base they were written with while a full forward re-rotates every key with the newest base: there only
    the prefill agrees, and the later steps must differ (the golden case pins the cached behaviour)."""
    model = minisail.load(GOLDEN / case / "checkpoint", dtype=torch.float32)
    model.image_token_id = 384 if "qwen2" in case else 393
    input_ids, attention_mask, pixel_values = case_inputs(case)
    steps = 6
    tokens = greedy_generate(model, input_ids, attention_mask, pixel_values, max_new_tokens=steps)
    with torch.inference_mode():
        decoder = model.language_model
        inputs = model.prepare_inputs(input_ids, attention_mask, pixel_values)
        B, T = attention_mask.shape
        cache = decoder.new_cache(B, T + steps)
        positions = positions_from_mask(attention_mask)
        cached = [decoder(inputs.embeds, positions, cache, attention_mask=attention_mask, last_only=True)[:, -1]]
        for step in range(steps - 1):
            cached.append(
                decoder(decoder.embed(tokens[:, step : step + 1]), positions[:, -1:] + 1 + step, cache)[:, -1]
            )
        for step in range(steps):
            ids = torch.cat([input_ids, tokens[:, :step]], dim=1)
            mask = torch.cat([attention_mask, torch.ones(B, step, dtype=attention_mask.dtype)], dim=1)
            full = model(ids, mask, pixel_values)[:, -1]
            if case.endswith("ntk") and step > 0:
                assert (cached[step] - full).abs().max() > 1e-3
            else:
                torch.testing.assert_close(cached[step], full, atol=2e-5, rtol=0)


def test_a_cache_much_larger_than_needed_changes_nothing_and_is_not_read():
    """Eager steps attend over the slots written so far, not over the capacity (sized for the longest reply): the
    logits of a batch with left padding are those of a tight cache, and `update` returns only written slots."""
    model = minisail.load(GOLDEN / "internvl-qwen2-batch" / "checkpoint", dtype=torch.float32)
    model.image_token_id = 384
    input_ids, attention_mask, pixel_values = case_inputs("internvl-qwen2-batch")
    decoder, steps = model.language_model, 3
    tokens = greedy_generate(model, input_ids, attention_mask, pixel_values, max_new_tokens=steps)
    B, T = attention_mask.shape
    logits = {}
    with torch.inference_mode():
        inputs = model.prepare_inputs(input_ids, attention_mask, pixel_values)
        positions = positions_from_mask(attention_mask)
        for capacity in (T + steps, T + steps + 500):
            cache = decoder.new_cache(B, capacity)
            rows = [decoder(inputs.embeds, positions, cache, attention_mask=attention_mask, last_only=True)[:, -1]]
            for step in range(steps - 1):
                rows.append(decoder(decoder.embed(tokens[:, step : step + 1]), positions[:, -1:] + 1 + step, cache))
            logits[capacity] = torch.cat([row.reshape(B, -1) for row in rows])
            keys, values = cache.update(0, cache.keys[0, :, :, :1], cache.values[0, :, :, :1])  # into the last slot
            assert keys.shape[2] == values.shape[2] == T + steps - 1  # written so far, not the capacity
    torch.testing.assert_close(logits[T + steps], logits[T + steps + 500], atol=2e-5, rtol=0)


def test_a_prefill_mask_is_sized_by_the_slots_written_not_by_the_capacity():
    """A prompt of T tokens into a cache of 10**6 slots: its [T, S] mask covers the T slots written (a capacity-wide
    mask of T x 10**6 once took more memory than the cache); a decode step's mask covers every slot, for the
    compiled step, which attends all of them (tests/generation/test_compile.py)."""
    model = minisail.load(GOLDEN / "internvl-qwen2-textonly" / "checkpoint", dtype=torch.float32)
    decoder = model.language_model
    cache = decoder.new_cache(1, 10**6)
    prompt = decoder.begin_step(torch.arange(7)[None], cache)
    assert prompt.mask.shape == (1, 1, 7, 7)
    assert decoder.begin_step(torch.tensor([[7]]), cache).mask.shape == (1, 1, 1, 10**6)


def test_padded_row_decodes_like_the_unpadded_row():
    model = minisail.load(GOLDEN / "internvl-qwen2-textonly" / "checkpoint")
    input_ids, attention_mask, _ = case_inputs("internvl-qwen2-textonly")
    alone = greedy_generate(model, input_ids, attention_mask, max_new_tokens=8)
    pad = torch.full((1, 5), 360)
    batch = torch.cat([torch.cat([pad, input_ids], 1), torch.cat([input_ids[:, :5], input_ids], 1)])
    mask = torch.ones_like(batch)
    mask[0, :5] = 0
    both = greedy_generate(model, batch, mask, max_new_tokens=8)
    assert both[0].tolist() == alone[0].tolist()
    with torch.inference_mode():
        padded = model(batch[:1], mask[:1])[0, 5:]
        plain = model(input_ids, attention_mask)[0]
    torch.testing.assert_close(padded, plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["internvl-qwen2-tiny", "internvl-internlm2-tiny"])
def test_bfloat16_runs_and_stays_close_to_float32(case):
    input_ids, attention_mask, pixel_values = case_inputs(case)
    token = 384 if "qwen2" in case else 393
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = minisail.load(GOLDEN / case / "checkpoint", dtype=dtype)
        model.image_token_id = token
        with torch.inference_mode():
            logits[dtype] = model(input_ids, attention_mask, pixel_values)
        assert logits[dtype].dtype == torch.float32  # heads upcast, as upstream
        tokens = greedy_generate(model, input_ids, attention_mask, pixel_values, max_new_tokens=4)
        assert tokens.shape == (1, 4)
    diff = (logits[torch.bfloat16] - logits[torch.float32]).abs().max().item()
    scale = logits[torch.float32].abs().max().item()
    assert torch.isfinite(logits[torch.bfloat16]).all()
    assert diff < 0.1 * scale, (diff, scale)


def test_prompt_longer_than_the_cache_is_a_clear_error():
    model = minisail.load(GOLDEN / "internvl-qwen2-textonly" / "checkpoint")
    cache = model.language_model.new_cache(1, 4)
    embeds = model.language_model.embed(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(PromptError, match="holds 4 tokens"):
        model.language_model(embeds, torch.arange(5)[None], cache)


def test_image_token_count_mismatch_is_a_clear_error():
    model = minisail.load(GOLDEN / "internvl-qwen2-tiny" / "checkpoint")
    model.image_token_id = 384
    input_ids, attention_mask, pixel_values = case_inputs("internvl-qwen2-tiny")
    first = int((input_ids[0] == 384).nonzero()[0])
    input_ids = input_ids.clone()
    input_ids[0, first] = 0  # one <IMG_CONTEXT> fewer than the 3 tiles x 16 rows
    with pytest.raises(PromptError, match="47 <IMG_CONTEXT> tokens but the images give 48"):
        model(input_ids, attention_mask, pixel_values)


def test_out_of_vocabulary_ids_and_images_without_pixels_are_clear_errors():
    model = minisail.load(GOLDEN / "internvl-qwen2-tiny" / "checkpoint")
    model.image_token_id = 384
    input_ids, attention_mask, pixel_values = case_inputs("internvl-qwen2-tiny")
    bad = input_ids.clone()
    bad[0, 3] = 400  # the tiny vocabulary is 0..399
    with pytest.raises(PromptError, match="400, outside the vocabulary"):
        model(bad, attention_mask, pixel_values)
    with pytest.raises(PromptError, match="no pixel_values"):
        model(input_ids, attention_mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("queries", [1, 5])
def test_the_additive_mask_gives_sdpa_the_boolean_masks_numbers(dtype, queries):
    """begin_step hands the layers SDPA's additive form of the mask (built once per step): the same numbers as
    the boolean mask SDPA would convert itself, with left padding and not-yet-written slots hidden."""
    import torch.nn.functional as F

    from minisail.llm.decoder import additive_mask, attention_mask_4d

    generator = torch.Generator().manual_seed(0)
    B, heads, S, D = 2, 3, 40, 16
    key_valid = torch.ones(B, S, dtype=torch.bool)
    key_valid[1, :7] = False  # row 1 left-padded
    visible = attention_mask_4d(key_valid, torch.arange(20, 20 + queries))  # [B, 1, T, S]: slots past 20+ unwritten
    q, k, v = (torch.randn(B, heads, n, D, generator=generator).to(dtype) for n in (queries, S, S))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
    assert torch.equal(F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask(visible, dtype)), want)
