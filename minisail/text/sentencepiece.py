"""A SentencePiece model as a `tokenizers` pipeline, and SentencePiece's exact decoding.

`build_backend(model)` turns a `SentencePieceModel` (read by `minisail.text.sentencepiece_model`) into a
`tokenizers.Tokenizer` that encodes and decodes plain text the way `SentencePieceProcessor` does:
- `bpe_model.cc`: BPE repeatedly merges the adjacent pair whose concatenation is the highest-scoring piece.
  A `tokenizers` BPE gives the same result when its merge ranks follow the merged pieces' scores, which is
  also how transformers' `convert_slow_tokenizer` (SentencePieceExtractor, LlamaConverter) ranks them;
- `normalizer.cc`: optional charsmap, whitespace clean-up, the dummy "▁" prefix, spaces escaped as "▁";
- `sentencepiece_processor.cc`: unknown characters fall back to <0xXX> byte pieces, control pieces decode
  to nothing, and decoding drops the dummy prefix again.
USER_DEFINED pieces are atomic in SentencePiece, so they become non-special added tokens matched on the
normalized text. Checkpoint-level added tokens (chat and image tokens) are not handled here but in
`minisail.text.tokenizer`, as transformers' slow tokenizers handle them around `sp_model.encode`.

Known differences, none reachable through the checkpoints minisail supports: UNUSED pieces are left out of the
vocabulary (SentencePiece merges through them and then splits them again); equal-score pieces are ranked by id
(SentencePiece prefers the leftmost pair); with a dummy prefix, a text that is exactly one user-defined
symbol gets no "▁" in front. The tokenizers decoder turns a byte-piece run with an invalid byte entirely into
U+FFFD, so `PieceDecoder` (exact `SentencePieceProcessor.decode`) is what minisail decodes with.
"""

from __future__ import annotations

import re

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

from minisail.errors import TokenizerError
from minisail.text.charsmap import check_charsmap
from minisail.text.sentencepiece_model import (
    BPE,
    BYTE,
    CONTROL,
    NORMAL,
    UNIGRAM,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    Piece,
    SentencePieceModel,
)

SPACE = "\u2581"  # "▁", SentencePiece's visible stand-in for " "


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
