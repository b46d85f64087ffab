"""`python -m bench`: speed and memory at a released model's real shapes, against transformers.

    python -m bench --preset sail-vl-2b            # full run: 3 cold loads, 5/3 repeats, 64 tokens
    python -m bench --quick                        # CI: 1 load, fewer repeats, 16 tokens (< 3 min)

Run from the repository root. This package is not installed with minisail (pyproject includes only minisail*):
it compares with `transformers`, which nothing under minisail/ imports. Its worker processes are started as
`python -m bench.worker` with the repository root on PYTHONPATH (processes.py), so a clean clone needs no install
of its own.

What it does (issue 9):
1. builds the preset's model (presets.py) with seeded random weights and writes it once, bf16 and sharded, in
   the official layout (and, with transformers installed, renamed to its native names by hf_names.py's table)
   in a cache folder (checkpoints.py);
2. measures this machine's weight-streaming bandwidth and the decode roofline it implies (machine.py);
3. per dtype (fp32, bf16, int8 and int4 weight-only), starts one process per framework (worker.py; transformers'
   side in hf_side.py; llama.cpp's, on a GGUF of the same weights, in llama_side.py) and records: cold load time
   and peak RSS, vision encoding of 1 and 7 tiles, prefill of 256 image + 30 text tokens, time to first token
   and decode tokens/s, interleaved, as medians (runner.py);
4. prints a table (report.py), then one JSON line: {"preset", "machine", "roofline_decode_tok_s",
   "results": {dtype: {"minisail": {...}, "transformers": {...}}}, "ratios", "targets", "notes", "settings"}.
"""

from __future__ import annotations

from bench.presets import PRESETS, get_preset
from bench.runner import Settings, run_bench

__all__ = ["PRESETS", "Settings", "get_preset", "run_bench"]
