"""The benchmark's conductor: checkpoints, worker processes, interleaved repeats, medians, ratios and targets.

For each dtype it starts one worker process per framework (minisail; transformers when installed; llama.cpp
when installed and asked for, on a GGUF of the same language model in the matching type: bench/llama_side.py;
see worker.py), each loading its own copy of the same weights cold (page cache dropped). When memory allows both
at once, every measurement alternates between them (A B, B A, ...), so a busy moment of the machine hits both
alike; otherwise they run one after the other and the result says so. Extra load-only processes give the load
time and peak RSS their repeats. Every figure is a median.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench import gguf_export
from bench.checkpoints import ensure_checkpoints, evict_page_cache, log, parameter_count
from bench.machine import machine_info, memory_available_bytes, streaming_bandwidth
from bench.models import int8_available
from bench.presets import Preset
from minisail.errors import MinisailError
from minisail.fast.packing import packing_support

METRICS = ["load_s", "peak_rss_gb", "vision_1tile_s", "vision_7tiles_s", "prefill_s", "ttft_s", "decode_tok_s"]
BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "int8": 1.1, "int4": 0.7}  # int8/int4: + scales, bf16 norms, embeddings
LOAD_PEAK = {"minisail": 1.15, "transformers": 1.6, "llama.cpp": 1.1}  # peak RSS while loading / weight bytes
LLAMA = "llama.cpp"  # the language model only: no vision measurements, no matmuls-alone
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


class Worker:
    """A worker process (worker.py) holding one model; `request(op)` sends one command and returns its answer."""

    def __init__(self, spec: dict):
        self.spec, self.name = spec, f"{spec['dtype']} {spec['framework']}"
        command = [sys.executable, "-m", "bench.worker", json.dumps(spec)]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=worker_environment()
        )
        self.load = self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            hint = " (killed: most likely out of memory)" if code in (-9, 137) else ""
            raise MinisailError(f"the {self.name} benchmark worker stopped with exit status {code}{hint}")
        return json.loads(line)

    def request(self, **command) -> dict:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        """Ask the worker to exit; stop it if it does not (an error or Ctrl-C left it mid-measurement)."""
        if self.process.poll() is None:
            try:
                self.process.stdin.write('{"op": "exit"}\n')
                self.process.stdin.flush()
                self.process.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()


REPOSITORY = Path(__file__).resolve().parent.parent  # the checkout holding bench/ (not installed)


def worker_environment() -> dict[str, str]:
    """This environment with the repository root first on PYTHONPATH, so `python -m bench.worker` finds this
    bench/ whatever the current directory is (relative --cache paths stay relative to the caller's)."""
    path = [str(REPOSITORY), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def start_worker(spec: dict, folder: Path) -> Worker:
    evict_page_cache(folder)
    worker = Worker(spec)
    load = worker.load
    log(
        f"{worker.name}: loaded in {load['load_s']:.2f} s, peak RSS {load['peak_rss_gb']:.2f} GB "
        f"({load['weights_gb']:.2f} GB of weights)"
    )
    return worker


def measure(workers: list[Worker], preset: Preset, settings: Settings) -> dict[str, dict[str, list]]:
    """Run every timed operation `repeats` times on each worker, alternating the order each round."""
    samples = {w.name: {m: [] for m in [*METRICS[2:], "cpu_share", "decode_matmuls_s"]} for w in workers}
    plan = [("vision_1tile_s", {"op": "vision", "tiles": 1}, settings.repeats)]
    if settings.seven_tiles:
        plan.append(("vision_7tiles_s", {"op": "vision", "tiles": 7}, settings.long_repeats))
    if preset.has_llm:
        plan.append(("prefill_s", {"op": "prefill"}, settings.repeats))
        plan.append(("generate", {"op": "generate", "tokens": settings.new_tokens}, settings.long_repeats))
    if preset.has_llm:  # minisail only: the decode step's matrix products alone (its kernels' ceiling)
        plan.append(("decode_matmuls_s", {"op": "matmuls"}, settings.repeats))
    for w in workers:  # warm-up, untimed: thread pools, allocator, oneDNN kernels for each shape
        if w.spec["framework"] != LLAMA:
            w.request(op="vision", tiles=1)
        if preset.has_llm and w.spec.get("compile") and w.spec["framework"] == "minisail":
            # the warm-up generation compiles the decode step (for a cache of the size the timed ones use)
            answer = w.request(op="generate", tokens=settings.new_tokens)
            if answer.get("compile_failed"):
                w.load["compile_failed"] = answer["compile_failed"]
                log(f"{w.name}: torch.compile failed on this machine, decoding eagerly ({answer['compile_failed']})")
            else:
                w.load["compile_s"], w.load["rss_after_compile_gb"] = answer["s"], answer["rss_gb"]
                log(f"{w.name}: compiled the decode step in the warm-up generation, {answer['s']:.1f} s")
        elif preset.has_llm:
            w.request(op="generate", tokens=4 if settings.warmup else 2)  # a prefill and decode steps
    for metric, command, repeats in plan:
        for r in range(repeats):
            for w in workers if r % 2 == 0 else workers[::-1]:
                if metric == "decode_matmuls_s" and w.spec["framework"] != "minisail":
                    continue
                if metric.startswith("vision") and w.spec["framework"] == LLAMA:
                    continue
                answer = w.request(**command)
                share = f"(cpu share {answer['cpu_share']:.2f})"
                if metric == "generate":
                    samples[w.name]["ttft_s"].append(answer["ttft_s"])
                    samples[w.name]["decode_tok_s"].append(answer["decode_tok_s"])
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
    for fw in candidates + ([LLAMA] if LLAMA in folders else []):
        peak = estimate * LOAD_PEAK[fw] + 1e9
        if peak > available:
            skipped[fw] = f"skipped: loading needs about {peak / 1e9:.1f} GB of RAM, {available / 1e9:.1f} GB available"
            log(f"{dtype} {fw}: {skipped[fw]}")
        else:
            frameworks.append(fw)
    return frameworks, skipped


def run_dtype(preset: Preset, dtype: str, folders: dict, settings: Settings, params: int) -> tuple[dict, dict]:
    """{framework: {metric: median}} and notes for one dtype."""
    spec = {"preset": preset.name, "dtype": dtype, "threads": settings.threads, "compile": settings.compile}
    spec["context"] = PROMPT_TOKENS + settings.new_tokens + 2  # llama.cpp's KV cache: the prompt and the tokens
    estimate = params * BYTES_PER_PARAM[dtype]
    available = memory_available_bytes() or float("inf")
    frameworks, skipped = fitting_frameworks(folders, dtype, estimate, available)
    if "minisail" not in frameworks:
        return {}, {"skipped": skipped["minisail"]}
    loads = {fw: [] for fw in frameworks}
    for _ in range(settings.load_repeats - 1):  # extra fresh processes, load only
        for fw in frameworks:
            worker = start_worker({**spec, "framework": fw, "folder": str(folders[fw]), "load_only": True}, folders[fw])
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
                samples.update(measure(resident, preset, settings))
                while resident:
                    resident.pop().close()
            resident.append(start_worker({**spec, "framework": fw, "folder": str(folders[fw])}, folders[fw]))
            loads[fw].append(resident[-1].load)
        samples.update(measure(resident, preset, settings))
    finally:
        for w in resident:
            w.close()
    results = {}
    for fw in ["minisail", *[f for f in frameworks if f != "minisail"]]:
        results[fw] = {m: median(x[m] for x in loads[fw]) for m in METRICS[:2]}
        results[fw].update({m: median(samples[f"{dtype} {fw}"][m]) for m in METRICS[2:]})
    ours = loads["minisail"][-1]
    notes = {"interleaved": interleaved if len(frameworks) > 1 else None, "weights_gb": ours["weights_gb"]}
    notes["decode_gb"] = ours.get("decode_gb") or None
    if "compile_s" in ours:  # the compiled decode step: its one-off cost and the memory its constants take
        notes["minisail_compile_s"], notes["minisail_rss_after_compile_gb"] = (
            ours["compile_s"],
            ours["rss_after_compile_gb"],
        )
    # a fast path this machine could not run and why; how many Linears compute prefill in float32 instead
    for key in ("compile_failed", "unpacked_because", "upcast_linears"):
        if ours.get(key):
            notes[f"minisail_{key}"] = ours[key]
    if ours.get("pack_s") is not None:  # minisail's load = minisail.load + packing bf16 Linears for oneDNN
        notes["minisail_load_call_s"] = median(x["load_call_s"] for x in loads["minisail"])
        notes["minisail_pack_s"] = median(x["pack_s"] for x in loads["minisail"])
    matmuls = median(samples[f"{dtype} minisail"]["decode_matmuls_s"])
    if matmuls is not None:
        notes["minisail_decode_matmuls_ms"] = matmuls * 1e3
    notes.update({f"{fw}_skipped": note for fw, note in skipped.items()})
    if LLAMA in frameworks:  # what llama.cpp ran: its file type, the bytes a decode step reads, its CPU features
        about = gguf_export.about(folders[LLAMA])
        notes["llama.cpp_type"], notes["llama.cpp_decode_gb"] = about["type"], about["decode_bytes"] / 1e9
        notes["llama.cpp_system_info"] = loads[LLAMA][-1].get("system_info")
    for fw in frameworks:  # the interpreter and libraries before loading, and how busy the CPU was for us
        notes[f"{fw}_baseline_rss_gb"] = median(x["baseline_rss_gb"] for x in loads[fw])
        notes[f"{fw}_cpu_share"] = median(samples[f"{dtype} {fw}"]["cpu_share"])
    return results, notes


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


def run_bench(preset: Preset, cache: Path, settings: Settings) -> dict:
    compare = settings.compare and preset.transformers and _has_transformers()
    folders = ensure_checkpoints(preset, cache, transformers=compare)
    machine = machine_info()
    log("measuring the memory bandwidth")
    bandwidths = [streaming_bandwidth()]
    log(f"bandwidth {bandwidths[0] / 1e9:.1f} GB/s")
    params = parameter_count(preset)
    results, notes = {}, {}
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
        rows, notes[dtype] = run_dtype(preset, dtype, dtype_folders, settings, params)
        if rows:
            results[dtype] = rows
    bandwidths.append(streaming_bandwidth())  # again at the end: a busy moment lowers one reading, not both
    bandwidth = max(bandwidths)  # the higher reading is the machine's; the roofline errs towards demanding
    machine["bandwidth_gb_s"] = round(bandwidth / 1e9, 2)
    machine["bandwidth_readings_gb_s"] = [round(b / 1e9, 2) for b in bandwidths]
    machine["load_average_1min_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    roofline = {d: round(bandwidth / (n["decode_gb"] * 1e9), 2) for d, n in notes.items() if n.get("decode_gb")}
    return {
        "preset": preset.name,
        "machine": machine,
        "roofline_decode_tok_s": roofline,
        "results": results,
        "ratios": ratios(results),
        "ratios_vs_llama_cpp": llama_ratios(results, notes),
        "llama_cpp_skipped": peer,  # None: llama.cpp ran (see each dtype's results), else why not
        "targets": evaluate(results, roofline, notes),
        "notes": notes,
        "settings": {**settings.__dict__, "dtypes": list(settings.dtypes), "parameters": params},
    }


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


def _has_transformers() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is not None
