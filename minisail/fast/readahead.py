"""Read a checkpoint's files into the OS page cache in the background while the model is being filled.

A cold load (the files not yet in the page cache) is bound by the disk. The loader touches the files in the
order of the model's parameters and, for zero-copy views, only when a weight is first used, so the disk sees
scattered reads and page faults instead of one stream. `ReadAhead` reads every file front to back in a
background thread (plain `read` calls, which release the GIL), so the disk streams at its full rate while the
loader converts, joins and checks tensors; whatever the loader or the first forward pass reads next is then
served from memory.

It only warms the page cache (the OS may drop those pages again; nothing is added to the process's own
memory but one 16 MiB buffer) and runs only when the files fit comfortably in the memory the OS reports as
available, so a checkpoint larger than RAM is never read twice. The thread stops at the end of the files, on
`stop()`, or on the first read error (the loader reports errors itself).

`BackgroundReadAhead` is the loader hook: it starts the reader before the first tensor is read, stops it if the
fill fails or the model keeps no zero-copy view into the files (nothing left to read ahead for), and otherwise
lets it run on, so the views' pages are in memory when first used. A tensor-parallel rank, which reads only its
own slices of the files, gets no read-ahead.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from minisail.checkpoint.hooks import LoadHook, Parts, shares_memory
from minisail.system import available_memory_bytes

CHUNK = 16 << 20


class ReadAhead:
    """`ReadAhead(paths)` starts reading `paths` in a daemon thread (when they fit in half the available memory);
    `stop()` ends it early; `wait()` blocks until it is done. `active` says whether it runs at all."""

    def __init__(self, paths: list[Path], *, share_of_available: float = 0.5):
        self.paths = [Path(p) for p in paths]
        self._stop = threading.Event()
        self.thread: threading.Thread | None = None
        available = available_memory_bytes()
        try:
            total = sum(os.path.getsize(p) for p in self.paths)
        except OSError:
            return
        if not self.paths or available is None or total > share_of_available * available:
            return
        self.thread = threading.Thread(target=self._read_all, name="minisail-readahead", daemon=True)
        self.thread.start()

    @property
    def active(self) -> bool:
        return self.thread is not None

    def _read_all(self) -> None:
        buffer = bytearray(CHUNK)
        try:
            for path in self.paths:
                with open(path, "rb", buffering=0) as f:
                    while not self._stop.is_set() and f.readinto(buffer):
                        pass
        except OSError:
            return  # a page-cache warm-up only: the loader's own reads report any problem with the file

    def stop(self) -> None:
        self._stop.set()
        self.wait()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()


class BackgroundReadAhead(LoadHook):
    """Loader hook: a `ReadAhead` over the checkpoint's files for as long as it helps (see the module docstring)."""

    def prepare(self, model, tensors) -> None:
        # A tensor-parallel rank reads only the pages its slices touch (parallel/plan.py; column slices touch most
        # pages: measured 78% of the files at tp=2), not every file whole
        whole_files = getattr(tensors, "reads_whole_files", True)
        self.reader = ReadAhead(tensors.paths() if whole_files else [])
        self.views = 0  # parameters that stay zero-copy views into the files

    def convert(self, parts: Parts, value: torch.Tensor) -> torch.Tensor:
        self.views += parts.views and shares_memory(value, parts.tensors)
        return value

    def after(self, ok: bool) -> None:
        if not ok or not self.views:
            self.reader.stop()
