"""The benchmark's worker processes as the conductor sees them: starting one, asking it, and how it died.

Each worker is `python -m bench.worker SPEC` (worker.py), a fresh process holding one model, spoken to one JSON
line at a time. A worker that stops without answering raises `WorkerDied`, which says how it stopped: the exit
status, the signal by name when the status is negative (Popen's convention: -4 is SIGILL), and a hint where the
cause is known (SIGKILL: the kernel's out-of-memory killer; SIGILL in llama.cpp: a native build whose AMX kernels
this CPU rejects). runner.py decides what a death means: a peer's (transformers, llama.cpp) is recorded and the
run goes on without it; minisail's own stops the run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from bench.checkpoints import evict_page_cache, log
from minisail.errors import MinisailError

REPOSITORY = Path(__file__).resolve().parent.parent  # the checkout holding bench/ (not installed)
LLAMA = "llama.cpp"
# README "Comparing with llama.cpp": llama-cpp-python rebuilt for AVX-512 (BF16, VNNI) without its native AMX kernels
LLAMA_REBUILD = (
    'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON '
    "-DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON "
    '-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" '
    "pip install --force-reinstall --no-cache-dir --no-deps llama-cpp-python"
)


def exit_reason(code: int, framework: str) -> str:
    """How a worker stopped, for people and the JSON: 'stopped with exit status -4 (SIGILL: illegal instruction;
    <hint>)'. A negative status is the signal that ended the process; 137 is a shell's way of saying SIGKILL."""
    details = []
    if code < 0:
        try:
            details.append(f"{signal.Signals(-code).name}: {(signal.strsignal(-code) or 'unknown signal').lower()}")
        except ValueError:
            details.append(f"signal {-code}")
    if code in (-signal.SIGKILL, 128 + signal.SIGKILL):
        details.append("most likely the kernel's out-of-memory killer")
    elif code == -signal.SIGILL and framework == LLAMA:
        details.append(
            "llama-cpp-python runs an instruction this CPU rejects (a GGML_NATIVE build's AMX kernels do on some "
            "AMX CPUs): rebuild it without native AMX, README 'Comparing with llama.cpp'"
        )
    return f"stopped with exit status {code}" + (f" ({'; '.join(details)})" if details else "")


class WorkerDied(MinisailError):
    """A benchmark worker stopped without answering: `name` ('int8 llama.cpp'), `framework`, exit `code`, and
    `reason` (exit_reason's text)."""

    def __init__(self, name: str, framework: str, code: int):
        self.name, self.framework, self.code = name, framework, code
        self.reason = exit_reason(code, framework)
        super().__init__(f"the {name} benchmark worker {self.reason}")


def worker_environment(framework: str = "minisail") -> dict[str, str]:
    """This environment with the repository root first on PYTHONPATH, so `python -m bench.worker` finds this
    bench/ whatever the current directory is (relative --cache paths stay relative to the caller's). A peer does
    not inherit the allocator setting minisail made in this process (minisail/allocator.py): it runs as its users
    run it; a setting the user made is passed on to every worker."""
    from minisail import allocator

    path = [str(REPOSITORY), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    if framework != "minisail" and allocator.decision.startswith(f"{allocator.VARIABLE}=1:"):
        environment.pop(allocator.VARIABLE, None)
    return environment


def worker_command(spec: dict) -> list[str]:
    """The command line of one worker (tests replace it with a process that dies)."""
    return [sys.executable, "-m", "bench.worker", json.dumps(spec)]


class Worker:
    """A worker process (worker.py) holding one model; `request(op)` sends one command and returns its answer.
    Starting it reads its load report, so a worker that dies while loading raises `WorkerDied` here."""

    def __init__(self, spec: dict):
        self.spec, self.framework = spec, spec["framework"]
        self.name = f"{spec['dtype']} {self.framework}"
        self.process = subprocess.Popen(
            worker_command(spec),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=worker_environment(self.framework),
        )
        self.load = self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise WorkerDied(self.name, self.framework, self.process.wait())
        return json.loads(line)

    def request(self, **command) -> dict:
        try:
            self.process.stdin.write(json.dumps(command) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError):  # it died between two commands (ValueError: the pipe is closed)
            raise WorkerDied(self.name, self.framework, self.process.wait()) from None
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
        for pipe in (self.process.stdin, self.process.stdout):
            try:
                pipe.close()
            except BrokenPipeError:  # unflushed input for a process that is gone
                pass


def start_worker(spec: dict, folder: Path) -> Worker:
    """A worker on `folder`, loaded cold (the folder's pages dropped from the page cache first)."""
    evict_page_cache(folder)
    worker = Worker(spec)
    load = worker.load
    log(
        f"{worker.name}: loaded in {load['load_s']:.2f} s, peak RSS {load['peak_rss_gb']:.2f} GB "
        f"({load['weights_gb']:.2f} GB of weights)"
    )
    return worker


def record_peer_death(died: WorkerDied, failures: dict[str, str]) -> None:
    """A peer's death goes into `failures` ({worker name: reason}) and the log; minisail's own is re-raised."""
    if died.framework == "minisail":
        raise died
    failures[died.name] = died.reason
    log(f"{died.name} died, the run goes on without it: {died.reason}")
    if died.framework == LLAMA and died.code == -signal.SIGILL:
        log(f"to rebuild llama-cpp-python without native AMX: {LLAMA_REBUILD}")
