"""Zero-copy reading of a .safetensors file: every tensor is a view into one memory map of the file.

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length n, then n bytes
of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data, with
offsets relative to the end of the header. Mapping the file privately (copy-on-write) means a model whose
parameters are these views costs no second copy in RAM: pages are read from disk when first touched.

Every inconsistency (short file, bad header, offsets past the end, a size that does not match the shape) is
a `CheckpointError` naming the file and the tensor, so a truncated download is reported as one.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import mmap
import os
import struct
import sys
from pathlib import Path

import torch

from minisail.errors import CheckpointError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file (without __metadata__) and the byte offset where data begins."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path} is {size} bytes, too short to be a safetensors file: download it again")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8 or header_len > 100_000_000:
                raise CheckpointError(
                    f"{path}: the header claims {header_len} bytes but the file has {size}: "
                    "the file is truncated or not a safetensors file; download it again"
                )
            header = json.loads(f.read(header_len))
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error}") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"{path}: the safetensors header is not valid JSON ({error}); the file is corrupt"
        ) from error
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object; the file is corrupt")
    header.pop("__metadata__", None)
    return header, 8 + header_len


PAGE = mmap.PAGESIZE
MADV_DONTNEED = 4  # Linux


@functools.cache
def _madvise():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


def release_pages(address: int, nbytes: int) -> None:
    """madvise(MADV_DONTNEED) the whole pages inside [address, address + nbytes) of a private, never written
    file mapping: they leave this process's resident set (they stay in the OS page cache). Linux only; a no-op
    elsewhere. Never call it on memory that was written: for anonymous or written pages it discards data."""
    if not sys.platform.startswith("linux"):
        return
    start, end = -(-address // PAGE) * PAGE, (address + nbytes) // PAGE * PAGE
    if end > start:
        _madvise()(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)


class SafetensorsFile:
    """One .safetensors file: its tensor table, zero-copy views into a memory map, or fresh copies read from disk.

    `view(name)` shares memory with the (privately mapped) file: the parameter a tensor taken as it is becomes,
    and the source of a conversion or a join, after which `release(name)` gives its pages back, so converting
    a model costs one tensor's worth of extra memory and no second read into memory of its own.
    `read(name)` reads the bytes into new memory (small tensors, scales).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        header, self.data_start = read_header(self.path)
        self.file_size = os.path.getsize(self.path)
        self.entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = [int(d) for d in info["shape"]]
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as error:
                raise CheckpointError(f"{self.path}: tensor {name!r} has a malformed header entry {info!r}") from error
            nbytes = math.prod(shape) * dtype.itemsize
            if end - begin != nbytes or begin < 0:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} spans {end - begin} bytes, its shape {shape} needs {nbytes}"
                )
            if self.data_start + end > self.file_size:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} ends at byte {self.data_start + end} but the file has "
                    f"{self.file_size} bytes: the file is truncated; download it again"
                )
            self.entries[name] = (dtype, shape, self.data_start + begin, self.data_start + end)
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
        """Give back the resident pages of tensor `name` in the memory map (after converting or joining a view:
        the process keeps only the result). Whole pages inside the tensor's own bytes only; the file's contents
        come back if the view is read again (the mapping is private and never written)."""
        if self._bytes is not None:
            _, _, begin, end = self.entries[name]
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
