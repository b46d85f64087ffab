"""Generation: greedy equals the full forward's argmax, sampling rules and seeds, stop ids per row, streaming text."""

from __future__ import annotations

import pytest
import torch
from helpers.checkpoints import GOLDEN
from safetensors.torch import load_file

import minisail
from minisail.errors import ConfigError, PromptError
from minisail.generate import (
    GenerationConfig,
    apply_repetition_penalty,
    generate,
    generate_stream,
    greedy_generate,
    new_token_budget,
    next_tokens,
    top_k_filter,
    top_p_filter,
)
from minisail.text.streaming import stream_text


def golden(case: str):
    model = minisail.load(GOLDEN / case / "checkpoint", dtype=torch.float32)
    model.image_token_id = 384  # the synthetic <IMG_CONTEXT> of the Qwen2 cases (tests/golden/CASES.md)
    inputs = load_file(GOLDEN / case / "inputs.safetensors")
    return model, inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values")


@pytest.fixture(scope="module")
def textonly():
    return golden("internvl-qwen2-textonly")


@pytest.fixture(scope="module")
def batch():
    return golden("internvl-qwen2-batch")


class ByteTokenizer:
    """Ids 0-255 are bytes, so every non-ASCII character spans several ids; 256+ are special (dropped)."""

    eos_token_id = 256

    def decode(self, ids, *, skip_special_tokens=False):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


# --- greedy and sampling -----------------------------------------------------------------------------------------


def full_forward_argmax(model, input_ids, attention_mask, pixel_values, steps):
    """The reference: re-run the whole sequence without a cache and take the last argmax, step by step."""
    ids, mask = input_ids, attention_mask
    for _ in range(steps):
        with torch.no_grad():
            token = model(ids, mask, pixel_values)[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids[:, input_ids.shape[1] :]


@pytest.mark.parametrize("case", ["textonly", "batch"])
def test_greedy_equals_the_argmax_of_the_full_forward(case, request):
    model, input_ids, attention_mask, pixel_values = request.getfixturevalue(case)
    steps = 6 if pixel_values is None else 4  # the batch case re-runs its vision tower at every full forward
    cached = generate(model, input_ids, attention_mask, pixel_values, {"max_new_tokens": steps})
    assert torch.equal(cached, full_forward_argmax(model, input_ids, attention_mask, pixel_values, steps))
    assert torch.equal(cached, greedy_generate(model, input_ids, attention_mask, pixel_values, max_new_tokens=steps))


def test_sampling_is_reproducible_with_a_seed_and_varies_across_seeds(textonly):
    model, input_ids, attention_mask, _ = textonly
    config = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=3.0, top_k=0, top_p=1.0)
    runs = {seed: generate(model, input_ids, attention_mask, None, config.with_options(seed=seed)) for seed in (1, 2)}
    assert torch.equal(runs[1], generate(model, input_ids, attention_mask, None, config.with_options(seed=1)))
    assert not torch.equal(runs[1], runs[2])
    generator = torch.Generator().manual_seed(1)  # an explicit generator is the same as the seed
    assert torch.equal(runs[1], generate(model, input_ids, attention_mask, None, config, generator=generator))


def test_top_k_1_samples_the_greedy_tokens(textonly):
    model, input_ids, attention_mask, _ = textonly
    greedy = generate(model, input_ids, attention_mask, None, {"max_new_tokens": 8})
    sampled = generate(model, input_ids, attention_mask, None, dict(max_new_tokens=8, do_sample=True, top_k=1, seed=5))
    assert torch.equal(sampled, greedy)


def test_repetition_penalty_rule_on_hand_made_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, -0.5, 0.0]])
    seen = torch.tensor([[True, True, False, False, True]])
    # seen: positive / 2, negative * 2, zero stays; unseen unchanged
    expected = torch.tensor([[1.0, -4.0, 1.0, -0.5, 0.0]])
    assert torch.equal(apply_repetition_penalty(logits, seen, 2.0), expected)
    # the penalty decides the greedy choice: token 0 wins unpenalized, token 2 once 0 is seen
    config = GenerationConfig(repetition_penalty=2.5)
    assert next_tokens(logits, config, torch.zeros_like(seen)).item() == 0
    assert next_tokens(logits, config, seen).item() == 2


def test_penalty_filters_and_order_match_transformers():
    lp = pytest.importorskip("transformers.generation.logits_process")
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=generator) * 3
    input_ids = torch.randint(0, 50, (3, 7), generator=generator)
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, input_ids, True)
    ours = apply_repetition_penalty(logits, seen, 1.3)
    assert torch.equal(ours, lp.RepetitionPenaltyLogitsProcessor(1.3)(input_ids, logits.clone()))
    assert torch.equal(top_k_filter(ours, 7), lp.TopKLogitsWarper(7)(input_ids, ours.clone()))
    assert torch.equal(top_p_filter(ours, 0.8), lp.TopPLogitsWarper(0.8)(input_ids, ours.clone()))


def test_repetition_penalty_in_the_loop_counts_the_prompt_only_if_asked(textonly):
    model, input_ids, attention_mask, _ = textonly
    penalty = 1.7

    def reference(penalize_prompt):
        ids = input_ids
        seen = torch.zeros(1, model.config.llm.vocab_size, dtype=torch.bool)
        if penalize_prompt:
            seen[0, input_ids[0]] = True
        for _ in range(8):
            with torch.no_grad():
                logits = apply_repetition_penalty(model(ids)[:, -1], seen, penalty)
            token = logits.argmax(-1, keepdim=True)
            seen[0, token[0]] = True
            ids = torch.cat([ids, token], 1)
        return ids[:, input_ids.shape[1] :]

    config = GenerationConfig(max_new_tokens=8, repetition_penalty=penalty)
    for penalize_prompt in (True, False):
        got = generate(model, input_ids, attention_mask, None, config, penalize_prompt=penalize_prompt)
        assert torch.equal(got, reference(penalize_prompt))
    plain = generate(model, input_ids, attention_mask, None, {"max_new_tokens": 8})
    assert not torch.equal(plain, reference(True))  # the penalty really changed the tokens of this case


# --- stopping ----------------------------------------------------------------------------------------------------


def test_stop_ids_stop_each_row_and_finished_rows_emit_pad(batch):
    model, input_ids, attention_mask, pixel_values = batch
    free = generate(model, input_ids, attention_mask, pixel_values, {"max_new_tokens": 10})
    stop = int(free[0, 2])
    assert stop not in free[1].tolist()  # row 1 never emits it: it must run to the end
    pad = 399
    got = generate(model, input_ids, attention_mask, pixel_values, dict(max_new_tokens=10, eos_token_id=stop,
                                                                         pad_token_id=pad))  # fmt: skip
    assert got.shape == (2, 10)
    assert got[0, :3].tolist() == free[0, :3].tolist()  # the stop id itself is kept, as transformers keeps it
    assert got[0, 3:].tolist() == [pad] * 7
    assert torch.equal(got[1], free[1])  # the other row is unaffected by its neighbour stopping

    # both rows stop: generation ends when the later one does
    stops = [stop, int(free[1, 4])]
    both = generate(model, input_ids, attention_mask, pixel_values, dict(max_new_tokens=10, eos_token_id=stops))
    first_stop = [min(i for i, t in enumerate(row) if t in stops) for row in free.tolist()]
    assert both.shape == (2, max(first_stop) + 1)
    for row, end in enumerate(first_stop):
        assert both[row, : end + 1].tolist() == free[row, : end + 1].tolist()
        assert both[row, end + 1 :].tolist() == [stops[0]] * (both.shape[1] - end - 1)  # pad defaults to eos


def test_stop_strings_stop_on_the_text(textonly):
    model, input_ids, attention_mask, _ = textonly
    free = generate(model, input_ids, attention_mask, None, {"max_new_tokens": 8}).tolist()[0]
    tokenizer = ByteTokenizer()
    byte = next(t for t in free[2:] if 32 < t < 127 and t not in free[:2])  # a printable ASCII token
    end = free.index(byte)
    got = generate(model, input_ids, attention_mask, None, dict(max_new_tokens=8, stop_strings=[chr(byte)]),
                   tokenizer=tokenizer)  # fmt: skip
    assert got.tolist()[0] == free[: end + 1]
    with pytest.raises(ConfigError, match="tokenizer"):
        generate(model, input_ids, attention_mask, None, dict(max_new_tokens=8, stop_strings=["x"]))


def test_a_prompt_longer_than_the_context_is_refused_and_new_tokens_stop_at_its_end(textonly):
    model, input_ids, attention_mask, _ = textonly
    assert new_token_budget(30, 100, 40) == 10
    with pytest.raises(PromptError, match="context holds 40"):
        new_token_budget(40, 1, 40)
    context = model.config.llm.max_position_embeddings
    long_ids = input_ids.repeat(1, context // input_ids.shape[1] + 1)
    with pytest.raises(PromptError, match=f"context holds {context}"):
        generate(model, long_ids, None, None, {"max_new_tokens": 1})


def test_generation_config_reads_upstream_dicts():
    config = GenerationConfig.from_dict(dict(max_new_tokens=1024, do_sample=True, num_beams=1, temperature=0.7))
    assert (config.max_new_tokens, config.do_sample, config.temperature, config.top_k) == (1024, True, 0.7, 50)
    assert GenerationConfig.from_dict({"top_p": None, "eos_token_id": 5}).stop_token_ids == (5,)
    assert GenerationConfig.from_dict({"eos_token_id": [5, 6]}).stop_token_ids == (5, 6)
    with pytest.raises(ConfigError, match="num_beams"):
        GenerationConfig.from_dict({"num_beams": 4})
    with pytest.raises(ConfigError, match="max_length"):
        GenerationConfig.from_dict({"max_length": 20})
    with pytest.raises(ConfigError, match="temperature"):
        GenerationConfig(do_sample=True, temperature=0)
    for top_p in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="top_p"):
            GenerationConfig(top_p=top_p)


def test_top_k_none_turns_top_k_off_and_top_p_zero_keeps_the_most_likely_token():
    # transformers: an explicit top_k=None builds no TopKLogitsWarper (dropping the key would keep the default 50)
    assert GenerationConfig.from_dict({"top_k": None}).top_k == 0
    assert GenerationConfig.from_dict({}).top_k == 50
    flat = torch.zeros(1, 1000)
    flat[0, 7] = 1e-3  # near-flat: top-k 50 would show as at most 50 distinct draws
    generator = torch.Generator().manual_seed(0)
    config = GenerationConfig.from_dict({"top_k": None, "do_sample": True})
    draws = {int(next_tokens(flat, config, generator=generator)[0]) for _ in range(400)}
    assert len(draws) > 50
    # top_p=0 is accepted (TopPLogitsWarper takes [0, 1]) and keeps only the most likely token
    config = GenerationConfig(do_sample=True, top_p=0.0, top_k=0)
    assert {int(next_tokens(flat, config, generator=generator)[0]) for _ in range(50)} == {7}


def test_min_new_tokens_keeps_the_stop_ids_out_until_that_many_tokens(textonly):
    model, input_ids, attention_mask, _ = textonly
    free = generate(model, input_ids, attention_mask, None, dict(max_new_tokens=6))
    stop = int(free[0, 0])  # greedy's first token as the stop id: generation ends at once
    assert generate(model, input_ids, attention_mask, None, dict(max_new_tokens=6, eos_token_id=stop)).shape[1] == 1
    held = generate(model, input_ids, attention_mask, None, dict(max_new_tokens=6, eos_token_id=stop, min_new_tokens=3))
    assert stop not in held[0, :3].tolist() and held.shape[1] >= 3
    # each held step is the argmax with the stop id at -inf (MinNewTokensLengthLogitsProcessor), then free again
    with torch.no_grad():
        logits = model(input_ids, attention_mask, None)[:, -1]
    assert int(held[0, 0]) == int(logits.index_fill(-1, torch.tensor([stop]), float("-inf")).argmax())
    for value in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="min_new_tokens"):
            GenerationConfig(min_new_tokens=value)
    # a stop id the vocabulary does not have is left alone, as transformers' isin over arange(V) does
    vocab = model.config.llm.vocab_size
    beyond = dict(max_new_tokens=3, eos_token_id=[stop, vocab + 5], min_new_tokens=3)
    assert torch.equal(generate(model, input_ids, attention_mask, None, beyond)[:, :3], held[:, :3])


class RecordingStreamer:
    """transformers' streamer protocol: put(ids) and end()."""

    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended += 1


def test_a_streamer_gets_the_empty_prompt_then_every_new_token_then_end(textonly):
    model, input_ids, attention_mask, _ = textonly
    streamer = RecordingStreamer()
    ids = generate(model, input_ids, attention_mask, None, dict(max_new_tokens=5, streamer=streamer))
    assert streamer.puts[0].shape == (input_ids.shape[0], 0)  # generation starts from embeddings: no prompt ids
    assert torch.equal(torch.stack(streamer.puts[1:], dim=1), ids) and streamer.ended == 1
    # a failed generation still ends the streamer (a thread iterating over it would otherwise wait forever)
    streamer = RecordingStreamer()
    context = model.config.llm.max_position_embeddings
    with pytest.raises(PromptError):
        generate(model, input_ids.repeat(1, context), None, None, dict(max_new_tokens=2, streamer=streamer))
    assert streamer.ended == 1
    with pytest.raises(ConfigError, match="streamer"):
        GenerationConfig(streamer=object())


# --- streaming ---------------------------------------------------------------------------------------------------


def test_streaming_never_splits_a_character(qwen25_tokenizer):
    text = "小熊猫🐼 sits in a tree 🌳🎋, naïve café — 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ü 日本語のテキスト。"
    ids = qwen25_tokenizer.encode(text)
    partial = [i for i in ids if "\ufffd" in qwen25_tokenizer.decode([i])]
    assert partial, "the test needs characters that span several byte-level tokens"
    pieces = list(stream_text(qwen25_tokenizer, ids))
    assert "".join(pieces) == qwen25_tokenizer.decode(ids) == text
    assert all(piece and "\ufffd" not in piece for piece in pieces)
    assert len(pieces) > 10  # it streamed, not one piece at the end


def test_stream_of_a_truncated_character_ends_with_it():
    tokenizer = ByteTokenizer()
    ids = list("ok 🐼".encode())[:-1]  # the emoji cut short, as max_new_tokens may leave it
    pieces = list(stream_text(tokenizer, ids))
    assert "".join(pieces) == tokenizer.decode(ids) == "ok \ufffd"
    assert pieces[:-1] == ["o", "k", " "]


def test_generate_stream_joins_to_the_decoded_tokens(textonly):
    model, input_ids, attention_mask, _ = textonly
    tokenizer = ByteTokenizer()
    free = generate(model, input_ids, attention_mask, None, {"max_new_tokens": 16}).tolist()[0]
    stop = free[10]
    seen = []
    pieces = list(generate_stream(model, tokenizer, input_ids, attention_mask, None,
                                  dict(max_new_tokens=16, eos_token_id=stop), on_token=seen.append))  # fmt: skip
    end = free.index(stop)
    assert seen == free[: end + 1]
    assert "".join(pieces) == tokenizer.decode(free[:end])
    assert all("\ufffd" not in piece for piece in pieces[:-1])
    with pytest.raises(PromptError, match="one row"):
        list(generate_stream(model, tokenizer, input_ids.repeat(2, 1), None, None, {}))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("column", [0, 17, 151935])
def test_check_finite_sees_one_non_finite_logit_anywhere(value, column):
    """check_finite reduces to the smallest and largest logit: one NaN or infinity in any row and column is seen."""
    from minisail.errors import NumericsError
    from minisail.generate import check_finite

    logits = torch.randn(3, 151936)
    check_finite(logits, 0)
    logits[2, column] = value
    with pytest.raises(NumericsError):
        check_finite(logits, 0)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_end_generation_with_a_clear_error(value):
    """minisail does not scan weights at load (README: a full read); NaN/Inf weights surface at the first token."""
    from minisail.errors import NumericsError

    model, ids, mask, pixels = golden("internvl-qwen2-tiny")
    with torch.no_grad():
        model.language_model.norm.weight[3] = value  # as a corrupt checkpoint would hold it
    with pytest.raises(NumericsError, match="non-finite logits .* new token 1: the checkpoint holds NaN or Inf"):
        generate(model, ids, mask, pixels, GenerationConfig(max_new_tokens=4))
