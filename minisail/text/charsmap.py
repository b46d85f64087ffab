"""Checking a SentencePiece `precompiled_charsmap` before `tokenizers` reads it.

A model's normalization rules (e.g. nmt_nfkc) are stored as one blob in `NormalizerSpec.precompiled_charsmap`
(sentencepiece `normalizer.cc`, `DecodePrecompiledCharsMap`):

    [trie size: uint32 little-endian][the trie: trie size / 4 uint32 units][the normalized strings, \\0-separated]

The trie is a darts-clone double array. Looking a key up walks it byte by byte (how `tokenizers`' Precompiled
normalizer, crate spm_precompiled, reads it):

    node = offset(unit[0])                               # the root's children block
    for each byte c of the key (1..255):
        q = node ^ c;  u = unit[q]                       # read BEFORE checking the label
        if label(u) != c: stop
        node = q ^ offset(u)
        if has_leaf(u): value(unit[node]) is a match: the normalized string starting at that byte offset
    offset(u) = (u >> 10) << ((u & 512) >> 6);  label(u) = u & 0x800000FF;  has_leaf(u) = u >> 8 & 1;
    value(u) = u & 0x7FFFFFFF

`tokenizers` checks only the header at construction and indexes the array unchecked while normalizing, so a
hostile blob panics (a pyo3 PanicException) on the first encode. `check_charsmap` rules that out up front:
every position the walk can reach must have its whole 256-unit block inside the array (`node ^ c` for any c
stays in node's block), and every leaf value must start a string inside the normalized part. "Can reach" is
over-approximated by every unit whose label is a valid byte (its parent is `q ^ label`): darts-clone gives
unused units offset 0 and leaf values bit 31, so the blobs SentencePiece writes always pass.
"""

from __future__ import annotations

import numpy as np

MAX_CHARSMAP_BYTES = 16 << 20  # nmt_nfkc's is ~240 KB; a trie of 4M units is far past any real one
BLOCK = 256


def _offset(units: np.ndarray) -> np.ndarray:
    return (units >> 10) << ((units & (1 << 9)) >> 6)


def check_charsmap(blob: bytes) -> None:
    """Raise ValueError saying what is wrong if `blob` could make the Precompiled normalizer read out of bounds."""
    if len(blob) > MAX_CHARSMAP_BYTES:
        raise ValueError(f"precompiled_charsmap is {len(blob)} bytes, more than the {MAX_CHARSMAP_BYTES} allowed")
    if len(blob) < 4:
        raise ValueError(f"precompiled_charsmap is {len(blob)} bytes, too short for its 4-byte trie size")
    trie_size = int.from_bytes(blob[:4], "little")
    if trie_size == 0 or trie_size % 4 or 4 + trie_size > len(blob):
        raise ValueError(
            f"precompiled_charsmap says its trie is {trie_size} bytes, which is not a positive multiple of 4 "
            f"that fits in the {len(blob) - 4} bytes after the header"
        )
    normalized = blob[4 + trie_size :]
    try:
        normalized.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"precompiled_charsmap's normalized strings are not UTF-8 ({exc})") from None
    units = np.frombuffer(blob, dtype="<u4", count=trie_size // 4, offset=4).astype(np.int64)  # [n]
    n = len(units)

    index = np.arange(n, dtype=np.int64)
    labels = units & 0x800000FF
    is_edge = (labels >= 1) & (labels <= 255)  # a unit the walk may step onto (bit 31 set: a value, never)
    nodes = np.concatenate([_offset(units[:1]), index[is_edge] ^ _offset(units[is_edge])])  # root, then children
    if np.any((nodes | (BLOCK - 1)) >= n):
        bad = int(nodes[(nodes | (BLOCK - 1)) >= n][0])
        raise ValueError(f"precompiled_charsmap's trie reaches position {bad}, past its {n} units")

    leaves = (index[is_edge] ^ _offset(units[is_edge]))[((units[is_edge] >> 8) & 1) == 1]
    values = units[leaves] & 0x7FFFFFFF  # byte offsets into the normalized strings
    if np.any(values > len(normalized)):
        raise ValueError(
            f"precompiled_charsmap points at byte {int(values.max())} of {len(normalized)} normalized bytes"
        )
    continuation = np.frombuffer(normalized + b"\0", dtype=np.uint8)[values] & 0xC0 == 0x80
    if np.any(continuation):
        raise ValueError("precompiled_charsmap points into the middle of a UTF-8 character")
