"""Read a SentencePiece `tokenizer.model` by hand and rebuild it as a `tokenizers` pipeline.

InternLM2 (InternVL-Chat-V1-5, Mono-InternVL-2B) and Yi (Yi-VL) ship their vocabulary as a SentencePiece
`ModelProto`. This module reads the few fields that decide tokenization, with a minimal protobuf reader, and
builds a `tokenizers.Tokenizer` that encodes and decodes plain text the way `SentencePieceProcessor` does:
- `sentencepiece_model.proto`: the message layout read here (pieces, trainer_spec, normalizer_spec);
- `bpe_model.cc`: BPE repeatedly merges the adjacent pair whose concatenation is the highest-scoring piece.
  A `tokenizers` BPE gives the same result when its merge ranks follow the merged pieces' scores, which is
  also how transformers' `convert_slow_tokenizer` (SentencePieceExtractor, LlamaConverter) ranks them;
- `normalizer.cc`: optional charsmap, whitespace clean-up, the dummy "▁" prefix, spaces escaped as "▁";
- `sentencepiece_processor.cc`: unknown characters fall back to <0xXX> byte pieces, control pieces decode
  to nothing, and decoding drops the dummy prefix again.
USER_DEFINED pieces are atomic in SentencePiece, so they become non-special added tokens matched on the
normalized text. Checkpoint-level added tokens (chat and image tokens) are not handled here but in
`minisail.text.tokenizer`, as transformers' slow tokenizers handle them around `sp_model.encode`.

A tokenizer.model is untrusted input, and `tokenizers` (Rust) aborts the interpreter or runs out of memory on
some hostile ones, so everything is bounded before it gets there (TokenizerError otherwise): the file is at
most MAX_MODEL_BYTES, every length field must fit in what is left of its message, a model has at most
MAX_PIECES pieces of at most MAX_PIECE_BYTES each (which also bounds `bpe_merges`, quadratic in piece
length), and the precompiled charsmap must be internally consistent (`minisail.text.charsmap`).

Known differences, none reachable through the checkpoints minisail supports: UNUSED pieces are left out of the
vocabulary (SentencePiece merges through them and then splits them again); equal-score pieces are ranked by id
(SentencePiece prefers the leftmost pair); with a dummy prefix, a text that is exactly one user-defined
symbol gets no "▁" in front. The tokenizers decoder turns a byte-piece run with an invalid byte entirely into
U+FFFD, so `PieceDecoder` (exact `SentencePieceProcessor.decode`) is what minisail decodes with.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

from minisail.errors import TokenizerError
from minisail.text.charsmap import check_charsmap

SPACE = "\u2581"  # "▁", SentencePiece's visible stand-in for " "

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


# --- the tokenizers pipeline ---------------------------------------------------------------------------


def _is_hidden(piece: Piece, byte_fallback: bool) -> bool:
    """Pieces that encoding never produces. SentencePiece >= 0.2 also hides a "\\0" piece when it has bytes."""
    return piece.kind == UNUSED or (byte_fallback and piece.text == "\0" and piece.kind == NORMAL)


def bpe_merges(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """Every split of every piece into two pieces, best merged piece first (higher score, then lower id)."""
    ranked = []
    for piece, piece_id in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[piece_id], piece_id, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _normalizer(model: SentencePieceModel):
    steps = []
    if model.precompiled_charsmap:
        steps.append(normalizers.Precompiled(model.precompiled_charsmap))
    if model.remove_extra_whitespaces:  # only " " counts as whitespace here, as in normalizer.cc
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if model.add_dummy_prefix:
        # " " in front of non-empty text. Not `Prepend`: tokenizers also normalizes the text of the
        # user-defined tokens, which must stay unprefixed to match; a text that is exactly one such token
        # is therefore left unprefixed too (SentencePiece would emit "▁" before it).
        symbols = "|".join(re.escape(piece.text) for piece in model.pieces if piece.kind == USER_DEFINED)
        not_a_symbol = f"(?!(?:{symbols})\\z)" if symbols else ""
        steps.append(normalizers.Replace(Regex(rf"\A{not_a_symbol}(?=[\s\S])"), " "))
    if model.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPACE))
    return normalizers.Sequence(steps)


def _decoder(model: SentencePieceModel):
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if model.add_dummy_prefix or model.remove_extra_whitespaces:
        steps.append(decoders.Strip(" ", 1, 0))  # the dummy prefix of the first piece
    return decoders.Sequence(steps)


def build_backend(model: SentencePieceModel, source: str = "tokenizer.model") -> Tokenizer:
    """A `tokenizers.Tokenizer` equivalent to `SentencePieceProcessor` on this model (BPE models only).

    Control pieces (<s>, </s>) are registered as special tokens only so that decoding drops them; the
    tokenizer is set to never match them in text (SentencePiece splits "<s>" in text into ordinary pieces).
    """
    if model.model_type != BPE:
        kind = {UNIGRAM: "UNIGRAM", 3: "WORD", 4: "CHAR"}.get(model.model_type, str(model.model_type))
        raise TokenizerError(f"{source}: SentencePiece model type {kind} is not supported (only BPE)")
    if model.treat_whitespace_as_suffix:
        raise TokenizerError(f"{source}: treat_whitespace_as_suffix models are not supported")
    if not 0 <= model.unk_id < len(model.pieces):
        raise TokenizerError(f"{source}: unk_id {model.unk_id} is not a piece id")
    if model.precompiled_charsmap:
        try:
            check_charsmap(model.precompiled_charsmap)
        except ValueError as exc:
            raise TokenizerError(f"{source}: {exc}; download the file again from the checkpoint's repository") from None

    vocab: dict[str, int] = {}
    for piece_id, piece in enumerate(model.pieces):
        if _is_hidden(piece, model.byte_fallback):
            continue
        if piece.text in vocab:
            raise TokenizerError(f"{source}: piece {piece.text!r} appears twice (ids {vocab[piece.text]}, {piece_id})")
        vocab[piece.text] = piece_id
    mergeable = {text: i for text, i in vocab.items() if model.pieces[i].kind in (NORMAL, USER_DEFINED)}
    merges = bpe_merges(mergeable, [piece.score for piece in model.pieces])

    bpe = models.BPE(
        vocab=vocab,
        merges=merges,
        unk_token=model.pieces[model.unk_id].text,
        fuse_unk=True,  # SentencePiece merges a run of unknown pieces into one <unk>
        byte_fallback=model.byte_fallback,
    )
    backend = Tokenizer(bpe)
    backend.normalizer = _normalizer(model)
    backend.decoder = _decoder(model)
    user_defined = [p.text for p in model.pieces if p.kind == USER_DEFINED]
    backend.add_tokens([AddedToken(text, normalized=True, special=False) for text in user_defined])
    control = [p.text for p in model.pieces if p.kind == CONTROL]
    backend.add_special_tokens([AddedToken(text, normalized=False, special=True) for text in control])
    backend.encode_special_tokens = True
    return backend


# --- exact decoding ------------------------------------------------------------------------------------


def _utf8_chars(data: bytes) -> str:
    """Bytes to text one character at a time, U+FFFD for each byte that starts no valid character."""
    out, pos = [], 0
    while pos < len(data):
        for size in (1, 2, 3, 4):
            try:
                out.append(data[pos : pos + size].decode("utf-8"))
                pos += size
                break
            except UnicodeDecodeError:
                continue
        else:
            out.append("\ufffd")
            pos += 1
    return "".join(out)


class PieceDecoder:
    """`SentencePieceProcessor.decode(ids)`, exactly. The tokenizers decoder above agrees on valid text, but
    turns a whole run of byte pieces into U+FFFD as soon as one byte in it is invalid (a reply cut inside a
    character); SentencePiece keeps the valid characters of the run."""

    def __init__(self, model: SentencePieceModel):
        self.pieces = model.pieces
        self.unk_surface = model.unk_surface
        self.strip_first_space = model.add_dummy_prefix or model.remove_extra_whitespaces
        self.strip_all_leading = model.remove_extra_whitespaces

    def __call__(self, ids: list[int]) -> str:
        text, pending = "", bytearray()  # pending: the current run of byte pieces
        expect_bos_space, bos_space_seen = True, False
        for token_id in ids:
            piece = self.pieces[token_id]
            if piece.kind == BYTE:
                pending.append(int(piece.text[3:5], 16))  # "<0xAB>"
                continue
            text += _utf8_chars(pending)
            pending.clear()
            expect_bos_space = expect_bos_space and not bos_space_seen and not text
            surface, bos_space_seen = self._surface(piece, expect_bos_space)
            text += surface
        return text + _utf8_chars(pending)

    def _surface(self, piece: Piece, expect_bos_space: bool) -> tuple[str, bool]:
        if piece.kind == CONTROL:
            return "", False
        if piece.kind == UNKNOWN:
            return self.unk_surface, False
        piece_text, seen = piece.text, False
        if expect_bos_space and self.strip_first_space and piece_text.startswith(SPACE):
            # the dummy prefix; with remove_extra_whitespaces every leading "▁" up to the first text goes
            piece_text, seen = piece_text[1:], not self.strip_all_leading
        return piece_text.replace(SPACE, " "), seen
