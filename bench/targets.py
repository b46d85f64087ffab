"""The benchmark's comparisons: minisail's ratios to transformers and llama.cpp, and issue 9's and 17's targets.

Every ratio reads ">1: minisail is better" (a speed-up for times, a quotient of tokens/s, theirs / ours for memory).
int8 and int4 are weight-only formats transformers does not load, so they are compared with transformers' bf16;
llama.cpp is compared in the matching GGUF type (bf16 -> BF16, int8 -> Q8_0, int4 -> Q4_0), prefill and decode
only (it has no vision tower). A figure that is missing (a framework skipped, or a peer whose worker died: the
report's `peer_failures`) leaves its ratio and target out rather than guessing.
"""

from __future__ import annotations

from bench.processes import LLAMA

METRICS = ["load_s", "peak_rss_gb", "vision_1tile_s", "vision_7tiles_s", "prefill_s", "ttft_s", "decode_tok_s"]


def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def evaluate(results: dict, roofline: dict, notes: dict) -> dict:
    """The issue's targets, each as {value, target, met}."""

    def get(dtype, fw, metric):
        return results.get(dtype, {}).get(fw, {}).get(metric)

    def target(value, goal, higher_is_better=True):
        met = None if value is None else (value >= goal if higher_is_better else value <= goal)
        return {"value": value, "target": goal, "met": met}

    targets = {
        "bf16_decode_vs_transformers": target(
            ratio(get("bf16", "minisail", "decode_tok_s"), get("bf16", "transformers", "decode_tok_s")), 1.5
        ),
        "bf16_decode_vs_roofline": target(ratio(get("bf16", "minisail", "decode_tok_s"), roofline.get("bf16")), 0.7),
        "int8_decode_vs_transformers_bf16": target(
            ratio(get("int8", "minisail", "decode_tok_s"), get("bf16", "transformers", "decode_tok_s")), 2.5
        ),
    }
    for dtype in ("fp32", "bf16"):
        for metric in ("vision_1tile_s", "vision_7tiles_s", "prefill_s"):
            speedup = ratio(get(dtype, "transformers", metric), get(dtype, "minisail", metric))
            targets[f"{dtype}_{metric[:-2]}_vs_transformers"] = target(speedup, 1.1)
        targets[f"{dtype}_load_vs_transformers"] = target(
            ratio(get(dtype, "transformers", "load_s"), get(dtype, "minisail", "load_s")), 1.0
        )
    for dtype in results:  # issue 17: at least llama.cpp's speed in the same format (Q8_0 for int8, ...)
        if LLAMA in results[dtype]:
            kind = notes.get(dtype, {}).get("llama.cpp_type", "")
            decode = ratio(get(dtype, "minisail", "decode_tok_s"), get(dtype, LLAMA, "decode_tok_s"))
            targets[f"{dtype}_decode_vs_llama_cpp_{kind}"] = target(decode, 1.0)
            prefill = ratio(get(dtype, LLAMA, "prefill_s"), get(dtype, "minisail", "prefill_s"))
            targets[f"{dtype}_prefill_vs_llama_cpp_{kind}"] = target(prefill, 1.0)
    for dtype in results:  # what loading added to the process (its peak minus the interpreter and libraries)
        note, peak = notes.get(dtype, {}), get(dtype, "minisail", "peak_rss_gb")
        added = None if peak is None else peak - note.get("minisail_baseline_rss_gb", 0.0)
        targets[f"{dtype}_load_rss_vs_weights"] = target(ratio(added, note.get("weights_gb")), 1.1, False)
    return {name: t for name, t in targets.items() if t["value"] is not None}


def ratios(results: dict) -> dict:
    """minisail's speed-up over transformers per dtype and metric (>1: minisail is faster / smaller)."""
    out = {}
    for dtype, rows in results.items():
        quantized = dtype in ("int8", "int4")
        theirs = results.get("bf16", {}).get("transformers") if quantized else rows.get("transformers")
        if not theirs:
            continue
        ours = rows["minisail"]
        out[dtype] = {m: ratio(theirs[m], ours[m]) for m in METRICS if m != "decode_tok_s"}
        out[dtype]["decode_tok_s"] = ratio(ours["decode_tok_s"], theirs["decode_tok_s"])
    return out


def llama_ratios(results: dict, notes: dict) -> dict:
    """minisail vs llama.cpp in the matching format, per dtype (>1: minisail is faster). Prefill and decode only:
    llama.cpp has no vision, so its time to first token (prompt only) is not minisail's (which encodes a tile)."""
    out = {}
    for dtype, rows in results.items():
        theirs, ours = rows.get(LLAMA), rows.get("minisail")
        if not theirs or not ours:
            continue
        out[dtype] = {
            "format": notes.get(dtype, {}).get("llama.cpp_type"),
            "prefill_s": ratio(theirs["prefill_s"], ours["prefill_s"]),
            "decode_tok_s": ratio(ours["decode_tok_s"], theirs["decode_tok_s"]),
        }
    return out
