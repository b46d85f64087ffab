"""One benchmark worker process: loads one model (minisail's, transformers' or llama.cpp's), then times what it
is asked to (llama.cpp: the language model only, no "vision").

    python -m bench.worker '{"framework": "minisail", "preset": "sail-vl-2b", "folder": ..., "dtype": "bf16"}'

Each worker is a fresh process, so its load time and peak RSS are those of a user's first `load`, and at most
one model is resident in it. The protocol is one JSON object per line: the worker first prints its load report,
then reads commands on stdin and answers each on stdout (progress and warnings go to stderr):

    {"op": "vision", "tiles": 7}    -> {"s": seconds}          encode 7 tiles (ViT + pixel shuffle + mlp1)
    {"op": "prefill"}               -> {"s": seconds}          286 prompt embeddings -> first logits, KV cache
    {"op": "generate", "tokens": n} -> {"ttft_s", "decode_tok_s"}  pixels + ids -> n greedy tokens
    {"op": "matmuls"}               -> {"s", "step_s", "outside_s"}  minisail: a decode step's products alone,
                                       the step beside them, and the difference (medians of 5 pairs)
    {"op": "exit"}

Load = from the `load` call until every weight page is resident (each page touched once), so a lazily mapped
checkpoint and an eagerly copied one are compared on the same footing. Peak RSS is the kernel's high-water mark
(VmHWM) of the whole process at that moment: interpreter, libraries and weights.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__" and json.loads(sys.argv[1]).get("framework") == "minisail":
    import minisail  # noqa: F401  before torch, as `python -m minisail` does: its allocator setting (allocator.py)

import torch  # noqa: E402

from bench.presets import Preset, get_preset

PROMPT_BEFORE, IMAGE_TOKENS, PROMPT_AFTER = 20, 256, 10  # 256 image + 30 text tokens
MAX_TILES = 7


def bench_inputs(preset: Preset) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded pixel values [7, 3, 448, 448] (float32) and a [1, 286] prompt with one tile's 256 image tokens."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(MAX_TILES, 3, 448, 448, generator=generator)
    vocab = preset.config["llm_config"].get("vocab_size", 1000)
    text = torch.randint(0, min(vocab, 1000), (PROMPT_BEFORE + PROMPT_AFTER,), generator=generator)
    image = torch.full((IMAGE_TOKENS,), preset.image_token_id)
    ids = torch.cat([text[:PROMPT_BEFORE], image, text[PROMPT_BEFORE:]])[None]  # [1, 286]
    return pixels, ids


def rss_bytes(field: str = "VmHWM") -> int:
    """The process's resident set now (VmRSS) or its high-water mark (VmHWM); ru_maxrss where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def touch(module: torch.nn.Module) -> int:
    """Read one byte of every 4 KiB page of every weight (faulting mapped files in); return the weight bytes.

    Only each tensor's own bytes are touched: a zero-copy view keeps its whole checkpoint file mapped, including
    the official q/k/v and gate/up matrices that loading copied into fused ones and never reads again."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        nbytes = t.numel() * t.element_size()
        if t.is_mkldnn:  # a packed weight (minisail/fast/packing.py): written when packed, so resident already
            total += nbytes
            continue
        key = (t.data_ptr(), nbytes)
        if key in seen or nbytes == 0:
            continue
        seen.add(key)
        total += nbytes
        flat = t.detach().reshape(-1)
        (flat.view(torch.uint8)[::4096] if t.is_contiguous() else flat).sum()
    # packed weights that are no tensors (fbgemm's, fast/int8_dot.py): written when packed, so resident already
    return total + sum(getattr(m, "opaque_weight_bytes", 0) for m in module.modules())


def modules_called(model: torch.nn.Module, step) -> list[torch.nn.Module]:
    """The modules of `model` that `step()` calls, in call order."""
    called: list[torch.nn.Module] = []
    hooks = [m.register_forward_pre_hook(lambda m, args: called.append(m)) for m in model.modules()]
    try:
        step()
    finally:
        for hook in hooks:
            hook.remove()
    return called


def decode_bytes(called: list[torch.nn.Module]) -> int:
    """Bytes of weights one decode step reads: every module it calls (`called`), counted once; an embedding table
    counts one row per token (Mono-InternVL's visual experts, never called for text, do not count)."""
    seen, total = set(), 0
    for module in called:
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            key = id(t)
            if key in seen:
                continue
            seen.add(key)
            rows = 1 if isinstance(module, torch.nn.Embedding) else None
            total += (t[0].numel() if rows else t.numel()) * t.element_size()
        total += getattr(module, "opaque_weight_bytes", 0)  # a packed weight that is no tensor (fbgemm's)
    return total


class MinisailRunner:
    """minisail as the benchmark runs it on a CPU: `minisail.load`, then the CPU fast paths `Session` runs
    (minisail/fast/cpu.py). With `compile`, the decode step is compiled instead (see `compile_decode_step`)."""

    def __init__(self, preset: Preset, folder: Path, dtype: str, compile: bool = False):
        from bench.models import load_minisail
        from minisail import allocator
        from minisail.fast.cpu import speed_up_on_cpu
        from minisail.fast.huge_pages import huge_page_bytes
        from minisail.fast.packing import pack_linears
        from minisail.fast.vit_attention import fast_attention_support, use_fast_vit_attention

        self.preset, self.compile = preset, compile and preset.has_llm
        start = time.perf_counter()
        self.model = load_minisail(preset, folder, dtype)
        loaded = time.perf_counter()
        if self.compile:  # packed weights cannot be traced: pack only what stays eager
            self.packed = pack_linears(self.model.vision_model) + pack_linears(self.model.projector)
            if self.packed and fast_attention_support().available:  # the tower stays eager: as Session runs it
                use_fast_vit_attention(self.model)
            if dtype != "fp32" and not self.packed:  # no native bf16: float32 prefill (fast/upcast.py)
                from minisail.fast.upcast import upcast_linears

                upcast_linears(self.model)
            self.load_details = {"load_call_s": loaded - start, "pack_s": time.perf_counter() - loaded}
            return
        done = speed_up_on_cpu(self.model)  # what Session runs (minisail/fast/cpu.py)
        self.packed = done.packed
        self.load_details = {
            "load_call_s": loaded - start,
            "pack_s": time.perf_counter() - loaded,  # every CPU fast path's preparation, packing included
            "fast_paths": done.summary(),
            "fast_path_reasons": [allocator.decision, *done.reasons],
            "huge_page_gb": (huge_page_bytes() or 0) / 1e9,  # what the kernel really backs with 2 MiB pages
        }

    def compile_decode_step(self) -> None:
        """Compile `Decoder.decode_step` (one graph, tests/generation/test_compile.py) with inductor's max-autotune and
        freezing: the weights become constants in its own CPU GEMM layout, which streams faster than oneDNN's,
        at the price of a compilation (minutes) and a second copy of the language model's weights."""
        import torch._inductor.config

        torch._inductor.config.freezing = True
        decoder = self.model.language_model
        decoder.decode_step = torch.compile(decoder.decode_step, mode="max-autotune", fullgraph=True, dynamic=False)

    def weights(self) -> torch.nn.Module:
        return self.model

    def _decode_modules(self) -> list[torch.nn.Module]:
        """The modules one decode step calls, in call order (as loaded: plain, packed or int8 Linears)."""
        from minisail.generate import decode_step

        cache, token = self.model.language_model.new_cache(1, 2), torch.zeros(1, 1, dtype=torch.long)
        with torch.inference_mode():
            return modules_called(self.model, lambda: decode_step(self.model, cache, token, torch.zeros_like(token)))

    def decode_bytes(self) -> int | None:
        return decode_bytes(self._decode_modules()) if self.preset.has_llm else None

    def setup(self, pixels, ids):
        self.pixels, self.ids = pixels, ids
        if self.preset.has_llm:
            self.prepared = self.model.prepare_inputs(ids, torch.ones_like(ids), pixels[:1])
            self.decode_linears = [m for m in self._decode_modules() if hasattr(m, "in_features")]
        if self.compile:
            self.compile_decode_step()  # compiled on the first generation (the warm-up)

    def decode_step_and_matmuls(self, pairs: int = 5) -> dict:
        """A decode step after the prompt and the step's matrix products alone (`decode_matmuls`), `pairs` times in
        turn: the median of each, and of each pair's difference (the step's work outside its products). Taken side
        by side, so a host whose speed drifts between samples moves both alike. A compiled step is not the sum of
        eager products (and a cache of another size would compile it again): there, the products alone."""
        from minisail.generate import decode_step

        if self.compile:
            return {"s": self.decode_matmuls()}

        cache, logits = self._prefilled(spare_slots=pairs)
        prompt, token = self.prepared.embeds.shape[1], logits.argmax(-1, keepdim=True)
        steps, matmuls = [], []
        for i in range(pairs):
            start = time.perf_counter()
            token = decode_step(self.model, cache, token, torch.tensor([[prompt + i]])).argmax(-1, keepdim=True)
            steps.append(time.perf_counter() - start)
            matmuls.append(self.decode_matmuls())
        outside = [step - products for step, products in zip(steps, matmuls, strict=True)]
        median = statistics.median
        return {"s": median(matmuls), "step_s": median(steps), "outside_s": median(outside), "pairs": [steps, matmuls]}

    def decode_matmuls(self) -> float:
        """Seconds for one decode step's matrix products alone: each of them once, on one row, in order. What a
        decode step would take if everything but its weight-streaming kernels cost nothing."""
        dtype = self.model.language_model.embed.weight.dtype  # the activations' dtype (bf16 for int8 too)
        rows = {m.in_features: torch.randn(1, 1, m.in_features).to(dtype) for m in self.decode_linears}
        start = time.perf_counter()
        for module in self.decode_linears:
            module(rows[module.in_features])
        return time.perf_counter() - start

    def vision(self, tiles: int):
        return self.model.encode_images(self.pixels[:tiles])

    def prefill(self):
        return self._prefilled(spare_slots=1)[1].argmax(-1)

    def _prefilled(self, spare_slots: int):
        """(a KV cache holding the prompt with `spare_slots` free slots, the prompt's last logits [1, V])."""
        from minisail.generate import prefill
        from minisail.llm.decoder import positions_from_mask

        decoder, inputs = self.model.language_model, self.prepared
        cache = decoder.new_cache(1, inputs.embeds.shape[1] + spare_slots)
        return cache, prefill(decoder, inputs, positions_from_mask(inputs.attention_mask), cache)

    def generate(self, tokens: int) -> list[float]:
        """Seconds from the call to each new token. A compiled decode step is compiled by the first call; where
        compiling fails on this machine (decided by trying), the step runs eagerly and the failure is reported."""
        if self.compile and not getattr(self, "compiled_once", False):
            self.compiled_once = True
            try:
                return self._generate(tokens)
            except Exception as error:  # inductor / dynamo failures have no common base class
                from minisail.fast.packing import first_line

                del self.model.language_model.decode_step  # the class's eager method again
                self.compile, self.compile_failed = False, f"{type(error).__name__}: {first_line(error)}"
                print(f"torch.compile failed here, decoding eagerly: {self.compile_failed}", file=sys.stderr)
        return self._generate(tokens)

    def _generate(self, tokens: int) -> list[float]:
        from minisail.generate import GenerationConfig, generate_steps

        start, times = time.perf_counter(), []
        config = GenerationConfig(max_new_tokens=tokens)
        steps = generate_steps(self.model, self.ids, torch.ones_like(self.ids), self.pixels[:1], config)
        for _token in steps:
            times.append(time.perf_counter() - start)
        return times


def make_runner(spec: dict):
    preset = get_preset(spec["preset"])
    if spec["framework"] == "transformers":
        from bench.hf_side import TransformersRunner

        return TransformersRunner(preset, Path(spec["folder"]), spec["dtype"])
    if spec["framework"] == "llama.cpp":  # the language model only, from a GGUF (bench/llama_side.py)
        from bench.llama_side import LlamaCppRunner

        threads = int(spec.get("threads") or torch.get_num_threads())  # as serve() sets torch's
        return LlamaCppRunner(preset, Path(spec["folder"]), threads, context=int(spec.get("context") or 512))
    return MinisailRunner(preset, Path(spec["folder"]), spec["dtype"], compile=bool(spec.get("compile")))


def send(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def serve(spec: dict) -> None:
    torch.set_num_threads(int(spec.get("threads") or torch.get_num_threads()))
    if spec["framework"] == "transformers":
        import transformers  # noqa: F401  (imported before the clock starts, like minisail is)
    if spec["framework"] == "llama.cpp":
        import llama_cpp  # noqa: F401
    baseline = rss_bytes("VmRSS")  # interpreter and libraries, before any weight
    start = time.perf_counter()
    runner = make_runner(spec)
    # llama.cpp's weights are its own (memory-mapped GGUF): their bytes are the file's
    weight_bytes = runner.weight_bytes() if hasattr(runner, "weight_bytes") else touch(runner.weights())
    load_s = time.perf_counter() - start
    report = {"load_s": load_s, "peak_rss_gb": rss_bytes() / 1e9, "weights_gb": weight_bytes / 1e9}
    report["baseline_rss_gb"], report["rss_gb"] = baseline / 1e9, rss_bytes("VmRSS") / 1e9
    report.update(getattr(runner, "load_details", {}))
    if spec["framework"] == "minisail":
        report["decode_gb"] = (runner.decode_bytes() or 0) / 1e9
    send(report)
    if spec.get("load_only"):
        return
    preset = get_preset(spec["preset"])
    with torch.inference_mode():
        runner.setup(*bench_inputs(preset))
        for line in sys.stdin:
            command = json.loads(line)
            op = command["op"]
            if op == "exit":
                return
            t0, cpu0 = time.perf_counter(), time.process_time()
            if op == "vision":
                runner.vision(int(command["tiles"]))
                answer = {"s": time.perf_counter() - t0}
            elif op == "matmuls":  # minisail only: a decode step beside its matrix products alone
                answer = runner.decode_step_and_matmuls()
            elif op == "prefill":
                runner.prefill()
                answer = {"s": time.perf_counter() - t0}
            elif op == "generate":
                times = runner.generate(int(command["tokens"]))
                rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else None
                answer = {"ttft_s": times[0], "decode_tok_s": rate, "tokens": len(times), "s": times[-1]}
                answer["rss_gb"] = rss_bytes("VmRSS") / 1e9  # after a compilation, its constants are resident
                if getattr(runner, "compile_failed", None):
                    answer["compile_failed"] = runner.compile_failed
            else:
                raise ValueError(f"unknown benchmark command {op!r}")
            # CPU seconds per wall second over the threads: well below 1 means other processes took the cores.
            wall = time.perf_counter() - t0
            answer["cpu_share"] = (time.process_time() - cpu0) / wall / torch.get_num_threads()
            send(answer)


if __name__ == "__main__":
    try:
        serve(json.loads(sys.argv[1]))
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the parent says so, once (status 130)
        sys.exit(130)
