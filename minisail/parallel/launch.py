"""Starting, checking and ending the torch.distributed process group that the `--tp` / data-parallel commands run in.

`torchrun --nproc-per-node N -m minisail parity CASE ... --tp N` starts N copies of the command, each with
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in its environment (across hosts: torchrun's usual
`--nnodes`, `--node-rank`, `--rdzv-endpoint` flags). `start` joins them into one process group:

- gloo on the CPU; NCCL when the device is a CUDA GPU (each rank on cuda:LOCAL_RANK). The code is
  device-agnostic, but the NCCL path has not been run: this project is tested on CPUs only;
- a timeout on joining and on every collective (default 300 s, `MINISAIL_DIST_TIMEOUT` seconds in the
  environment): a rank that died, hung or never came makes the others stop with a `ParallelError` that says so,
  instead of waiting forever. Waiting for a person is not a failure: while rank 0 waits for an interactive
  chat's next line it tells the other ranks "not yet" every third of the timeout (`read_line`), so a user may
  take as long as they like and a dead rank is still found within the timeout. A rank that finished its share of
  data-parallel work waits for the others within the timeout (raise it for shares that differ by more);
- rank 0 prints; the other ranks' standard output goes to /dev/null (their errors still reach stderr, prefixed
  with their rank by the CLI).
"""

from __future__ import annotations

import contextlib
import gc
import os
import queue
import sys
import threading
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist

from minisail.errors import ParallelError

DEFAULT_TIMEOUT_SECONDS = 300.0
NOT_YET = None  # what rank 0 broadcasts while its user has not typed the next line (read_line)


def world_size_from_env() -> int | None:
    """WORLD_SIZE as torchrun sets it, or None when this process was not started by a launcher."""
    value = os.environ.get("WORLD_SIZE")
    if value is None:
        return None
    try:
        size = int(value)
    except ValueError:
        raise ParallelError(f"WORLD_SIZE={value!r} in the environment is not a number") from None
    if size < 1:
        raise ParallelError(f"WORLD_SIZE={size} in the environment: it must be at least 1")
    return size


def timeout_seconds() -> float:
    value = os.environ.get("MINISAIL_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_SECONDS))
    try:
        seconds = float(value)
    except ValueError:
        raise ParallelError(f"MINISAIL_DIST_TIMEOUT={value!r} is not a number of seconds") from None
    if not seconds > 0:
        raise ParallelError(f"MINISAIL_DIST_TIMEOUT={value!r}: give a positive number of seconds")
    return seconds


def start(tp: int | None, device=None) -> bool:
    """Join torchrun's process group if this process is one of several; returns whether it did.

    `tp` (the `--tp` option): the tensor-parallel size, which must equal WORLD_SIZE; None: data parallel over
    whatever WORLD_SIZE is (1, or no launcher: nothing to join). Idempotent."""
    world = world_size_from_env()
    if tp is not None and tp < 1:
        raise ParallelError(f"--tp {tp}: give a number of ranks, at least 1")
    if tp is not None and tp > 1 and world is None:
        raise ParallelError(
            f"--tp {tp} needs {tp} processes: launch with `torchrun --nproc-per-node {tp} -m minisail ... --tp {tp}`"
        )
    if tp is not None and world is not None and world != tp:
        raise ParallelError(
            f"--tp {tp} but torchrun started {world} processes (WORLD_SIZE={world}): they must match; use "
            f"`torchrun --nproc-per-node {tp}` (tensor parallel over {tp}) or drop --tp (data parallel)"
        )
    if world is None or world == 1:
        return False
    if dist.is_initialized():
        return True
    use_nccl = device is not None and torch.device(device).type == "cuda"
    if use_nccl:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    seconds = timeout_seconds()
    try:
        dist.init_process_group("nccl" if use_nccl else "gloo", timeout=timedelta(seconds=seconds))
    except (RuntimeError, ValueError, dist.DistError) as error:
        raise ParallelError(
            f"rank {os.environ.get('RANK', '?')} of {world} could not join the process group within {seconds:g} s "
            f"(MASTER_ADDR={os.environ.get('MASTER_ADDR')}, MASTER_PORT={os.environ.get('MASTER_PORT')}): "
            f"{_first_line(error)}; did every rank start? (MINISAIL_DIST_TIMEOUT sets the timeout)"
        ) from None
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (kept open for the life of the process)
    return True


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def finish() -> None:
    """The end of a command that succeeded on this rank: wait for every rank before anyone leaves. Without it a
    rank that destroys the group while a peer's gloo threads still talk to it aborts ("terminate called")."""
    if dist.is_available() and dist.is_initialized():
        with collective():
            dist.barrier()


def stop() -> None:
    """Leave the process group (the end of a command, successful or not: call `finish` first on success)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()  # drop the group's last references now, not in the interpreter's teardown


@contextlib.contextmanager
def collective():
    """Around one call that talks to the other ranks: what it raises (gloo's RuntimeError when a peer closed its
    connection, a timeout) becomes a `ParallelError` saying another rank stopped. Only errors raised inside a
    collective are put on the peers: a rank's own error (a bad input, a bug) stays its own, with its traceback."""
    try:
        yield
    except (RuntimeError, dist.DistError) as error:
        if isinstance(error, ParallelError):
            raise
        raise ParallelError(
            f"a collective with the other ranks failed ({_first_line(error)}): "
            "another rank stopped (see its error above) or timed out (MINISAIL_DIST_TIMEOUT)"
        ) from None


@contextlib.contextmanager
def peers_failing():
    """Around a whole command: torch.distributed's own typed errors (DistError: network, store, backend) raised
    outside a `collective()` become a `ParallelError` too; any other error is this rank's and passes through."""
    try:
        yield
    except dist.DistError as error:
        if not dist.is_initialized():
            raise
        with collective():
            raise error


def read_line(stream=None) -> str:
    """A line of standard input, read by rank 0 and sent to every rank (all ranks must ask the same questions).

    A person may take longer than the timeout to type: rank 0 reads in a thread of its own and, each third of the
    timeout without a line, broadcasts NOT_YET, so the other ranks' wait is a series of short ones."""
    stream = stream or sys.stdin
    if world_size() == 1:
        return stream.readline()
    interval = timeout_seconds() / 3
    while True:
        box = [_next_line(stream, interval) if rank() == 0 else NOT_YET]
        with collective():
            dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], _ReadFailed):  # every rank stops with rank 0's reason
            raise ParallelError(f"rank 0 could not read standard input ({box[0].reason}): the chat reads UTF-8 text")
        if box[0] is not NOT_YET:
            return box[0]


class _ReadFailed(NamedTuple):
    reason: str


class _LineReader:
    """stream.readline() in a daemon thread, so that rank 0 can wait for a line with a time limit (select() on the
    file descriptor would miss lines already in Python's buffer). The thread reads ahead of the caller until the
    end of the input: lines typed during a turn wait in the queue, in order."""

    def __init__(self, stream):
        self.stream = stream  # held: the registry's key is its id
        self.lines: queue.Queue[str | _ReadFailed] = queue.Queue()
        threading.Thread(target=self._read, name="minisail-stdin", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                line = self.stream.readline()
            except Exception as error:  # e.g. bytes that are not UTF-8: said on every rank, not a silent hang
                self.lines.put(_ReadFailed(f"{type(error).__name__}: {error}"))
                return
            self.lines.put(line)
            if not line:  # end of input: "" is the last line
                return


_readers: dict[int, _LineReader] = {}


def _next_line(stream, seconds: float):
    """Rank 0's next line of `stream`, NOT_YET after `seconds` without one, or a _ReadFailed. At the end of the
    input (or a failure) the reader is retired: a later call starts over, as readline() would say "" again."""
    reader = _readers.get(id(stream))
    if reader is None or reader.stream is not stream:
        reader = _readers[id(stream)] = _LineReader(stream)
    try:
        line = reader.lines.get(timeout=seconds)
    except queue.Empty:
        return NOT_YET
    if line == "" or isinstance(line, _ReadFailed):
        del _readers[id(stream)]
    return line


def same_random_state() -> None:
    """Seed torch's default generator on every rank with one seed drawn by rank 0, so sampling without an
    explicit seed picks the same tokens on every rank (their logits are the same after each all-reduce)."""
    box = [int(torch.randint(0, 2**62, ()).item()) if rank() == 0 else None]
    if world_size() > 1:
        with collective():
            dist.broadcast_object_list(box, src=0)
    torch.manual_seed(box[0])


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
