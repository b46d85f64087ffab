"""Absurd and hostile inputs: each ends quickly in a minisail error naming the value, never in a crash,
a hang or a huge allocation (issue: "Runs on every CPU, and refuses every bad input").

One section per class of input: images, tokenizer files, prompts and streaming, generation lengths, the CLI.
"""

from __future__ import annotations

import json
import lzma
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import paths, tokenizer_files
from helpers.sentencepiece_proto import field, toy_model, varint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file
from tokenizers import normalizers

from minisail.errors import CheckpointError, ImageError, PromptError, TokenizerError
from minisail.generate import greedy_generate
from minisail.image import internvl_pixel_values, internvl_tiles, open_image, yivl_pixel_values
from minisail.image.preprocess import MAX_PIXEL_VALUES_BYTES, check_pixel_values_bytes
from minisail.llm.decoder import check_cache_fits
from minisail.text import sentencepiece as spm_backend
from minisail.text import sentencepiece_model as spm_model
from minisail.text import tokenizer as tokenizer_module
from minisail.text import tokenizer_reader
from minisail.text.charsmap import check_charsmap
from minisail.text.image_tokens import MAX_IMAGE_TOKENS
from minisail.text.prompt import build_query
from minisail.text.replies import THINK_CLOSE, THINK_OPEN, ReplyStream, ThoughtReply, boxed_content, split_thinking
from minisail.text.streaming import stream_text
from minisail.text.templates import get_template
from minisail.text.tokenizer import load_tokenizer

ROOT = paths.ROOT
GOLDEN = ROOT / "tests" / "golden"

# --- images -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1, 40000), (40000, 1), (100, 40000)])
def test_thin_image_is_not_padded_to_a_huge_square(size):
    with pytest.raises(ImageError, match=f"{size[0]}x{size[1]}.*crop it closer to a square"):
        yivl_pixel_values(Image.new("RGB", size))


def test_thin_image_with_many_tiles_is_refused_before_resizing():
    with pytest.raises(ImageError, match="1x40000 into 1x1024 tiles.*lower max_tiles"):
        internvl_pixel_values(Image.new("RGB", (1, 40000)), max_tiles=1024)


@pytest.mark.parametrize(
    "kwargs", [dict(min_tiles=1024, max_tiles=1024), dict(max_tiles=2, min_tiles=2, image_size=8192)]
)
def test_flags_at_their_maxima_are_refused(kwargs):
    with pytest.raises(ImageError, match="lower max_tiles or image_size"):
        internvl_tiles(Image.new("RGB", (448, 448)), **kwargs)


def test_pixel_values_byte_bound():
    check_pixel_values_bytes(12 + 1, 448, "x")  # the usual 12 tiles and a thumbnail
    with pytest.raises(ImageError, match=r"1025 tiles of 448px make 2\.3 GiB.*lower max_tiles"):
        check_pixel_values_bytes(1025, 448, "lower max_tiles")
    assert MAX_PIXEL_VALUES_BYTES == 1 << 30


def test_in_memory_image_gets_the_bomb_check(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageError, match="11x10 = 110 pixels.*MAX_IMAGE_PIXELS"):
        open_image(Image.new("RGB", (11, 10)))
    assert open_image(Image.new("RGB", (10, 10))).size == (10, 10)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # disabled by the user: trusted input
    assert open_image(Image.new("RGB", (11, 10))).size == (11, 10)


def test_normal_images_still_pass():
    assert internvl_pixel_values(Image.new("RGB", (1, 40000)), max_tiles=12).shape == (13, 3, 448, 448)
    assert yivl_pixel_values(Image.new("RGB", (20, 3000))).shape == (1, 3, 448, 448)


# --- tokenizer configs --------------------------------------------------------------------------------------------


def spm_folder(tmp_path, model: bytes | None = None, **configs):
    """A tokenizer folder holding a SentencePiece model (the toy one by default) and the given JSON configs."""
    (tmp_path / "tokenizer.model").write_bytes(toy_model() if model is None else model)
    for name, value in configs.items():
        (tmp_path / f"{name}.json").write_text(value if isinstance(value, str) else json.dumps(value))
    return tmp_path


@pytest.mark.parametrize("file", ["tokenizer_config", "special_tokens_map"])
def test_additional_special_tokens_as_a_string_is_refused(tmp_path, file):
    folder = spm_folder(tmp_path, **{file: {"additional_special_tokens": "<img>"}})
    with pytest.raises(TokenizerError, match=f"{file}.json: additional_special_tokens is '<img>', not a list"):
        load_tokenizer(folder)


@pytest.mark.parametrize(
    "configs, message",
    [
        ({"tokenizer_config": {"added_tokens_decoder": {"x1": {"content": "<a>"}}}}, "id of .* is 'x1'"),
        ({"tokenizer_config": {"added_tokens_decoder": {"-3": {"content": "<a>"}}}}, "id of .* is '-3'"),
        ({"tokenizer_config": {"added_tokens_decoder": {"99999999999": {"content": "<a>"}}}}, "ids are whole numbers"),
        ({"tokenizer_config": {"added_tokens_decoder": {"5": "<a>"}}}, "unexpected added token entry '<a>'"),
        ({"tokenizer_config": {"added_tokens_decoder": ["<a>"]}}, "added_tokens_decoder is \\['<a>'\\], not an object"),
        ({"tokenizer_config": {"bos_token": 7}}, "bos_token is 7; a special token must be a string"),
        ({"tokenizer_config": {"eos_token": {"content": 7}}}, "eos_token is .*'content'"),
        ({"tokenizer_config": {"additional_special_tokens": [None]}}, "holds null"),
        ({"special_tokens_map": {"unk_token": ["<unk>"]}}, "special_tokens_map.json: unk_token is"),
        ({"special_tokens_map": "[]"}, "special_tokens_map.json is not a JSON object"),
        ({"added_tokens": {"<a>": "300"}}, "added_tokens.json: the id of '<a>' is '300'"),
        ({"added_tokens": {"<a>": True}}, "added_tokens.json: the id of '<a>' is True"),
        ({"tokenizer_config": "[" * 100000 + "]" * 100000}, "cannot read .*tokenizer_config.json"),
    ],
)
def test_config_field_types_are_checked(tmp_path, configs, message):
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer(spm_folder(tmp_path, **configs))


def test_error_messages_do_not_print_megabytes(tmp_path):
    folder = spm_folder(tmp_path, tokenizer_config={"additional_special_tokens": "x" * 1_000_000})
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(folder)
    assert len(str(info.value)) < 400


@pytest.mark.parametrize(
    "name, limit", [("tokenizer_config.json", "MAX_JSON_BYTES"), ("tokenizer.json", "MAX_VOCAB_BYTES")]
)
def test_oversized_files_are_refused_before_reading(tmp_path, monkeypatch, name, limit):
    with open(tmp_path / name, "wb") as file:
        file.truncate(getattr(tokenizer_reader, limit) + 1)  # sparse: no disk, and reading it would be the bug
    (tmp_path / "tokenizer.model").write_bytes(toy_model())
    with pytest.raises(TokenizerError, match=f"{name} is .* bytes, more than the"):
        load_tokenizer(tmp_path)


def test_too_many_added_tokens(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "MAX_ADDED_TOKENS", 10)
    decoder = {str(1000 + i): {"content": f"<t{i}>"} for i in range(11)}
    with pytest.raises(TokenizerError, match=r"1\d added tokens, more than the 10 minisail accepts"):
        load_tokenizer(spm_folder(tmp_path, tokenizer_config={"added_tokens_decoder": decoder}))


def test_a_rust_panic_becomes_a_tokenizer_error():
    class PanicLike(BaseException):  # pyo3_runtime.PanicException is a BaseException, not an Exception
        pass

    def panics():
        raise PanicLike("index out of bounds")

    with pytest.raises(TokenizerError, match="PanicLike: index out of bounds.*download it again"):
        tokenizer_reader.call_tokenizers("tokenizer.model", panics)
    with pytest.raises(KeyboardInterrupt):
        tokenizer_reader.call_tokenizers("x", lambda: (_ for _ in ()).throw(KeyboardInterrupt()))


# --- SentencePiece models -----------------------------------------------------------------------------------------


def model_with(pieces: list[bytes], normalizer: bytes = b"") -> bytes:
    """A BPE ModelProto with these raw piece messages, the toy trainer spec and a normalizer spec."""
    trainer = field(3, 2) + field(40, 0) + field(41, 1) + field(42, 2)
    return b"".join(field(1, p) for p in pieces) + field(2, trainer) + field(3, normalizer + field(1, b"x"))


def piece(text: bytes, kind: int = 1) -> bytes:
    return field(1, text) + field(2, 0.0) + field(3, kind)


UNK = piece(b"<unk>", 2)


@pytest.mark.parametrize(
    "data, message",
    [
        (varint(1 << 3 | 2) + varint(10**15) + b"abc", "claims 1000000000000000 bytes but only 3 are left"),
        (model_with([UNK, piece(b"a" * 1_000_000)]), "a piece is 1000000 bytes long, more than the 512"),
        (model_with([UNK, field(1, b"a") + varint(2 << 3 | 2) + varint(2**40)]), "claims 1099511627776 bytes"),
        (b"\xff" * 11, "varint longer than 10 bytes"),
    ],
    ids=["length-10**15", "1MB-piece", "nested-length-2**40", "endless-varint"],
)
def test_hostile_length_fields(tmp_path, data, message):
    (tmp_path / "tokenizer.model").write_bytes(data)
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer(tmp_path)


def test_piece_count_and_file_size_bounds(tmp_path, monkeypatch):
    monkeypatch.setattr(spm_model, "MAX_PIECES", 100)
    (tmp_path / "tokenizer.model").write_bytes(model_with([UNK] + [piece(b"p%d" % i) for i in range(100)]))
    with pytest.raises(TokenizerError, match="more than 100 pieces"):
        load_tokenizer(tmp_path)
    monkeypatch.setattr(spm_model, "MAX_MODEL_BYTES", 1000)
    with pytest.raises(TokenizerError, match="larger than 0 MiB"):
        load_tokenizer(tmp_path)


def test_real_models_are_within_the_bounds():
    data = lzma.decompress((tokenizer_files.DATA / "internvl-internlm2" / "tokenizer.model.xz").read_bytes())
    model = spm_model.parse_model_proto(data)
    assert len(data) * 4 < spm_model.MAX_MODEL_BYTES and len(model.pieces) * 4 < spm_model.MAX_PIECES
    assert max(len(p.text.encode()) for p in model.pieces) == 384 < spm_model.MAX_PIECE_BYTES


# A charsmap built by hand in darts-clone's layout: root block 1, "a" (0x61) at 256 ^ 0x61 with a leaf whose
# value (byte 0 of the normalized strings, "b") sits at 353 ^ 512 = 865. It maps "a" to "b".
def hand_charsmap(value: int = 0) -> bytes:
    units = [0] * 1024
    units[0] = 256 << 10  # offset 256: the root's children block
    units[256 ^ 0x61] = 0x61 | 1 << 8 | 512 << 10  # label "a", has a leaf, children at 353 ^ 512
    units[(256 ^ 0x61) ^ 512] = value | 1 << 31  # the leaf value: the normalized string at byte `value`
    trie = struct.pack("<1024I", *units)
    return struct.pack("<I", len(trie)) + trie + b"b\0"


def test_hand_built_charsmap_is_accepted_and_normalizes():
    check_charsmap(hand_charsmap())
    assert normalizers.Precompiled(hand_charsmap()).normalize_str("a-a") == "b-b"


@pytest.mark.parametrize(
    "blob, message",
    [
        (b"\x00", "too short"),
        (struct.pack("<I", 2**32 - 1) + b"xx", "fits in the 2 bytes"),
        (struct.pack("<I", 6) + bytes(8), "not a positive multiple of 4"),
        (struct.pack("<I", 4) + b"abcd", "reaches position"),  # 'abcd' as a root unit: offset far past 1 unit
        (hand_charsmap()[:-2] + b"\xff\0", "not UTF-8"),
        (hand_charsmap(value=5), "points at byte 5 of 2 normalized bytes"),
        (hand_charsmap(value=1)[:-2] + "é".encode() + b"\0", "middle of a UTF-8 character"),
    ],
    ids=["short", "huge-trie-size", "unaligned", "root-out-of-bounds", "not-utf8", "value-past-end", "mid-char"],
)
def test_malformed_charsmaps_are_refused(tmp_path, blob, message):
    with pytest.raises(ValueError, match=message):
        check_charsmap(blob)
    (tmp_path / "tokenizer.model").write_bytes(model_with([UNK, piece(b"a")], field(2, blob)))
    with pytest.raises(TokenizerError, match="precompiled_charsmap"):
        load_tokenizer(tmp_path)


@settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(4, 4 + 4096 + 1), st.integers(0, 255)), min_size=1, max_size=6),
       st.text(max_size=20))  # fmt: skip
def test_mutated_charsmaps_are_refused_or_safe(mutations, text):
    """A charsmap check_charsmap accepts never makes the Precompiled normalizer panic (it would abort encoding)."""
    blob = bytearray(hand_charsmap())
    for position, value in mutations:
        if position < len(blob):
            blob[position] = value
    try:
        check_charsmap(bytes(blob))
    except ValueError:
        return
    normalizers.Precompiled(bytes(blob)).normalize_str("a" + text + "ab")  # a PanicException would fail the test


def small_real_model(pieces: int = 600) -> bytes:
    """The InternLM2 tokenizer.model cut to its first `pieces` pieces (with its specs): real bytes, fast to load."""
    data = lzma.decompress((tokenizer_files.DATA / "internvl-internlm2" / "tokenizer.model.xz").read_bytes())
    kept, pos, count = [], 0, 0
    while pos < len(data):
        start = pos
        key, pos = spm_model._varint(data, pos)
        size, pos = spm_model._varint(data, pos)
        pos += size
        if key >> 3 != 1 or count < pieces:
            kept.append(data[start:pos])
        count += key >> 3 == 1
    return b"".join(kept)


SMALL_REAL_MODEL = small_real_model()


def test_small_real_model_loads():
    tokenizer = spm_backend.build_backend(spm_model.parse_model_proto(SMALL_REAL_MODEL))
    assert tokenizer.decode(tokenizer.encode("hello world").ids) == "hello world"


def _load_or_refuse(folder, data: bytes) -> None:
    (folder / "tokenizer.model").write_bytes(data)
    start = time.perf_counter()
    try:
        tokenizer = load_tokenizer(folder)
    except TokenizerError:
        return
    finally:
        assert time.perf_counter() - start < 5
    for text in ["hello world", "中文 é\n", ""]:
        tokenizer.decode(tokenizer.encode(text))


@settings(
    max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(st.binary(max_size=2000))
def test_random_bytes_load_or_raise_tokenizer_error(tmp_path, data):
    _load_or_refuse(tmp_path, data)


@settings(
    max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.tuples(st.integers(0, len(SMALL_REAL_MODEL) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, len(SMALL_REAL_MODEL)))  # fmt: skip
def test_mutated_real_model_loads_or_raises_tokenizer_error(tmp_path, mutations, cut):
    data = bytearray(SMALL_REAL_MODEL)
    for position, value in mutations:
        data[position] = value
    _load_or_refuse(tmp_path, bytes(data[: max(cut, len(data) // 2)]))


# --- replies: linear-time parsing, the same answers as the original whole-text definitions -------------------------


def old_reply_parts(text: str, think: bool) -> dict[str, str]:
    """The original _reply_parts (unchanged in text/replies.py), repeated so that the oracles below stand alone."""
    text = text.lstrip()
    if not think or not text.startswith(THINK_OPEN):
        return {"reasoning": "", "answer": text.strip()}
    reasoning, _, answer = text[len(THINK_OPEN) :].partition(THINK_CLOSE)
    return {"reasoning": reasoning.strip(), "answer": answer.strip()}


def old_boxed_content(text: str) -> str | None:
    """The original boxed_content: quadratic on many unclosed `\\boxed{` (each one scans to the end)."""
    opening = "\\boxed{"
    start = text.rfind(opening)
    while start >= 0:
        depth = 1
        for end in range(start + len(opening), len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                return text[start + len(opening) : end]
        start = text.rfind(opening, 0, start)
    return None


class OldReplyStream:
    """The original ReplyStream: re-parses the whole text on every piece (quadratic over a long reply)."""

    def __init__(self, cut_at=(), *, think=False):
        self.cut_at = [s for s in cut_at if s]
        self.think = think
        self.text = ""
        self.sent = {"reasoning": "", "answer": ""}

    def feed(self, piece):
        self.text += piece
        return self._events(final=False)

    def finish(self):
        return self._events(final=True)

    def _events(self, final):
        text = self.text
        for cut in self.cut_at:
            text = text.split(cut)[0]
        if not final:
            watch = self.cut_at + ([THINK_OPEN, THINK_CLOSE] if self.think else [])
            held = max((n for s in watch for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
            text = text[: len(text) - held]
        events = []
        for kind, full in old_reply_parts(text, self.think).items():
            sent = self.sent[kind]
            if len(full) > len(sent) and full.startswith(sent):
                events.append((kind, full[len(sent) :]))
                self.sent[kind] = full
        return events


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(["\\boxed{", "{", "}", "a", " ", "\\", "boxed", "x}"]), max_size=30).map("".join))
def test_boxed_content_matches_the_original(text):
    assert boxed_content(text) == old_boxed_content(text)
    assert split_thinking("<think>r</think>" + text) == old_split_thinking("<think>r</think>" + text)


def old_split_thinking(text):
    parts = old_reply_parts(text, think=True)
    boxed = old_boxed_content(parts["answer"])
    return ThoughtReply(text, parts["reasoning"], parts["answer"], parts["answer"] if boxed is None else boxed)


def test_boxed_content_is_linear_on_unclosed_boxes():
    text = "\\boxed{1}" + "\\boxed{" * 200_000  # the original scans to the end from each of them: ~10^11 steps
    start = time.perf_counter()
    assert boxed_content(text) == "1" and split_thinking(text).answer == "1"
    assert time.perf_counter() - start < 5


REPLY_PIECES = ["<think>", "</think>", "<th", "ink>", "</", "think", ">", "<", "<|im_end|>", "<|im", "_end|>", "###",
                "#", "##", " ", "\n", "  ", "a", "b c", "中", "\\boxed{1}", "</s>", "</s", "s>"]  # fmt: skip


@settings(max_examples=800, deadline=None)
@given(
    st.lists(st.sampled_from(REPLY_PIECES), max_size=25),
    st.sampled_from([(), ("<|im_end|>",), ("###",), ("<|im_end|>", "</s>"), ("###", "<|im_end|>")]),
    st.booleans(),
)
def test_reply_stream_matches_the_original(pieces, cut_at, think):
    new, old = ReplyStream(cut_at, think=think), OldReplyStream(cut_at, think=think)
    for piece in pieces:
        assert new.feed(piece) == old.feed(piece), piece
    assert new.finish() == old.finish()


def test_reply_stream_is_linear():
    stream = ReplyStream(["<|im_end|>"], think=True)
    start = time.perf_counter()
    events = stream.feed("<think>")
    for _ in range(100_000):
        events += stream.feed("word ")
    events += stream.feed("</think> \\boxed{2}<|im_end|>") + stream.finish()
    assert time.perf_counter() - start < 10
    reasoning = "".join(text for kind, text in events if kind == "reasoning")
    assert reasoning == ("word " * 100_000).strip()
    assert [text for kind, text in events if kind == "answer"] == ["\\boxed{2}"]


# --- streaming text: a window of ids per step, the same pieces as decoding everything ------------------------------


def whole_decode_stream(tokenizer, token_ids, *, skip_special_tokens=True):
    """The original stream_text: decodes all ids at every step (quadratic over a long reply). The oracle."""
    ids, emitted = [], ""
    for token_id in token_ids:
        ids.append(int(token_id))
        text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if len(text) > len(emitted) and not text.endswith("\ufffd") and text.startswith(emitted):
            yield text[len(emitted) :]
            emitted = text
    final = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    common = 0
    while common < min(len(final), len(emitted)) and final[common] == emitted[common]:
        common += 1
    if final[common:]:
        yield final[common:]


STREAM_TEXTS = ["小熊猫🐼 sits", " in a tree 🌳🎋", "naïve café", " — 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "  two  spaces ", "\n\nline",
                "日本語。", "don't .", " , ok", "<|im_end|>", "<think>", "x", " ", "👩‍👩‍👧"]  # fmt: skip


CLEANED_UP = {"don't .", " , ok"}  # texts transformers' clean_up_tokenization rewrites


@pytest.fixture(scope="module", params=["qwen25", "sailvl2", "internlm2"])
def real_tokenizer(request):
    return request.getfixturevalue(f"{request.param}_tokenizer")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_stream_text_matches_decoding_everything(real_tokenizer, data):
    # InternLM2's slow decode always runs clean_up_tokenization (" ," -> ","), which rewrites text already
    # decoded once the next token arrives; a window and a whole decode then cut the pieces differently (the
    # same rewrite makes any stream retract nothing it sent). Its texts leave out what the clean-up rewrites.
    pool = [t for t in STREAM_TEXTS if not (real_tokenizer.clean_up_runs and t in CLEANED_UP)]
    texts = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=6))
    ids = real_tokenizer.encode("".join(texts), add_special_tokens=False)
    # also ids that are not a clean encoding: cut anywhere (inside a character), shuffled a little, random ids
    cut = data.draw(st.integers(0, len(ids)))
    extra = data.draw(st.lists(st.integers(0, len(real_tokenizer) - 1), max_size=4))
    for sequence in (ids, ids[:cut], ids[:cut] + extra + ids[cut:]):  # special tokens skipped, as chat streams
        assert list(stream_text(real_tokenizer, sequence)) == list(whole_decode_stream(real_tokenizer, sequence))


def test_stream_text_decodes_a_window_not_everything():
    class CountingTokenizer:
        decoded = 0

        def decode(self, ids, skip_special_tokens=True):
            self.decoded += len(ids)
            return "".join(chr(97 + i % 26) for i in ids)

    tokenizer = CountingTokenizer()
    pieces = list(stream_text(tokenizer, range(20_000)))
    assert len(pieces) == 20_000 and tokenizer.decoded < 5 * 20_000  # whole decodes: 2 * 10^8


# --- prompts, generation lengths and parity cases ------------------------------------------------------------------


@pytest.mark.parametrize(
    "tiles, per_tile", [([10**8], 256), ([1], 10**8), ([1024] * 5, 256)], ids=["1e8-tiles", "1e8-per-tile", "5-images"]
)
def test_image_tokens_are_bounded_before_any_text_is_built(tiles, per_tile):
    template = get_template("Hermes-2")
    with pytest.raises(PromptError, match=f"make {sum(tiles) * per_tile} image tokens, more than the 1048576"):
        build_query(template, "<image>" * len(tiles), num_patches_list=tiles, tokens_per_tile=per_tile)
    assert MAX_IMAGE_TOKENS == 1 << 20


def test_kv_cache_that_does_not_fit_is_refused():
    decoder = SimpleNamespace(
        embed=SimpleNamespace(weight=torch.zeros(1, dtype=torch.bfloat16)),
        config=SimpleNamespace(num_layers=28, num_kv_heads=2, head_dim=128),
    )
    per_token = 2 * 28 * 2 * 128 * 2  # 28 KiB per token and row in bf16
    check_cache_fits(decoder, 1, 100, 1000, available=per_token * 2000)
    with pytest.raises(PromptError, match=r"100 prompt \+ 10000000 new tokens.*about 1900 new tokens fit"):
        check_cache_fits(decoder, 1, 100, 10**7, available=per_token * 2000)


def test_generate_refuses_a_huge_cache_before_allocating(textonly_case, monkeypatch):
    model, input_ids, attention_mask = textonly_case
    monkeypatch.setattr("minisail.system.available_memory_bytes", lambda: 10 << 20)
    with pytest.raises(PromptError, match="lower max_new_tokens"):
        greedy_generate(model, input_ids, attention_mask, max_new_tokens=10**7)
    assert greedy_generate(model, input_ids, attention_mask, max_new_tokens=3).shape == (1, 3)


@pytest.fixture(scope="module")
def textonly_case():
    from minisail import load
    from minisail.parity import read_tensors

    case = GOLDEN / "internvl-qwen2-textonly"
    inputs = read_tensors(case / "inputs.safetensors")
    return load(case / "checkpoint"), inputs["input_ids"], inputs["attention_mask"]


def case_copy(tmp_path, **replaced) -> Path:
    """The internvl-qwen2-textonly golden case, with some arrays of expected.safetensors / inputs replaced."""
    from minisail.parity import read_tensors

    source = GOLDEN / "internvl-qwen2-textonly"
    case = tmp_path / "case"
    case.mkdir()
    (case / "checkpoint").symlink_to(source / "checkpoint")
    shutil.copy(source / "meta.json", case / "meta.json")
    for name in ("inputs", "expected"):
        tensors = read_tensors(source / f"{name}.safetensors")
        tensors |= {key: value for key, value in replaced.items() if key in tensors}
        save_file({key: value.contiguous() for key, value in tensors.items()}, case / f"{name}.safetensors")
    return case


@pytest.mark.parametrize(
    "replaced, message",
    [
        ({"generated_ids": torch.zeros(0, 10**7, dtype=torch.long)}, r"generated_ids has shape \[0, 10000000\]"),
        ({"generated_ids": torch.zeros(1, 10**6, dtype=torch.long)}, r"1 <= K <= 32768"),
        ({"attention_mask": torch.ones(2, 36, dtype=torch.long)}, r"attention_mask has shape \[2, 36\]"),
        (
            {
                "input_ids": torch.zeros(1, 40000, dtype=torch.long),
                "attention_mask": torch.ones(1, 40000, dtype=torch.long),
            },
            r"input_ids has shape \[1, 40000\].*1 to 32768 tokens",
        ),
        ({"logits": torch.zeros(3, 36, 400)}, r"logits has shape \[3, 36, 400\]"),
        ({"generated_ids": torch.zeros(12, dtype=torch.long)}, r"generated_ids has shape \[12\], expected 2"),
    ],
    ids=["0x1e7-generated", "1e6-generated", "mask-rows", "input-past-context", "logits-rows", "1d-generated"],
)
def test_parity_case_with_absurd_shapes_is_refused(tmp_path, replaced, message):
    from minisail.parity import run_case

    case = case_copy(tmp_path, **replaced)
    with pytest.raises(CheckpointError, match=message):
        run_case(case)


# --- the command line: a reader that stops early ------------------------------------------------------------------


def cli_with_closed_stdout(*argv) -> subprocess.CompletedProcess:
    """Run `python -m minisail ...` with its stdout a pipe whose reader has already gone (as `| head -0`)."""
    read, write = os.pipe()
    os.close(read)  # before the child writes anything: its first write gets EPIPE
    try:
        process = subprocess.run([sys.executable, "-m", "minisail", *map(str, argv)], stdout=write,
                                 stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=600)  # fmt: skip
    finally:
        os.close(write)
    return process


@pytest.mark.parametrize("command", ["prompt", "tiles", "parity", "chat"])
def test_closed_stdout_ends_quietly(command, qwen25_tokenizer_dir, tmp_path):
    image = ROOT / "tests" / "data" / "internvl" / "images" / "red_panda.jpg"
    argv = {
        "prompt": ["prompt", "--template", "Hermes-2", "--tokenizer", qwen25_tokenizer_dir, "--tiles", "2", "<image>q"],
        "tiles": ["tiles", image],
        "parity": ["parity", GOLDEN / "internvl-qwen2-textonly"],
        "chat": ["chat", "--model", chat_checkpoint(tmp_path), "--max-new-tokens", "4", "Hi"],
    }[command]
    done = cli_with_closed_stdout(*argv)
    assert done.returncode in (0, 141), done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr


def chat_checkpoint(tmp_path):
    from helpers.chat_checkpoint import build_chat_checkpoint

    return build_chat_checkpoint(tmp_path / "ckpt")
