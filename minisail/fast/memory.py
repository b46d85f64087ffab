"""Giving back the pages of a memory-mapped checkpoint once the process no longer needs them.

`minisail.load` reads weights through zero-copy views into privately mapped files (checkpoint/safetensors_mmap.py).
A view that is converted (cast, joined, quantised, packed) faults its pages in, and they would stay resident, and
counted against the process, next to the converted copy for as long as the file is mapped. So once a value is
made from them, their whole pages are dropped from the resident set with `madvise(MADV_DONTNEED)`: for a private
file mapping that was never written, the pages stay in the OS page cache and the file's own contents come back if
anything reads them again. Never for written or anonymous memory, where it would discard data.

Two callers: `SafetensorsFile.release` (a tensor's byte range in its mapping, after the loader converted it:
`ReleasePages` below decides when) and `release_mapped_pages` (a weight that is itself a view, after packing it).

Also here: `scratch_buffer`, the one reused buffer per (device, dtype) and thread into which the blocked float paths
(fast/int8.py, int4.py, upcast.py) convert a block of weight rows, so no call allocates (or faults in) fresh memory.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys
import threading

import torch

from minisail.checkpoint.hooks import LoadHook, Parts, shares_memory

PAGE = mmap.PAGESIZE
MADV_DONTNEED = 4  # Linux


@functools.cache
def libc():
    """The C library this process runs on (Linux: glibc or musl), through ctypes."""
    return ctypes.CDLL(None, use_errno=True)


def trim_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc's `malloc_trim`; elsewhere nothing). A freed tensor of
    up to 32 MB may sit in the heap, where freeing it does not shrink the resident set: measured loading SAIL-VL-2B
    in int8, 0.3 GB stayed resident when its weights moved into huge pages, and 0.31 GB of the peak when its int8
    weights were swapped for oneDNN's packed copies, without this (fast/huge_pages.py, fast/int8_dot.py)."""
    trim = getattr(libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.cache
def madvise():
    """libc's madvise(address, length, advice) -> 0, or -1 with errno set (fast/huge_pages.py uses it too)."""
    function = libc().madvise
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return function


def release_pages(address: int, nbytes: int) -> None:
    """madvise(MADV_DONTNEED) the whole pages inside [address, address + nbytes) of a private, never written
    file mapping: they leave this process's resident set (they stay in the OS page cache). Linux only; a no-op
    elsewhere. Never call it on memory that was written: for anonymous or written pages it discards data."""
    if not sys.platform.startswith("linux"):
        return
    start, end = -(-address // PAGE) * PAGE, (address + nbytes) // PAGE * PAGE
    if end > start:
        madvise()(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)


def file_backing(address: int) -> tuple[str, int] | None:
    """(path, offset in the file) of the private file mapping holding `address`, from /proc/self/maps (Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                start, end = (int(a, 16) for a in fields[0].split("-"))
                if start <= address < end:
                    path = fields[5].strip() if len(fields) == 6 else ""
                    private = fields[1].endswith("p")
                    return (path, int(fields[2], 16) + address - start) if path.startswith("/") and private else None
    except (OSError, ValueError, IndexError):
        return None
    return None


def release_mapped_pages(weight: torch.Tensor) -> None:
    """Drop the pages of a weight that is a view into a privately mapped checkpoint file from this process's
    resident set. Only whole pages inside the weight's own bytes, and only for a private file mapping
    (/proc/self/maps), whose pages minisail never writes: no other memory is ever affected."""
    if sys.platform.startswith("linux") and file_backing(weight.data_ptr()) is not None:
        release_pages(weight.data_ptr(), weight.numel() * weight.element_size())


SMALL_VIEW_BYTES = 1 << 20  # a zero-copy view below this is copied out of the mapping at load (CopySmallViews)


class CopySmallViews(LoadHook):
    """Loader hook: a value that would stay a small zero-copy view into the files (a norm's weight, a bias) is
    copied into the process's own memory instead, and its mapped pages are given back (ReleasePages, next).

    Why: reading a mapped byte maps the page cache's whole folio around it, and on Linux 6.x file folios are up
    to 2 MiB, so each small view the model reads would keep ~2 MiB of its neighbours resident: checkpoint bytes
    nobody uses (official q/k/v before fusing, weights already packed). Measured on SAIL-VL-2B once every weight
    page had been read: 0.17 GB of them, ~2 MB beside each of ~80 small tensors. A copy costs the tensor's own
    bytes (under SMALL_VIEW_BYTES); large views (an embedding table) stay views."""

    def convert(self, parts: Parts, value: torch.Tensor) -> torch.Tensor:
        small = value.numel() * value.element_size() < SMALL_VIEW_BYTES
        if parts.views and small and shares_memory(value, parts.tensors):
            return value.clone()
        return value


class ReleasePages(LoadHook):
    """Loader hook: once a value is made from views into the files and no longer shares them, give their pages
    back, so converting a model costs one tensor's worth of extra memory, not a second model."""

    def prepare(self, model, tensors) -> None:
        self.tensors = tensors

    def convert(self, parts: Parts, value: torch.Tensor) -> torch.Tensor:
        if parts.views and not shares_memory(value, parts.tensors):
            for key in parts.keys:
                self.tensors.release(key)
        return value


_per_thread = threading.local()


def thread_buffers(kind: str) -> dict:
    """This thread's reused buffers of one kind, {key: tensors}: a model run from two threads at once never writes
    into the other's buffers, and a thread's buffers go with it."""
    return _per_thread.__dict__.setdefault(kind, {})


def scratch_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reused 1-D buffer of at least `numel` elements per (device, dtype), shared by every blocked float path
    (one product at a time: a caller needing two at once asks for two dtypes). Grown, never shrunk. One set per
    thread: two models run from two threads never write into each other's products (freed with the thread)."""
    buffers = thread_buffers("scratch")
    buffer = buffers.get((device, dtype))
    if buffer is None or buffer.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor, writable both inside and outside inference mode
            buffer = buffers[(device, dtype)] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]
