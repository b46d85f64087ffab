"""Huge pages for PyTorch's own large CPU allocations, asked for before torch is imported.

A decode step streams every weight of the language model once. Weights that minisail loads itself go into 2 MiB
transparent huge pages (fast/huge_pages.py), but oneDNN's packed copies (fast/packing.py's bf16 weights,
fast/int8_dot.py's int8 ones) are allocated inside the kernels' libraries, through PyTorch's CPU allocator, in
4 KiB pages. PyTorch's allocator can align allocations of 2 MiB and more to 2 MiB and advise them for huge pages
(`madvise(MADV_HUGEPAGE)`) when the environment variable THP_MEM_ALLOC_ENABLE=1 is set, but it reads the variable
once, at its first allocation, i.e. while torch is imported. Measured on a Zen 5 (2 threads): oneDNN's packed bf16
17920x1536 one-row product streams 41.6-44.3 GB/s from such pages against 37.2-40.2 from 4 KiB ones; whole bf16
decode steps alternating with and without, three pairs on a noisy host, were 1.09-1.46x faster with.

So `minisail/__init__.py` calls `ask_torch_for_huge_pages()` before anything imports torch: it sets
THP_MEM_ALLOC_ENABLE=1 for this process (and the processes it starts) when all of these hold:
- torch is not imported yet (else the allocator has read the variable already: nothing to gain by setting it);
- the user has not set THP_MEM_ALLOC_ENABLE (any value: theirs wins; 0 turns this off);
- Linux with transparent huge pages not set to "never" (else torch warns at every large allocation).
This is a process-wide allocator policy (every CPU tensor of 2 MiB or more, the user's own included, starts on a
2 MiB boundary, in huge pages where the kernel has them): the same bytes and numbers, only where they live. A
program that imports torch before minisail can set the variable itself. No torch import here, on purpose.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

VARIABLE = "THP_MEM_ALLOC_ENABLE"
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")

decision = "not asked yet"  # what ask_torch_for_huge_pages decided, in words (the benchmark reports it)


def ask_torch_for_huge_pages() -> str:
    """Set THP_MEM_ALLOC_ENABLE=1 where it helps and is ours to set (module docstring); return why or why not."""
    global decision
    if VARIABLE in os.environ:
        decision = f"{VARIABLE}={os.environ[VARIABLE]} already set (by the user, or a parent minisail process)"
    elif "torch" in sys.modules:
        decision = f"torch was imported before minisail: its allocator has read {VARIABLE} already (unset)"
    elif not sys.platform.startswith("linux"):
        decision = "transparent huge pages are a Linux feature"
    else:
        try:
            setting = THP_SETTING.read_text()
        except OSError:
            setting = "[never]"  # no THP in this kernel
        if "[never]" in setting:
            decision = "transparent huge pages are off here: torch's allocator left as it is"
        else:
            os.environ[VARIABLE] = "1"
            decision = f"{VARIABLE}=1: torch's large CPU allocations in huge pages (set before torch was imported)"
    return decision
