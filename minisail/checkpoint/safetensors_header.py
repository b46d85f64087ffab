"""The header of a .safetensors file, validated by exactly the rules of the reference `safetensors` library.

A file is 8 bytes little-endian n, n bytes of UTF-8 JSON, then the data section. The reference (Rust crate
`safetensors`, `SafeTensors::read_metadata` and `Metadata::validate`, v0.8) accepts a file exactly when:
- n <= 100,000,000 and 8 + n <= the file's size; the n bytes are UTF-8 and one JSON value (serde_json: JSON
  whitespace around it, nesting <= 127, no NaN/Infinity, no lone surrogate; see strict_json.py);
- the value is an object. `__metadata__` (at most once) is null or an object of strings. Every other key is a
  tensor whose value is an object with `dtype`, `shape`, `data_offsets` (each at most once; other fields are
  ignored) or, serde's sequence form of a struct, the array [dtype, shape, data_offsets]. A name given twice
  keeps its last entry (both must be well-formed);
- dtype is a name the reference knows (DTYPE_BITS), as a string or as {"NAME": null} (serde's enum-as-map);
  shape is an array of integers in [0, 2**64); data_offsets an array of two such integers;
- sorted by (begin, end), the tensors tile the data section from 0 with no gap or overlap (begin == the
  previous end, end >= begin); the element count and bit count do not overflow 64 bits (multiplied left to
  right, so [2**62, 0] is fine and [2**64 - 1, 2, 0] is not); the bits are whole bytes; end - begin is that
  many bytes; and the last end is exactly the data section's length (no trailing bytes).
Loading into torch adds: torch has the dtype (the F6 formats it has not), every dim fits an int64, and F4 (two
4-bit values per byte, torch.float4_e2m1fn_x2) has a last dim that is even (it is halved).

`parse_header` applies all of these and returns the tensor table; each refusal is a `CheckpointError` naming
the file and the tensor, saying what rule the file breaks.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minisail.checkpoint.paths import shown
from minisail.checkpoint.strict_json import JSONError, loads
from minisail.errors import CheckpointError

MAX_HEADER_BYTES = 100_000_000  # the reference's MAX_HEADER_SIZE
U64 = 2**64

DTYPE_BITS = {  # every dtype name the reference knows, with its bits per element
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}  # fmt: skip
TORCH_DTYPE_NAMES = {  # the torch dtype of each (None where this torch has none)
    "BOOL": "bool", "F4": "float4_e2m1fn_x2", "U8": "uint8", "I8": "int8", "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn", "F8_E8M0": "float8_e8m0fnu", "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz", "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16",
    "I32": "int32", "U32": "uint32", "F32": "float32", "C64": "complex64", "F64": "float64", "I64": "int64",
    "U64": "uint64",
}  # fmt: skip
TORCH_DTYPES = {name: getattr(torch, TORCH_DTYPE_NAMES.get(name, ""), None) for name in DTYPE_BITS}


class Pairs:
    """A JSON object as its (key, value) pairs in file order, duplicates kept (json's object_pairs_hook)."""

    def __init__(self, pairs: list[tuple[str, object]]):
        self.pairs = pairs

    def __repr__(self) -> str:
        return repr(dict(self.pairs))


def _tensor_fields(path: Path, name: str, info) -> tuple:
    where = f"{path}: tensor {shown(name)}"
    if isinstance(info, list):  # serde reads a struct from an array of its fields in order
        if len(info) != 3:
            raise CheckpointError(f"{where}: entry is an array of {len(info)} values, not an object")
        return tuple(info)
    if not isinstance(info, Pairs):
        raise CheckpointError(f"{where}: entry {shown(info)} is not an object with dtype, shape and data_offsets")
    fields = {}
    for key, value in info.pairs:
        if key in ("dtype", "shape", "data_offsets"):
            if key in fields:
                raise CheckpointError(f"{where}: field {key!r} is given twice")
            fields[key] = value
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in fields]
    if missing:
        raise CheckpointError(f"{where}: entry has no {missing[0]!r}")
    return fields["dtype"], fields["shape"], fields["data_offsets"]


def _dtype_name(path: Path, name: str, dtype) -> str:
    if isinstance(dtype, Pairs) and len(dtype.pairs) == 1 and dtype.pairs[0][1] is None:  # serde's {"F32": null}
        dtype = dtype.pairs[0][0]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise CheckpointError(
            f"{path}: tensor {shown(name)} has dtype {shown(dtype)}, not one of {', '.join(DTYPE_BITS)}"
        )
    return dtype


def _naturals(path: Path, name: str, field: str, values, length: int | None = None) -> list[int]:
    ok = isinstance(values, list) and all(type(v) is int and 0 <= v < U64 for v in values)
    if not ok or (length is not None and len(values) != length):
        count = "two " if length == 2 else ""
        raise CheckpointError(
            f"{path}: tensor {shown(name)} has {field} {shown(values)}, not an array of {count}integers in [0, 2**64)"
        )
    return values


def _parse_tensors(path: Path, text: str) -> dict[str, tuple[str, list[int], int, int]]:
    """{name: (dtype name, shape, begin, end)} as the header states them, every field type-checked."""
    try:
        header = loads(text, object_pairs_hook=Pairs)
    except JSONError as error:
        raise CheckpointError(
            f"{path}: the safetensors header is not valid JSON ({error}); the file is corrupt"
        ) from None
    if not isinstance(header, Pairs):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object; the file is corrupt")
    tensors, seen_metadata = {}, False
    for name, info in header.pairs:
        if name == "__metadata__":
            if seen_metadata:
                raise CheckpointError(f"{path}: the header has two __metadata__ entries")
            seen_metadata = True
            if info is not None and not (isinstance(info, Pairs) and all(isinstance(v, str) for _, v in info.pairs)):
                raise CheckpointError(f"{path}: __metadata__ {shown(info)} is not an object of strings")
            continue
        dtype, shape, offsets = _tensor_fields(path, name, info)
        dtype = _dtype_name(path, name, dtype)
        shape = _naturals(path, name, "shape", shape)
        begin, end = _naturals(path, name, "data_offsets", offsets, length=2)
        tensors[name] = (dtype, shape, begin, end)  # a repeated name keeps its last entry, as the reference does
    return tensors


def _check_layout(path: Path, tensors: dict, data_len: int) -> None:
    """The reference's Metadata::validate plus its end-of-data check."""
    start = 0
    for name, (dtype, shape, begin, end) in sorted(tensors.items(), key=lambda item: item[1][2:]):
        if begin != start or end < begin:
            raise CheckpointError(
                f"{path}: tensor {shown(name)} has data_offsets [{begin}, {end}], but the tensors must tile the "
                f"data section without gaps or overlaps and the previous one ends at {start}; the file is corrupt"
            )
        start = end
        count = 1
        for dim in shape:  # left to right, as the reference's checked_mul fold
            count *= dim
            if count >= U64:
                raise CheckpointError(f"{path}: tensor {shown(name)}: shape {shape} overflows a 64-bit size")
        bits = count * DTYPE_BITS[dtype]
        if bits >= U64:
            raise CheckpointError(f"{path}: tensor {shown(name)}: shape {shape} of {dtype} overflows a 64-bit size")
        if bits % 8:
            raise CheckpointError(
                f"{path}: tensor {shown(name)}: {count} {dtype} values are not a whole number of bytes"
            )
        if end - begin != bits // 8:
            raise CheckpointError(
                f"{path}: tensor {shown(name)} spans {end - begin} bytes, its shape {shape} of {dtype} needs "
                f"{bits // 8}"
            )
    if start != data_len:
        raise CheckpointError(
            f"{path}: the tensors cover {start} bytes of data but the file holds {data_len} after the header: the file "
            "is truncated or has bytes no tensor owns; download it again"
        )


def _torch_shape(path: Path, name: str, dtype: str, shape: list[int]) -> tuple[torch.dtype, list[int]]:
    torch_dtype = TORCH_DTYPES[dtype]
    if torch_dtype is None:
        raise CheckpointError(
            f"{path}: tensor {shown(name)} is {dtype}, which this torch ({torch.__version__}) cannot hold"
        )
    if any(dim >= 2**63 for dim in shape):
        raise CheckpointError(
            f"{path}: tensor {shown(name)} has shape {shape}: a dim past 2**63 - 1 does not fit torch"
        )
    if dtype == "F4":  # torch's float4_e2m1fn_x2 packs two values per element
        if shape[-1] % 2:
            raise CheckpointError(f"{path}: tensor {shown(name)} is F4 with an odd last dim {shape}: torch packs pairs")
        shape = [*shape[:-1], shape[-1] // 2]
    try:
        torch.empty(shape, dtype=torch_dtype, device="meta")  # no memory: torch's own limits on dims and strides
    except (RuntimeError, ValueError, OverflowError) as error:
        raise CheckpointError(f"{path}: tensor {shown(name)}: torch cannot make shape {shape} ({error})") from None
    return torch_dtype, shape


def parse_header(path: Path, prefix: bytes, file_size: int, read) -> tuple[dict, int]:
    """{name: (torch dtype, torch shape, begin, end)} with absolute byte offsets, and where the data starts.

    `prefix` is the file's first 8 bytes; `read(n)` reads the next n bytes (the header)."""
    if len(prefix) < 8:
        raise CheckpointError(f"{path} is {file_size} bytes, too short to be a safetensors file: download it again")
    header_len = int.from_bytes(prefix, "little")
    if header_len > MAX_HEADER_BYTES or header_len > file_size - 8:
        raise CheckpointError(
            f"{path}: the header claims {header_len} bytes but the file has {file_size} (and a header may have at "
            f"most {MAX_HEADER_BYTES}): the file is truncated or not a safetensors file; download it again"
        )
    raw = read(header_len)
    if len(raw) != header_len:
        raise CheckpointError(f"{path}: short read of the header; the file changed or is truncated")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{path}: the safetensors header is not UTF-8 ({error}); the file is corrupt") from None
    tensors = _parse_tensors(path, text)
    data_start = 8 + header_len
    _check_layout(path, tensors, file_size - data_start)
    entries = {}
    for name, (dtype, shape, begin, end) in tensors.items():
        torch_dtype, torch_shape = _torch_shape(path, name, dtype, shape)
        entries[name] = (torch_dtype, torch_shape, data_start + begin, data_start + end)
    return entries, data_start
