"""SentencePiece model protos written by hand: protobuf fields and a toy Yi-like BPE model."""

from __future__ import annotations

import struct


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 fields are written as 10-byte varints
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value >> 7 else 0))
        value >>= 7
        if not value:
            return bytes(out)


def field(number: int, payload: bytes | int | float) -> bytes:
    if isinstance(payload, bytes):
        return varint(number << 3 | 2) + varint(len(payload)) + payload
    if isinstance(payload, float):
        return varint(number << 3 | 5) + struct.pack("<f", payload)
    return varint(number << 3) + varint(payload)


# NORMAL pieces of a toy BPE model; merges happen best score first: "ll", "▁h", "▁he", "llo", "▁hello", ...
TOY_MERGES = ["ll", "▁h", "▁he", "llo", "▁hello", "▁w", "or", "▁wor", "ld", "▁world", "▁▁"]
TOY_CHARS = ["▁", "h", "e", "l", "o", "w", "r", "d", "中"]


def toy_model(*, add_dummy_prefix=True, remove_extra_whitespaces=False, model_type=2) -> bytes:
    """A tiny Yi-like SentencePiece BPE model: <unk> <s> </s>, 256 byte pieces, one user-defined symbol."""
    pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3), ("<|im_sep|>", 0.0, 4)]
    pieces += [(f"<0x{byte:02X}>", 0.0, 6) for byte in range(256)]
    pieces += [(text, -float(i), 1) for i, text in enumerate(TOY_MERGES)]
    pieces += [(text, -100.0 - i, 1) for i, text in enumerate(TOY_CHARS)]
    proto = b"".join(field(1, field(1, t.encode()) + field(2, s) + field(3, k)) for t, s, k in pieces)
    trainer = field(3, model_type) + field(35, 1) + field(40, 0) + field(41, 1) + field(42, 2) + field(43, -1)
    normalizer = field(1, b"identity") + field(3, int(add_dummy_prefix)) + field(4, int(remove_extra_whitespaces))
    return proto + field(2, trainer) + field(3, normalizer + field(5, 1))
