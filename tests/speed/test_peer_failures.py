"""A peer that crashes does not lose the run: its figures are absent, the report says how it stopped, minisail goes on.

The peers here are fake worker processes that die the way llama-cpp-python 0.3.36 built with GGML_NATIVE died on an
AMX CPU (SIGILL in its AMX Q8_0 kernel), by replacing the worker's command line (bench/processes.py
`worker_command`) for one framework only; minisail's worker is the real one, on the tiny preset. They run on every
machine: no transformers or llama.cpp needed.
"""

from __future__ import annotations

import json
import signal
import sys

import pytest

from bench import processes, runner
from bench.__main__ import main
from bench.checkpoints import ensure_checkpoints
from bench.presets import get_preset
from bench.processes import LLAMA_REBUILD, exit_reason
from bench.runner import Settings, run_dtype

NO_CORE = "import resource; resource.setrlimit(resource.RLIMIT_CORE, (0, 0))"  # no core file from the signal
DIE_AT_ONCE = f"{NO_CORE}\nimport os, signal\nos.kill(os.getpid(), signal.SIGILL)"
LOAD_REPORT = {"load_s": 0.1, "peak_rss_gb": 0.1, "weights_gb": 0.1, "baseline_rss_gb": 0.1, "rss_gb": 0.1}
DIE_ON_FIRST_COMMAND = f"""{NO_CORE}
import json, os, signal, sys
print(json.dumps({LOAD_REPORT!r}), flush=True)
sys.stdin.readline()
os.kill(os.getpid(), signal.SIGILL)
"""


def dying(monkeypatch, framework: str, script: str) -> None:
    """`framework`'s workers run `script` instead of bench.worker; the others are real."""
    real = processes.worker_command
    fake = lambda spec: [sys.executable, "-c", script] if spec["framework"] == framework else real(spec)  # noqa: E731
    monkeypatch.setattr(processes, "worker_command", fake)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return ensure_checkpoints(get_preset("tiny"), tmp_path_factory.mktemp("cache"), transformers=False)["minisail"]


def test_exit_reasons_name_the_signal_and_hint_at_the_cause():
    illegal = exit_reason(-signal.SIGILL, "llama.cpp")
    assert illegal.startswith("stopped with exit status -4 (SIGILL: illegal instruction; ")
    assert "rebuild it without native AMX" in illegal and "README" in illegal
    assert exit_reason(-signal.SIGILL, "transformers") == "stopped with exit status -4 (SIGILL: illegal instruction)"
    assert "SIGSEGV: segmentation fault" in exit_reason(-signal.SIGSEGV, "llama.cpp")
    assert "out-of-memory" in exit_reason(-signal.SIGKILL, "transformers") and "SIGKILL" in exit_reason(-9, "x")
    assert "out-of-memory" in exit_reason(137, "minisail")  # a shell's 128 + SIGKILL
    assert exit_reason(1, "transformers") == "stopped with exit status 1"  # a Python error: its traceback on stderr
    assert exit_reason(-200, "transformers") == "stopped with exit status -200 (signal 200)"
    assert "-DGGML_NATIVE=OFF" in LLAMA_REBUILD and "-DGGML_AMX_INT8=OFF" in LLAMA_REBUILD


def test_a_peer_dying_while_loading_is_recorded_and_the_run_goes_on(tiny_folder, tmp_path, monkeypatch, capsys):
    """transformers' worker dies at once (SIGILL): the report has minisail's figures, the failure and no ratios."""
    monkeypatch.setattr(runner, "_has_transformers", lambda: True)
    folders = {"minisail": tiny_folder, "transformers": tmp_path}  # the fake never reads its folder
    monkeypatch.setattr(runner, "ensure_checkpoints", lambda *a, **k: folders)
    dying(monkeypatch, "transformers", DIE_AT_ONCE)
    argv = ["--preset", "tiny", "--quick", "--dtype", "bf16", "--no-llama", "--cache", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])
    assert report["peer_failures"] == {"bf16 transformers": exit_reason(-signal.SIGILL, "transformers")}
    assert set(report["results"]["bf16"]) == {"minisail"}
    assert report["results"]["bf16"]["minisail"]["decode_tok_s"] > 0
    assert report["ratios"] == {} and not any("transformers" in name for name in report["targets"])
    table = "\n".join(out[:-1])
    assert "bf16 transformers: its worker stopped with exit status -4 (SIGILL: illegal instruction)" in table


def test_a_peer_dying_mid_measurement_loses_only_its_own_figures(tiny_folder, tmp_path, monkeypatch, capsys):
    """llama.cpp's worker loads, then dies on its first command (a warm-up generation): minisail's measurements all
    go on, llama.cpp has no figures and no notes, and the failure carries the rebuild hint."""
    dying(monkeypatch, "llama.cpp", DIE_ON_FIRST_COMMAND)
    settings = Settings.quick(dtypes=("bf16",), load_repeats=2)  # a load-only round too, where the fake lives
    failures = {}
    folders = {"minisail": tiny_folder, "llama.cpp": tmp_path}
    results, notes = run_dtype(get_preset("tiny"), "bf16", folders, settings, 10**6, failures)
    assert failures == {"bf16 llama.cpp": exit_reason(-signal.SIGILL, "llama.cpp")}
    assert set(results) == {"minisail"} and all(results["minisail"][m] for m in ("load_s", "prefill_s", "ttft_s"))
    assert results["minisail"]["decode_tok_s"] > 0 and notes["minisail_decode_matmuls_ms"] > 0
    assert not any(key.startswith("llama.cpp") for key in notes) and notes["interleaved"] is None
    assert LLAMA_REBUILD in capsys.readouterr().err  # the command, in the log where the crash is seen


def test_minisails_own_worker_dying_stops_the_run(tiny_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "ensure_checkpoints", lambda *a, **k: {"minisail": tiny_folder})
    monkeypatch.setattr(runner, "streaming_bandwidth", lambda: 1e9)
    dying(monkeypatch, "minisail", DIE_AT_ONCE)
    argv = ["--preset", "tiny", "--quick", "--dtype", "bf16", "--no-transformers", "--cache", str(tmp_path)]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "bench: error: the bf16 minisail benchmark worker stopped with exit status -4 (SIGILL" in error
