"""The llama.cpp side of the benchmark: the same language model, from a GGUF of the same weights (gguf_export.py).

Used only when `llama_cpp` (llama-cpp-python, the `llama` extra: README "Comparing with llama.cpp") is importable
and the run asks for it. Like hf_side.py for transformers, this is what a user of the other framework runs, at
the same settings as minisail's worker: the same thread count (prompt and decode), the same 286 prompt token ids
(the image's 256 placeholders included: llama.cpp has no vision tower, so its prompt is token embeddings only),
the same number of greedy tokens.

Through llama.cpp's C API as llama-cpp-python exposes it (`llama_decode` on a batch of token ids), not the
high-level `Llama` class: the model has no vocabulary (token ids in, logits out), and nothing but llama.cpp's own
work is timed. Everything else is llama.cpp's default for a CPU user: memory-mapped weights, its own choice of
flash attention, an f16 KV cache; the batch is big enough for the whole prompt in one `llama_decode`.

- prefill: the KV cache cleared, the 286-token batch decoded, the last position's logits read (the others are
  not computed, as minisail's prefill and transformers' `logits_to_keep=1`).
- generate: prefill, then one token at a time, each the argmax of the previous logits (greedy, as the others).
"""

from __future__ import annotations

import ctypes
import sys
import time
from pathlib import Path

import numpy as np

from bench.presets import Preset


def llama_cpp_version() -> str | None:
    """llama-cpp-python's version where it is installed, else None (imports nothing)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama_cpp_python")
    except PackageNotFoundError:
        return None


def has_llama_cpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


GGML_LOG_LEVEL_ERROR = 4  # ggml.h's enum ggml_log_level (DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5)


def _print_errors(level: int, text: bytes, user_data) -> None:
    if level == GGML_LOG_LEVEL_ERROR:
        print(text.decode(errors="replace"), end="", file=sys.stderr, flush=True)


_only_errors = None  # the ctypes callback, made once and kept alive for the process (llama.cpp holds its pointer)


class LlamaCppModel:
    """One llama.cpp model and context: `decode(ids, start, all_logits)` -> logits [rows, vocab] (float32)."""

    def __init__(self, path: Path, *, threads: int, context: int, batch: int, kv_f32: bool = False):
        import llama_cpp as lc

        global _only_errors
        if _only_errors is None:
            _only_errors = lc.llama_log_callback(_print_errors)
        self.lc = lc
        lc.llama_log_set(_only_errors, ctypes.c_void_p(0))  # llama.cpp's load chatter off stderr
        lc.llama_backend_init()
        self.model = lc.llama_model_load_from_file(str(path).encode(), lc.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        params = lc.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = context, batch, batch
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        if kv_f32:  # the correctness test: a float32 KV cache, so only the arithmetic's order differs
            params.type_k = params.type_v = lc.GGML_TYPE_F32
            params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.context = lc.llama_init_from_model(self.model, params)
        if not self.context:
            raise RuntimeError("llama.cpp could not create a context")
        self.vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch_size = batch
        self.batch = lc.llama_batch_init(batch, 0, 1)

    def clear(self) -> None:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.context), True)

    def decode(self, ids: list[int], start: int, all_logits: bool = False) -> np.ndarray:
        """Run `ids` at positions start, start+1, ...; the logits of the last one (or of all) [rows, vocab]."""
        if len(ids) > self.batch_size:
            raise ValueError(f"{len(ids)} tokens do not fit llama.cpp's batch of {self.batch_size}")
        batch = self.batch
        batch.n_tokens = len(ids)
        for i, token in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = int(token), start + i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = all_logits or i == len(ids) - 1
        status = self.lc.llama_decode(self.context, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")
        rows = len(ids) if all_logits else 1
        pointer = self.lc.llama_get_logits(self.context)
        return np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), (rows, self.vocab)).copy()

    def close(self) -> None:
        lc = self.lc
        if getattr(self, "batch", None) is not None:
            lc.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "context", None):
            lc.llama_free(self.context)
            self.context = None
        if getattr(self, "model", None):
            lc.llama_model_free(self.model)
            self.model = None


class LlamaCppRunner:
    """The benchmark worker's llama.cpp runner (worker.py): prefill and generate, no vision."""

    def __init__(self, preset: Preset, folder: Path, threads: int, context: int = 512):
        self.preset, self.path = preset, Path(folder) / "model.gguf"
        self.model = LlamaCppModel(self.path, threads=threads, context=context, batch=context)
        # the CPU features llama.cpp was built for and uses (GGML_NATIVE builds: this machine's)
        self.load_details = {"system_info": self.model.lc.llama_print_system_info().decode(errors="replace").strip()}

    def weight_bytes(self) -> int:
        return self.path.stat().st_size

    def setup(self, pixels, ids):
        self.ids = [int(i) for i in ids[0]]

    def prefill(self) -> int:
        self.model.clear()
        return int(self.model.decode(self.ids, 0)[-1].argmax())

    def generate(self, tokens: int) -> list[float]:
        """Seconds from the call to each new token (the first includes the prefill)."""
        start, times = time.perf_counter(), []
        token = self.prefill()
        times.append(time.perf_counter() - start)
        for step in range(1, tokens):
            token = int(self.model.decode([token], len(self.ids) + step - 1)[-1].argmax())
            times.append(time.perf_counter() - start)
        return times
