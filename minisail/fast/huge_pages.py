"""Moving the language model's weights into transparent huge pages (Linux), so a decode step streams them faster.

A decode step reads every weight of the language model once, start to end: about 3 GB for SAIL-VL-2B in bf16.
With 4 KiB pages that is some 750 000 pages a step, each needing its own TLB entry, and the CPU's hardware
prefetchers stop at every 4 KiB boundary; a 2 MiB page is one entry and one unbroken stream. Measured on an Intel
Xeon with AMX, 2 threads, 30 interleaved passes over the same weights in both kinds of page: bf16 `torch.mv` on
17920x1536 (SAIL-VL-2B's gate_up) 1.08x faster from 2 MiB pages, int8 `_weight_int8pack_mm` 1.06-1.07x.

Linux usually runs transparent huge pages (THP) in "madvise" mode: anonymous memory gets 2 MiB pages only where
the process asked for them (`madvise(MADV_HUGEPAGE)`) before first touching it. The weights as loaded live in
4 KiB pages: views into the memory-mapped checkpoint, or tensors the loader allocated. So `to_huge_pages(module)`
copies each large weight into fresh memory aligned to 2 MiB and advised, then lets the old one go (a view into
the checkpoint gives its pages back, fast/memory.py's `release_mapped_pages`): one matrix of extra memory at a
time, as packing. Same bytes, so the same numbers; only where they live changes.

Where THP is off ("never"), on other systems, or if madvise refuses, nothing is moved. Whether the kernel really
backed the memory with huge pages (it may not find free 2 MiB blocks) is its decision: `huge_page_bytes()` reads
what this process got (/proc/self/smaps_rollup), which the benchmark reports.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from pathlib import Path

import torch
from torch import nn

from minisail.fast.memory import madvise, release_mapped_pages, trim_heap

HUGE_PAGE = 2 << 20  # x86-64's transparent huge page
MADV_HUGEPAGE = 14  # Linux
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@functools.cache
def huge_pages_support() -> tuple[bool, str]:
    """(whether weights can be moved into transparent huge pages here, why or why not, in words for a log)."""
    if not sys.platform.startswith("linux"):
        return False, "transparent huge pages are a Linux feature"
    try:
        setting = THP_SETTING.read_text()
    except OSError:
        return False, f"this kernel has no transparent huge pages ({THP_SETTING} unreadable)"
    if "[never]" in setting:
        return False, "transparent huge pages are off on this machine ([never])"
    return True, f"transparent huge pages: {setting.strip()}"


def huge_page_empty(like: torch.Tensor) -> torch.Tensor | None:
    """An uninitialised CPU tensor of `like`'s shape and dtype whose bytes start on a 2 MiB boundary, advised for
    huge pages before anything touches them; None where madvise refuses. The allocation has HUGE_PAGE bytes of
    slack for the alignment, never touched, so never resident."""
    nbytes = like.numel() * like.element_size()
    base = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    offset = -base.data_ptr() % HUGE_PAGE
    region = base[offset : offset + nbytes]  # starts on a 2 MiB boundary
    advised = nbytes // HUGE_PAGE * HUGE_PAGE  # whole huge pages only; the tail stays in small pages
    if madvise()(ctypes.c_void_p(region.data_ptr()), ctypes.c_size_t(advised), MADV_HUGEPAGE) != 0:
        return None
    return region.view(like.dtype).view(like.shape)


def to_huge_pages(module: nn.Module, min_bytes: int = 2 * HUGE_PAGE) -> int:
    """Move every CPU parameter and buffer of `module` of at least `min_bytes` into huge-page memory (module
    docstring); return the bytes moved. A tensor shared by several modules (a tied head) stays shared. Left where
    they are: embedding tables that are not also a head (a step reads one row of them; most of the table was never
    read, so never resident, and copying it would make all of it resident), packed oneDNN weights (no storage of
    their own) and tensors on other devices. Freed memory is handed back to the OS (`malloc_trim`)."""
    if not huge_pages_support()[0]:
        return 0
    slots: dict[int, list[tuple[dict, str]]] = {}  # id of a tensor -> every (table, name) holding it
    streamed: set[int] = set()  # ids of tensors some module other than an embedding holds
    for submodule in module.modules():
        for table in (submodule._parameters, submodule._buffers):
            for name, tensor in table.items():
                if tensor is not None and _movable(tensor, min_bytes):
                    slots.setdefault(id(tensor), []).append((table, name))
                    if not isinstance(submodule, nn.Embedding):
                        streamed.add(id(tensor))
    total = 0
    for key, places in slots.items():  # ids were taken while every tensor was alive; from here on, tables only
        if key not in streamed:
            continue
        table, name = places[0]
        old = table[name]
        fresh = huge_page_empty(old)
        if fresh is None:
            continue
        copy_releasing(fresh, old)
        new = nn.Parameter(fresh, requires_grad=False) if isinstance(old, nn.Parameter) else fresh
        new.minisail_huge_pages = True  # moved already: a second call (speed_up_on_cpu again) leaves it
        for table, name in places:
            table[name] = new
        total += old.numel() * old.element_size()
        del old  # the last reference
        trim_heap()  # before the next, larger allocation: a freed heap chunk would stay resident meanwhile
    return total


COPY_CHUNK = 32 << 20  # bytes copied between two releases of the source's mapped pages


def copy_releasing(fresh: torch.Tensor, old: torch.Tensor) -> None:
    """fresh <- old, a chunk at a time; where `old` is a view into the memory-mapped checkpoint, each chunk's
    pages are given back as soon as they are copied, so moving a 0.5 GB head does not hold it twice."""
    with torch.inference_mode(False), torch.no_grad():
        if not old.is_contiguous():
            fresh.copy_(old)
            release_mapped_pages(old)
            return
        source, target = old.reshape(-1), fresh.view(-1)
        step = max(1, COPY_CHUNK // old.element_size())
        for start in range(0, source.numel(), step):
            target[start : start + step].copy_(source[start : start + step])
            release_mapped_pages(source[start : start + step])


def _movable(tensor: torch.Tensor, min_bytes: int) -> bool:
    if getattr(tensor, "minisail_huge_pages", False):
        return False
    return tensor.device.type == "cpu" and not tensor.is_mkldnn and tensor.numel() * tensor.element_size() >= min_bytes


def huge_page_bytes() -> int | None:
    """Bytes of this process's anonymous memory the kernel backs with huge pages (AnonHugePages), or None."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
