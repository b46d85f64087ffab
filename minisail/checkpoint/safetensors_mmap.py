"""Zero-copy reading of a .safetensors file: every tensor is a view into one memory map of the file.

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length n, then n bytes
of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data, with
offsets relative to the end of the header. Mapping the file privately (copy-on-write) means a model whose
parameters are these views costs no second copy in RAM: pages are read from disk when first touched.

The header is untrusted input: `read_header` accepts exactly the files the reference `safetensors` library
loads (its rules, and why each is there, are in safetensors_header.py), so every tensor lies inside the data
section, owns its bytes alone and has a shape torch can hold. Every refusal (short file, bad header, offsets
that overlap or leave gaps, a size that does not match the shape) is a `CheckpointError` naming the file and
the tensor, so a truncated download is reported as one.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from minisail.checkpoint.safetensors_header import parse_header
from minisail.errors import CheckpointError
from minisail.fast.memory import release_pages

FOLIO = 2 << 20  # the largest page-cache folio a mapped read brings in (Linux 6.x, x86-64): what `release` spans


def read_header(path: Path) -> tuple[dict, int]:
    """{name: (dtype, shape, begin, end)} (absolute byte offsets) of a safetensors file, and where its data begins.

    Validated by the reference library's rules (safetensors_header.py): a file this accepts is one
    `safetensors.safe_open` loads, and the other way round."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            return parse_header(path, f.read(8), size, f.read)
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error}") from error


class SafetensorsFile:
    """One .safetensors file: its tensor table, zero-copy views into a memory map, or fresh copies read from disk.

    `view(name)` shares memory with the (privately mapped) file: the parameter a tensor taken as it is becomes,
    and the source of a conversion or a join, after which `release(name)` gives its pages back, so converting
    a model costs one tensor's worth of extra memory and no second read into memory of its own.
    `read(name)` reads the bytes into new memory (small tensors, scales).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.entries: dict[str, tuple[torch.dtype, list[int], int, int]]
        self.entries, self.data_start = read_header(self.path)
        self.file_size = os.path.getsize(self.path)
        self._bytes = None  # the whole file as a uint8 tensor over a private memory map, made on first view()

    def view(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[name]
        if self._bytes is None:
            storage = torch.UntypedStorage.from_file(str(self.path), shared=False, nbytes=self.file_size)
            self._bytes = torch.empty(0, dtype=torch.uint8).set_(storage)
        raw = self._bytes[begin:end]
        if begin % dtype.itemsize:  # misaligned (an unusual writer): copy instead of viewing
            raw = raw.clone()
        return raw.view(dtype).reshape(shape)

    def release(self, name: str) -> None:
        """Give back the resident pages of tensor `name` in the memory map (after converting, joining or copying a
        view: the process keeps only the result), with those of the 2 MiB-aligned span of the file around it:
        reading a mapped byte maps the page cache's whole folio around it (up to FOLIO), neighbours included.
        Safe for any byte of this mapping, which is private and never written: what is read again comes back
        from the file (a neighbour still in use, an embedding table say, is simply read again)."""
        if self._bytes is not None:
            _, _, begin, end = self.entries[name]
            begin, end = begin // FOLIO * FOLIO, min(-(-end // FOLIO) * FOLIO, self.file_size)  # file offsets
            release_pages(self._bytes.data_ptr() + begin, end - begin)

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[name]
        buffer = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(begin)
            if f.readinto(buffer) != end - begin:
                raise CheckpointError(f"{self.path}: short read of tensor {name!r}; the file changed or is truncated")
        if not buffer:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).reshape(shape)
