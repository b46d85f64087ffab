"""Read a SentencePiece `tokenizer.model` by hand: the few `ModelProto` fields that decide tokenization.

InternLM2 (InternVL-Chat-V1-5, Mono-InternVL-2B) and Yi (Yi-VL) ship their vocabulary as a SentencePiece
`ModelProto`. Mirrors the message layout of sentencepiece's `sentencepiece_model.proto` (pieces, trainer_spec,
normalizer_spec) with a minimal protobuf reader, so the `sentencepiece` package is not needed at run time.
`read_model(path)` gives a `SentencePieceModel`; `minisail.text.sentencepiece` turns it into a `tokenizers`
pipeline and decodes with it.

A tokenizer.model is untrusted input, and `tokenizers` (Rust) aborts the interpreter or runs out of memory on
some hostile ones, so everything is bounded here, before it gets there (TokenizerError otherwise): the file is
at most MAX_MODEL_BYTES, every length field must fit in what is left of its message, a model has at most
MAX_PIECES pieces of at most MAX_PIECE_BYTES each (which also bounds `bpe_merges`, quadratic in piece
length), and the precompiled charsmap must be internally consistent (`minisail.text.charsmap`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from minisail.errors import TokenizerError
from minisail.text.charsmap import check_charsmap

# Bounds on what a tokenizer.model may hold. Real ones: InternLM2 1.5 MB and 92,544 pieces, Gemma 3 4.7 MB and
# 262,144 pieces. SentencePiece trains pieces of at most 16 characters by default; user-defined and long
# pieces are longer (InternLM2's longest is 384 bytes), so 512 bytes leaves room and keeps bpe_merges small.
MAX_MODEL_BYTES = 16 << 20
MAX_PIECES = 1 << 20
MAX_PIECE_BYTES = 512

# ModelProto.SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# TrainerSpec.ModelType
UNIGRAM, BPE = 1, 2


@dataclass(frozen=True)
class Piece:
    text: str
    score: float
    kind: int  # one of NORMAL .. BYTE above


@dataclass(frozen=True)
class SentencePieceModel:
    """What a `ModelProto` says about tokenization. Defaults are the proto's own defaults."""

    pieces: list[Piece]
    model_type: int = UNIGRAM
    byte_fallback: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    unk_surface: str = " \u2047 "  # what <unk> decodes to
    treat_whitespace_as_suffix: bool = False
    normalizer_name: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


# --- protobuf wire format: just enough to walk a message's fields -------------------------------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    if pos < len(buf) and buf[pos] < 0x80:  # one byte: most keys and lengths
        return buf[pos], pos + 1
    value, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _fields(buf: bytes):
    """Yield (field number, value) of one message: int for varints, bytes for everything else."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _varint(buf, pos)
        elif wire_type in (1, 5):  # fixed64 / fixed32
            size = 8 if wire_type == 1 else 4
            value, pos = buf[pos : pos + size], pos + size
        elif wire_type == 2:  # length-delimited: strings, bytes, sub-messages
            size, pos = _varint(buf, pos)
            if size > len(buf) - pos:  # checked before slicing: a length of 10**15 is a lie, not a request
                raise ValueError(f"field {field} claims {size} bytes but only {len(buf) - pos} are left")
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported wire type {wire_type} (field {field})")
        if pos > len(buf) or field == 0:
            raise ValueError("truncated or malformed message")
        yield field, value


def _int32(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value  # negative int32s are sign-extended to 64 bits


def _text(value: bytes) -> str:
    return value.decode("utf-8")


# field number -> (SentencePieceModel attribute, how to read the raw value)
TRAINER_SPEC = {3: ("model_type", int), 24: ("treat_whitespace_as_suffix", bool), 35: ("byte_fallback", bool)}
TRAINER_SPEC |= {40: ("unk_id", _int32), 41: ("bos_id", _int32), 42: ("eos_id", _int32), 43: ("pad_id", _int32)}
TRAINER_SPEC |= {44: ("unk_surface", _text)}
NORMALIZER_SPEC = {1: ("normalizer_name", _text), 2: ("precompiled_charsmap", bytes), 3: ("add_dummy_prefix", bool)}
NORMALIZER_SPEC |= {4: ("remove_extra_whitespaces", bool), 5: ("escape_whitespaces", bool)}


def _piece(message: bytes) -> Piece:
    fields = dict(_fields(message))  # 1: piece, 2: score (float32), 3: type
    if not fields.get(1):
        raise ValueError("a piece is empty")
    if len(fields[1]) > MAX_PIECE_BYTES:
        raise ValueError(f"a piece is {len(fields[1])} bytes long, more than the {MAX_PIECE_BYTES} allowed")
    return Piece(_text(fields[1]), struct.unpack("<f", fields.get(2, bytes(4)))[0], int(fields.get(3, NORMAL)))


def _spec(message: bytes, layout: dict) -> dict:
    return {layout[n][0]: layout[n][1](value) for n, value in _fields(message) if n in layout}


def parse_model_proto(data: bytes) -> SentencePieceModel:
    """Decode a serialized `ModelProto`. Raises ValueError (or TypeError) if the bytes are not one."""
    pieces, spec, seen = [], {}, set()
    for field, value in _fields(data):
        seen.add(field)
        if field == 1:  # repeated SentencePiece pieces
            if len(pieces) == MAX_PIECES:
                raise ValueError(f"more than {MAX_PIECES} pieces")
            pieces.append(_piece(value))
        elif field == 2:
            spec |= _spec(value, TRAINER_SPEC)
        elif field == 3:
            spec |= _spec(value, NORMALIZER_SPEC)
    if not pieces or not {2, 3} <= seen:  # every trained model has both specs, written after the pieces
        raise ValueError("no pieces, trainer_spec or normalizer_spec: the file is cut short")
    if spec.get("precompiled_charsmap"):
        check_charsmap(spec["precompiled_charsmap"])
    return SentencePieceModel(pieces=pieces, **spec)


def read_model(path: str | Path) -> SentencePieceModel:
    path = Path(path)
    try:
        with path.open("rb") as file:
            data = file.read(MAX_MODEL_BYTES + 1)  # never more, whatever the file's size
    except OSError as exc:
        raise TokenizerError(f"cannot read {path}: {exc}") from exc
    if len(data) > MAX_MODEL_BYTES:
        raise TokenizerError(
            f"{path} is larger than {MAX_MODEL_BYTES >> 20} MiB; real SentencePiece models are a few MB, so this is "
            "not one: use the tokenizer.model of the checkpoint's repository"
        )
    try:
        return parse_model_proto(data)
    except (ValueError, TypeError, AttributeError, struct.error) as exc:  # wrong bytes, wrong wire types
        raise TokenizerError(
            f"{path} is not a valid SentencePiece model ({exc}); the file is probably truncated or not a "
            "tokenizer.model: download it again from the checkpoint's repository"
        ) from exc
