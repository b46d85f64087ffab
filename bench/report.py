"""The benchmark's table for people (stdout); the JSON line after it is for scripts."""

from __future__ import annotations

ROWS = [
    ("load_s", "cold load, s", "{:.2f}"),
    ("peak_rss_gb", "peak RSS, GB", "{:.2f}"),
    ("vision_1tile_s", "vision, 1 tile, s", "{:.2f}"),
    ("vision_7tiles_s", "vision, 7 tiles, s", "{:.2f}"),
    ("prefill_s", "prefill 256+30 tok, s", "{:.2f}"),
    ("ttft_s", "time to 1st token, s", "{:.2f}"),
    ("decode_tok_s", "decode, tok/s", "{:.2f}"),
]


def _cell(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def format_table(report: dict) -> str:
    m = report["machine"]
    threads = report["settings"].get("threads") or m["torch_threads"]  # what the workers ran with (--threads)
    lines = [
        f"minisail bench: {report['preset']} at real shapes, random weights "
        f"({report['settings']['parameters'] / 1e9:.2f} B parameters)",
        f"machine: {m['cpu']}, {m['cores']} cores ({threads} threads per worker), {m['ram_gb']} GB RAM, "
        f"torch {m['torch']}, transformers {m['transformers'] or 'not installed'}, "
        f"llama-cpp-python {m.get('llama_cpp') or 'not installed'}, "
        f"1-min load average {m['load_average_1min']} at start, {m.get('load_average_1min_end')} at the end",
        f"ISA: {' '.join(m.get('isa') or ['?'])} (torch CPU capability {m.get('torch_cpu_capability')}); "
        f"bf16 kernels: {m.get('bf16_kernels')}",
    ]
    roofline = ", ".join(f"{d} {v:.2f} tok/s" for d, v in report["roofline_decode_tok_s"].items())
    readings = ", ".join(f"{b:.1f}" for b in m.get("bandwidth_readings_gb_s", []))
    lines.append(
        f"weight streaming: {m['bandwidth_gb_s']:.1f} GB/s (readings {readings}) -> decode roofline {roofline or '-'}"
    )
    columns = []  # (header, dtype, kind)
    for dtype, rows in report["results"].items():
        for framework in rows:
            columns.append((f"{dtype} {framework}", dtype, framework))
        if dtype in report["ratios"]:
            columns.append((f"{dtype} vs tf bf16" if dtype in ("int8", "int4") else f"{dtype} ratio", dtype, "ratio"))
        llama = report.get("ratios_vs_llama_cpp", {}).get(dtype)
        if llama:
            columns.append((f"{dtype} vs {llama['format']}", dtype, "llama ratio"))
    width = max(len(h) for h, _, _ in columns) if columns else 10
    header = f"{'':<24}" + "".join(f" | {h:>{width}}" for h, _, _ in columns)
    lines += ["", header, "-" * len(header)]
    for metric, label, fmt in ROWS:
        cells = []
        for _h, dtype, kind in columns:
            if kind in ("ratio", "llama ratio"):
                table = report["ratios"] if kind == "ratio" else report["ratios_vs_llama_cpp"]
                value = table[dtype].get(metric)
                cells.append("-" if value is None else f"{value:.2f}x")
            else:
                cells.append(_cell(report["results"][dtype][kind].get(metric), fmt))
        lines.append(f"{label:<24}" + "".join(f" | {c:>{width}}" for c in cells))
    lines.append(
        "ratios: minisail's speed-up (transformers' time / minisail's; tok/s the other way); RSS: theirs / ours; "
        "timed rows: the median of the interleaved rounds' own ratios, so they need not equal the medians' quotient"
    )
    if report.get("ratios_vs_llama_cpp"):
        lines.append(
            "vs llama.cpp: the same language model as a GGUF in the named type (prefill and decode only: llama.cpp "
            "has no vision tower; its prompt is 286 token embeddings, its time to 1st token excludes the image)"
        )
    for dtype, rows in report["results"].items():
        note, roofline = report["notes"].get(dtype, {}), report["roofline_decode_tok_s"].get(dtype)
        decode = rows["minisail"].get("decode_tok_s")
        parts = []
        share = note.get("minisail_decode_vs_round_roofline")
        if share is not None:
            readings = ", ".join(f"{b:.1f}" for b in note.get("round_bandwidth_gb_s", []))
            parts.append(
                f"minisail decodes at {share:.0%} of the roofline (median of the rounds, each against the bandwidth "
                f"read just before it: {readings} GB/s)"
            )
        elif decode and roofline:
            parts.append(f"minisail decodes at {decode / roofline:.0%} of the {roofline:.2f} tok/s roofline")
        peak, base = rows["minisail"].get("peak_rss_gb"), note.get("minisail_baseline_rss_gb")
        if peak and base is not None and note.get("weights_gb"):
            added = peak - base
            parts.append(
                f"loading added {added:.2f} GB to a {base:.2f} GB interpreter = "
                f"{added / note['weights_gb']:.2f}x the {note['weights_gb']:.2f} GB of weights"
            )
        compiled = note.get("minisail_compile_s") is not None  # then the step is not the eager matmuls' sum
        if note.get("minisail_decode_matmuls_ms") and note.get("decode_gb") and decode and not compiled:
            ms, bandwidth = note["minisail_decode_matmuls_ms"], report["machine"].get("bandwidth_gb_s")
            rate = note["decode_gb"] / (ms / 1e3)
            share = f", {rate / bandwidth:.0%} of the measured bandwidth" if bandwidth else ""
            step, outside = note.get("minisail_decode_step_ms"), note.get("minisail_decode_outside_ms")
            beside = f" measured beside them, {outside:.1f} ms outside them" if step and outside is not None else ""
            parts.append(
                f"its matrix products alone take {ms:.0f} ms per token ({rate:.1f} GB/s{share}) of a "
                f"{step or 1e3 / decode:.0f} ms decode step{beside}"
            )
        if note.get("minisail_fast_paths"):
            parts.append(f"CPU fast paths: {note['minisail_fast_paths']}")
        if note.get("minisail_pack_s") is not None:
            call, pack = note["minisail_load_call_s"], note["minisail_pack_s"]
            parts.append(f"load = minisail.load {call:.2f} s + preparing the fast paths {pack:.2f} s")
        if note.get("llama.cpp_decode_gb") and note.get("decode_gb"):
            parts.append(
                f"a decode step reads {note['decode_gb']:.2f} GB of weights in minisail, "
                f"{note['llama.cpp_decode_gb']:.2f} GB in llama.cpp's {note['llama.cpp_type']}"
            )
        if note.get("minisail_compile_failed"):
            parts.append(f"torch.compile failed, decoded eagerly: {note['minisail_compile_failed']}")
        if note.get("minisail_compile_s") is not None:
            parts.append(
                f"decode step compiled (torch.compile, max-autotune, freezing) in {note['minisail_compile_s']:.0f} s, "
                f"RSS {note['minisail_rss_after_compile_gb']:.2f} GB after it"
            )
        if parts:
            lines.append(f"{dtype}: " + "; ".join(parts))
    for dtype, note in report["notes"].items():
        if note.get("skipped"):
            lines.append(f"{dtype}: {note['skipped']}")
        if note.get("interleaved") is False:
            lines.append(f"{dtype}: frameworks measured one after the other (not enough memory for both at once)")
        for key in (k for k in note if k.endswith("_skipped")):
            lines.append(f"{dtype} {key.removesuffix('_skipped')}: {note[key]}")
    if report.get("llama_cpp_skipped"):
        lines.append(f"llama.cpp not compared: {report['llama_cpp_skipped']}")
    for name, reason in (report.get("peer_failures") or {}).items():
        lines.append(f"{name}: its worker {reason}; no figures for it")
    if report["targets"]:
        lines.append("")
        lines.append("targets (issues 9 and 17):")
        for name, t in report["targets"].items():
            verdict = {True: "met", False: "NOT met", None: "-"}[t["met"]]
            sign = "<=" if "rss" in name else ">="
            lines.append(f"  {name:<40} {t['value']:>7.2f}  ({sign} {t['target']})  {verdict}")
    return "\n".join(lines)
