"""Starting, checking and ending the torch.distributed process group that the `--tp` / data-parallel commands run in.

`torchrun --nproc-per-node N -m minisail parity CASE ... --tp N` starts N copies of the command, each with
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in its environment (across hosts: torchrun's usual
`--nnodes`, `--node-rank`, `--rdzv-endpoint` flags). `start` joins them into one process group:

- gloo on the CPU; NCCL when the device is a CUDA GPU (each rank on cuda:LOCAL_RANK). The code is
  device-agnostic, but the NCCL path has not been run: this project is tested on CPUs only;
- a timeout on joining and on every collective of the work (default 300 s, `MINISAIL_DIST_TIMEOUT` seconds in
  the environment): a rank that died or never came makes the others stop with a `ParallelError` that says so,
  instead of waiting forever. Two waits are not failures and run in a second group without that bound
  (`waiting_group`, IDLE_TIMEOUT): the other ranks waiting while rank 0 waits for the user's next line in an
  interactive chat, and a rank that finished its data-parallel share waiting for the others' results. A rank
  that dies during them still ends the wait at once (its connections close);
- rank 0 prints; the other ranks' standard output goes to /dev/null (their errors still reach stderr, prefixed
  with their rank by the CLI).
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from minisail.errors import ParallelError

DEFAULT_TIMEOUT_SECONDS = 300.0
IDLE_TIMEOUT = timedelta(days=7)  # waiting for a person or for other ranks' work, not for a failure

_waiting_group = None  # the second process group (waiting_group), made by `start`


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
    global _waiting_group
    _waiting_group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)  # every rank makes it, in the same order
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (kept open for the life of the process)
    return True


def waiting_group():
    """The group for waits that are not failures (module docstring): gloo, IDLE_TIMEOUT. The default group when
    the process group was made elsewhere (a user's own init_process_group)."""
    return _waiting_group


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
    global _waiting_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # every group, the waiting one included
        _waiting_group = None
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
    """A line of standard input, read by rank 0 and sent to every rank (all ranks must ask the same questions)."""
    stream = stream or sys.stdin
    if world_size() == 1:
        return stream.readline()
    box = [stream.readline() if rank() == 0 else None]
    with collective():
        dist.broadcast_object_list(box, src=0, group=waiting_group())  # a person may take longer than the timeout
    return box[0]


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
