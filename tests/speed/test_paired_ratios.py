"""bench/targets.py: timed figures are compared round by round (the median of the rounds' own ratios), so a host
whose speed drifts between rounds cannot make a ratio of medians out of one side's fast round and the other's slow
one; figures without rounds (load, memory) and comparisons across dtypes stay ratios of medians."""

from __future__ import annotations

from bench.targets import compared, evaluate, llama_ratios, paired, ratios


def test_the_rounds_own_ratios_not_the_ratio_of_medians():
    # session 8's bf16 decode on a drifting host: medians 18.60 / 14.20 = 1.31x, rounds 0.89x, 0.96x and 1.32x
    ours, theirs = [12.69, 18.67, 18.60], [14.20, 19.52, 14.11]
    assert paired(ours, theirs, "decode_tok_s") == 0.956
    assert paired([1.0, 2.0], [2.0, 3.0], "prefill_s") == 1.75  # times: theirs / ours; an even count averages
    assert paired([1.0, None], [2.0, 3.0], "prefill_s") == 2.0  # a missing sample drops its round
    assert paired([], [], "decode_tok_s") is None


def test_paired_figures_are_used_where_both_ran_the_same_rounds():
    results = {
        "bf16": {
            "minisail": {"decode_tok_s": 18.6, "prefill_s": 1.0, "load_s": 3.0},
            "llama.cpp": {"decode_tok_s": 14.2, "prefill_s": 1.3},
            "transformers": {"decode_tok_s": 5.0, "prefill_s": 1.1, "load_s": 6.0},
        },
        "int8": {"minisail": {"decode_tok_s": 20.0, "prefill_s": 1.5, "load_s": 4.0}},
    }
    notes = {
        "bf16": {
            "llama.cpp_type": "BF16",
            "paired": {"llama.cpp": {"decode_tok_s": 0.956, "prefill_s": 1.3}, "transformers": {"decode_tok_s": 3.5}},
        }
    }
    assert compared(results, notes, "bf16", "llama.cpp", "decode_tok_s") == 0.956
    assert llama_ratios(results, notes)["bf16"]["decode_tok_s"] == 0.956
    table = ratios(results, notes)
    assert table["bf16"]["decode_tok_s"] == 3.5 and table["bf16"]["load_s"] == 2.0  # load: ratio of medians
    assert table["int8"]["decode_tok_s"] == 4.0  # against transformers' bf16 run: no rounds to pair
    targets = evaluate(results, {"bf16": 20.0}, notes)
    assert targets["bf16_decode_vs_llama_cpp_BF16"] == {"value": 0.956, "target": 1.0, "met": False}
    assert targets["bf16_decode_vs_transformers"]["value"] == 3.5


def test_issue_17_targets_cover_int8_roofline_and_time_to_first_token():
    results = {
        "bf16": {"minisail": {"ttft_s": 2.0}, "transformers": {"ttft_s": 2.1}},
        "int8": {"minisail": {"decode_tok_s": 30.0}},
    }
    targets = evaluate(results, {"bf16": 20.0, "int8": 40.0}, {})
    assert targets["int8_decode_vs_roofline"] == {"value": 0.75, "target": 0.7, "met": True}
    assert targets["bf16_ttft_vs_transformers"] == {"value": 1.05, "target": 1.1, "met": False}


def test_decode_vs_roofline_uses_each_rounds_own_bandwidth_reading_when_there_is_one():
    results = {"bf16": {"minisail": {"decode_tok_s": 10.0}}}
    notes = {"bf16": {"minisail_decode_vs_round_roofline": 0.81}}
    assert evaluate(results, {"bf16": 20.0}, notes)["bf16_decode_vs_roofline"]["value"] == 0.81
    assert evaluate(results, {"bf16": 20.0}, {})["bf16_decode_vs_roofline"]["value"] == 0.5  # else the run's one
