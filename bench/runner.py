"""The benchmark's conductor: checkpoints, worker processes, interleaved repeats and medians (ratios and targets:
targets.py; the processes themselves: processes.py).

For each dtype it starts one worker process per framework (minisail; transformers when installed; llama.cpp
when installed and asked for, on a GGUF of the same language model in the matching type: bench/llama_side.py;
see worker.py), each loading its own copy of the same weights cold (page cache dropped). When memory allows both
at once, every measurement alternates between them (A B, B A, ...), so a busy moment of the machine hits both
alike; otherwise they run one after the other and the result says so. Extra load-only processes give the load
time and peak RSS their repeats. Every figure is a median.

A dtype whose load would not fit in the memory available (BYTES_PER_PARAM x LOAD_PEAK, within MEMORY_SHARE of
it) is skipped with the reason, not run into the out-of-memory killer. A peer's worker that dies (a crash in
llama.cpp, transformers killed) costs only that peer's figures for that dtype: the report's `peer_failures` says
how it stopped, and minisail and the other peers go on. minisail's own worker dying stops the run.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from bench import gguf_export
from bench.checkpoints import ensure_checkpoints, log, parameter_count
from bench.machine import machine_info, memory_available_bytes, streaming_bandwidth
from bench.models import int8_available
from bench.presets import Preset
from bench.processes import LLAMA, Worker, WorkerDied, record_peer_death, start_worker
from bench.targets import METRICS, TIMED, evaluate, llama_ratios, paired, ratios
from minisail.fast.packing import packing_support

BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "int8": 1.1, "int4": 0.7}  # int8/int4: + scales, bf16 norms, embeddings
LOAD_PEAK = {"minisail": 1.15, "transformers": 1.6, "llama.cpp": 1.1}  # peak RSS while loading / weight bytes
MEMORY_SHARE = 0.9  # of the memory available at the start of a dtype: the rest stays the OS's and other processes'
PROMPT_TOKENS = 286  # worker.bench_inputs: 20 text + 256 image + 10 text


@dataclass(frozen=True)
class Settings:
    dtypes: tuple[str, ...] = ("fp32", "bf16", "int8")
    load_repeats: int = 3
    repeats: int = 5  # vision 1 tile, prefill
    long_repeats: int = 3  # vision 7 tiles, generation
    new_tokens: int = 64
    seven_tiles: bool = True  # also encode 7 tiles (the longest measurement)
    warmup: bool = True  # one untimed round of every operation before timing
    compare: bool = True  # run transformers too, when it is installed
    threads: int | None = None
    compile: bool = False  # minisail's decode step through torch.compile (inductor, max-autotune, freezing)
    llama: bool = True  # run llama.cpp too, when llama_cpp and gguf are installed (never in --quick unless asked)

    @classmethod
    def quick(cls, **overrides) -> Settings:
        """The dtypes a CPU user runs, both frameworks, in a few minutes on a 2-core laptop-class CPU: one cold
        load, one repeat, a short warm-up (a 1-tile encode, a 2-token generation), 16 tokens, no 7-tile encode.
        Where this CPU runs bf16 natively: bf16 and int8 (bf16 activations). Elsewhere bf16 products are emulated
        (a 1-tile encode takes about a minute) and float32 is what chat runs by default: float32 only."""
        dtypes = ("bf16", "int8") if packing_support().available else ("fp32",)
        quick = {"dtypes": dtypes, "load_repeats": 1, "repeats": 1, "long_repeats": 1, "new_tokens": 16}
        return cls(**{**quick, "seven_tiles": False, "warmup": False, "llama": False, **overrides})


ROUND_PROBE_GIB = 0.5  # the bandwidth reading before each generation round: 16x the L3 of the CPUs seen, ~0.1 s


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def measure(workers: list[Worker], preset: Preset, settings: Settings, failures: dict) -> dict[str, dict[str, list]]:
    """Run every timed operation `repeats` times on each worker, alternating the order each round. A peer that
    dies is recorded in `failures` and left out from then on (record_peer_death); minisail's death stops the run."""
    extra = ["cpu_share", "decode_matmuls_s", "decode_step_s", "decode_outside_s", "round_bandwidth"]
    samples = {w.name: {m: [] for m in [*METRICS[2:], *extra]} for w in workers}
    plan = [("vision_1tile_s", {"op": "vision", "tiles": 1}, settings.repeats)]
    if settings.seven_tiles:
        plan.append(("vision_7tiles_s", {"op": "vision", "tiles": 7}, settings.long_repeats))
    if preset.has_llm:
        plan.append(("prefill_s", {"op": "prefill"}, settings.repeats))
        plan.append(("generate", {"op": "generate", "tokens": settings.new_tokens}, settings.long_repeats))
    if preset.has_llm:  # minisail only: the decode step's matrix products alone (its kernels' ceiling)
        plan.append(("decode_matmuls_s", {"op": "matmuls"}, settings.repeats))

    def ask(w: Worker, **command) -> dict | None:
        """The worker's answer; None once it has died (a peer: recorded, skipped from now on)."""
        if w.name in failures:
            return None
        try:
            return w.request(**command)
        except WorkerDied as died:
            record_peer_death(died, failures)
            return None

    for w in workers:  # warm-up, untimed: thread pools, allocator, oneDNN kernels for each shape
        if w.framework != LLAMA:
            ask(w, op="vision", tiles=1)
        if preset.has_llm and w.spec.get("compile") and w.framework == "minisail":
            # the warm-up generation compiles the decode step (for a cache of the size the timed ones use)
            answer = ask(w, op="generate", tokens=settings.new_tokens)
            if answer.get("compile_failed"):
                w.load["compile_failed"] = answer["compile_failed"]
                log(f"{w.name}: torch.compile failed on this machine, decoding eagerly ({answer['compile_failed']})")
            else:
                w.load["compile_s"], w.load["rss_after_compile_gb"] = answer["s"], answer["rss_gb"]
                log(f"{w.name}: compiled the decode step in the warm-up generation, {answer['s']:.1f} s")
        elif preset.has_llm:
            ask(w, op="generate", tokens=4 if settings.warmup else 2)  # a prefill and decode steps
    for metric, command, repeats in plan:
        for r in range(repeats):
            # the bandwidth just before each generation round: its decode is set against this reading (the host's
            # bandwidth drifts by 1.5x within minutes here, so one reading for the whole run misjudges the rounds)
            reading = streaming_bandwidth(ROUND_PROBE_GIB, repeats=5) if metric == "generate" else None
            for w in workers if r % 2 == 0 else workers[::-1]:
                if metric == "decode_matmuls_s" and w.framework != "minisail":
                    continue
                if metric.startswith("vision") and w.framework == LLAMA:
                    continue
                answer = ask(w, **command)
                if answer is None:
                    continue
                share = f"(cpu share {answer['cpu_share']:.2f})"
                if metric == "decode_matmuls_s":  # and the decode step measured beside them (not when compiled)
                    samples[w.name]["decode_step_s"].append(answer.get("step_s"))
                    samples[w.name]["decode_outside_s"].append(answer.get("outside_s"))
                if metric == "generate":
                    samples[w.name]["ttft_s"].append(answer["ttft_s"])
                    samples[w.name]["decode_tok_s"].append(answer["decode_tok_s"])
                    samples[w.name]["round_bandwidth"].append(reading)
                    log(f"{w.name}: ttft {answer['ttft_s']:.2f} s, decode {answer['decode_tok_s']:.2f} tok/s {share}")
                else:
                    samples[w.name][metric].append(answer["s"])
                    log(f"{w.name}: {metric} {answer['s']:.2f} s {share}")
                samples[w.name]["cpu_share"].append(answer["cpu_share"])
    return samples


def fitting_frameworks(folders: dict, dtype: str, estimate: float, available: float) -> tuple[list, dict]:
    """The frameworks to run (transformers first: its load peak is the higher one, take it while alone) and
    why any was skipped (not enough memory to load it)."""
    frameworks, skipped = [], {}
    quantized = dtype in ("int8", "int4")  # minisail only: they compare with transformers' bf16
    candidates = ["transformers", "minisail"] if "transformers" in folders and not quantized else ["minisail"]
    usable = MEMORY_SHARE * available
    for fw in candidates + ([LLAMA] if LLAMA in folders else []):
        peak = estimate * LOAD_PEAK[fw] + 1e9
        if peak > usable:
            skipped[fw] = (
                f"skipped: loading {dtype} needs about {peak / 1e9:.1f} GB of RAM and {usable / 1e9:.1f} GB may be "
                f"used ({MEMORY_SHARE:.0%} of what is available): an out-of-memory kill would end the run"
            )
            log(f"{dtype} {fw}: {skipped[fw]}")
        else:
            frameworks.append(fw)
    return frameworks, skipped


def run_dtype(
    preset: Preset, dtype: str, folders: dict, settings: Settings, params: int, failures: dict
) -> tuple[dict, dict]:
    """{framework: {metric: median}} and notes for one dtype. A peer whose worker dies (loading or measuring) is
    recorded in `failures` ({"int8 llama.cpp": how it stopped}) and has no figures; minisail's death is an error."""
    spec = {"preset": preset.name, "dtype": dtype, "threads": settings.threads, "compile": settings.compile}
    spec["context"] = PROMPT_TOKENS + settings.new_tokens + 2  # llama.cpp's KV cache: the prompt and the tokens
    estimate = params * BYTES_PER_PARAM[dtype]
    available = memory_available_bytes() or float("inf")
    frameworks, skipped = fitting_frameworks(folders, dtype, estimate, available)
    if "minisail" not in frameworks:
        return {}, {"skipped": skipped["minisail"]}
    loads = {fw: [] for fw in frameworks}

    def start(fw: str, **extra) -> Worker | None:
        if f"{dtype} {fw}" in failures:  # died before: not started again
            return None
        try:
            return start_worker({**spec, "framework": fw, "folder": str(folders[fw]), **extra}, folders[fw])
        except WorkerDied as died:
            record_peer_death(died, failures)
            return None

    for _ in range(settings.load_repeats - 1):  # extra fresh processes, load only
        for fw in frameworks:
            worker = start(fw, load_only=True)
            if worker:
                loads[fw].append(worker.load)
                worker.close()
    resident, samples, interleaved = [], {}, True
    try:
        for fw in frameworks:
            # Both at once only with room to spare: a model's pages that get reclaimed would be read again from
            # disk mid-measurement. Otherwise measure what is resident first, then go on alone.
            in_use = sum(w.load["rss_gb"] * 1e9 for w in resident)
            if resident and in_use + estimate * 1.2 + 1e9 > 0.85 * available:
                interleaved = False
                samples.update(measure(resident, preset, settings, failures))
                while resident:
                    resident.pop().close()
            worker = start(fw)
            if worker:
                resident.append(worker)
                loads[fw].append(worker.load)
        samples.update(measure(resident, preset, settings, failures))
    finally:
        for w in resident:
            w.close()
    frameworks = [fw for fw in frameworks if f"{dtype} {fw}" not in failures]  # the peers that lived to the end
    results = {}
    for fw in ["minisail", *[f for f in frameworks if f != "minisail"]]:
        results[fw] = {m: median(x[m] for x in loads[fw]) for m in METRICS[:2]}
        results[fw].update({m: median(samples[f"{dtype} {fw}"][m]) for m in METRICS[2:]})
    ours = loads["minisail"][-1]
    notes = {"interleaved": interleaved if len(frameworks) > 1 else None, "weights_gb": ours["weights_gb"]}
    mine = samples[f"{dtype} minisail"]  # each peer's timed samples against minisail's, round by round
    notes["paired"] = {
        fw: {m: paired(mine[m], samples[f"{dtype} {fw}"][m], m) for m in TIMED} for fw in frameworks if fw != "minisail"
    }
    notes["decode_gb"] = ours.get("decode_gb") or None
    if notes["decode_gb"]:  # each round's decode against the bandwidth read just before it (measure)
        rounds = zip(mine["decode_tok_s"], mine["round_bandwidth"], strict=False)
        shares = [tok * notes["decode_gb"] * 1e9 / bw for tok, bw in rounds if tok and bw]
        if shares:
            notes["minisail_decode_vs_round_roofline"] = round(median(shares), 3)
            notes["round_bandwidth_gb_s"] = [round(bw / 1e9, 2) for bw in mine["round_bandwidth"] if bw]
    if "compile_s" in ours:  # the compiled decode step: its one-off cost and the memory its constants take
        notes["minisail_compile_s"], notes["minisail_rss_after_compile_gb"] = (
            ours["compile_s"],
            ours["rss_after_compile_gb"],
        )
    # the CPU fast paths this machine ran (minisail/fast/cpu.py) and why; a compilation that failed
    for key in ("compile_failed", "fast_paths", "fast_path_reasons", "huge_page_gb"):
        if ours.get(key):
            notes[f"minisail_{key}"] = ours[key]
    if ours.get("pack_s") is not None:  # minisail's load = minisail.load + its CPU fast paths' preparation
        notes["minisail_load_call_s"] = median(x["load_call_s"] for x in loads["minisail"])
        notes["minisail_pack_s"] = median(x["pack_s"] for x in loads["minisail"])
    for metric in ("decode_matmuls", "decode_step", "decode_outside"):  # the step beside its products (worker)
        value = median(samples[f"{dtype} minisail"][f"{metric}_s"])
        if value is not None:
            notes[f"minisail_{metric}_ms"] = value * 1e3
    notes.update({f"{fw}_skipped": note for fw, note in skipped.items()})
    if LLAMA in frameworks:  # what llama.cpp ran: its file type, the bytes a decode step reads, its CPU features
        about = gguf_export.about(folders[LLAMA])
        notes["llama.cpp_type"], notes["llama.cpp_decode_gb"] = about["type"], about["decode_bytes"] / 1e9
        notes["llama.cpp_system_info"] = loads[LLAMA][-1].get("system_info")
    for fw in frameworks:  # the interpreter and libraries before loading, and how busy the CPU was for us
        notes[f"{fw}_baseline_rss_gb"] = median(x["baseline_rss_gb"] for x in loads[fw])
        notes[f"{fw}_cpu_share"] = median(samples[f"{dtype} {fw}"]["cpu_share"])
    return results, notes


def run_bench(preset: Preset, cache: Path, settings: Settings) -> dict:
    compare = settings.compare and preset.transformers and _has_transformers()
    folders = ensure_checkpoints(preset, cache, transformers=compare)
    machine = machine_info()
    log("measuring the memory bandwidth")
    bandwidths = [streaming_bandwidth()]
    log(f"bandwidth {bandwidths[0] / 1e9:.1f} GB/s")
    params = parameter_count(preset)
    results, notes, failures = {}, {}, {}
    peer = llama_peer(preset, settings)
    if peer:
        log(f"llama.cpp not compared: {peer}")
    for dtype in settings.dtypes:
        if dtype in ("int8", "int4") and not (preset.has_llm and int8_available()):
            notes[dtype] = {"skipped": f"{dtype} weight-only loading is not available for this preset"}
            log(f"{dtype}: {notes[dtype]['skipped']}")
            continue
        dtype_folders = dict(folders)
        if peer is None and dtype in gguf_export.GGUF_TYPES:
            type_name = gguf_export.GGUF_TYPES[dtype]
            dtype_folders[LLAMA] = gguf_export.ensure_gguf(preset, cache, folders["minisail"], type_name)
        rows, notes[dtype] = run_dtype(preset, dtype, dtype_folders, settings, params, failures)
        if rows:
            results[dtype] = rows
        # again after each dtype (the last one: at the end): on a drifting host a busy moment lowers one reading
        bandwidths.append(streaming_bandwidth())
    bandwidth = max(bandwidths)  # the highest reading is the machine's; the roofline errs towards demanding
    machine["bandwidth_gb_s"] = round(bandwidth / 1e9, 2)
    machine["bandwidth_readings_gb_s"] = [round(b / 1e9, 2) for b in bandwidths]
    machine["load_average_1min_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    roofline = {d: round(bandwidth / (n["decode_gb"] * 1e9), 2) for d, n in notes.items() if n.get("decode_gb")}
    return {
        "preset": preset.name,
        "machine": machine,
        "roofline_decode_tok_s": roofline,
        "results": results,
        "ratios": ratios(results, notes),
        "ratios_vs_llama_cpp": llama_ratios(results, notes),
        "llama_cpp_skipped": peer,  # None: llama.cpp ran (see each dtype's results), else why not
        "peer_failures": failures,  # {"int8 llama.cpp": how its worker stopped}: those figures are absent
        "targets": evaluate(results, roofline, notes),
        "notes": notes,
        "settings": {**settings.__dict__, "dtypes": list(settings.dtypes), "parameters": params},
    }


def llama_peer(preset: Preset, settings: Settings) -> str | None:
    """None when llama.cpp runs beside minisail in this run, else why not (recorded in the notes)."""
    if not settings.llama:
        return "not asked for (--no-llama; --quick runs without it unless given --llama)"
    if not preset.has_llm or not gguf_export.supports(preset):
        return f"the {preset.name} preset has no Qwen2 language model to write as a GGUF"
    import importlib.util

    missing = [name for name in ("llama_cpp", "gguf") if importlib.util.find_spec(name) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (pip install -e '.[llama]': README 'Comparing with llama.cpp')"
    return None


def _has_transformers() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is not None
