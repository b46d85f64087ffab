"""A checkpoint's tokenizer, behaving like the slow transformers tokenizer the model cards load.

`load_tokenizer(folder)` reads what a model repository ships:
- the base model: `tokenizer.json` if present, else `vocab.json` + `merges.txt` (Qwen2 byte-level BPE),
  else a SentencePiece `tokenizer.model` (see `minisail.text.sentencepiece`);
- `tokenizer_config.json`: the class, `added_tokens_decoder`, the special tokens, `add_bos_token`. Without
  `added_tokens_decoder`, the older `added_tokens.json` + `special_tokens_map.json` instead.

Tokenizer files are untrusted input: each is read only up to a documented size (MAX_JSON_BYTES for the JSON
configs, MAX_VOCAB_BYTES for tokenizer.json / vocab.json / merges.txt), every config field is type-checked
(a string where a list belongs is refused, not split into characters), and every call into `tokenizers` that
builds or runs a base model turns its errors, including Rust panics (pyo3's PanicException is a
BaseException), into TokenizerError.

The InternVL-family `chat()` code loads the *slow* classes (`use_fast=False`), so this module mirrors
transformers 4.44 `PreTrainedTokenizer` (tokenization_utils.py) around a `tokenizers` base model:
- every added token is cut out of the text first (longest match wins) and the text between added tokens is
  encoded piece by piece; `split_special_tokens=True` cuts nothing out, not even non-special added tokens;
- `decode` follows `_decode`: `skip_special_tokens` drops only the tokens *listed* as special (bos, eos, unk,
  pad, ..., additional_special_tokens), not every token flagged special. Added tokens outside that list,
  and listed ones with ids past the base vocabulary, are decoded on their own and joined to the rest;
- per class: `Qwen2Tokenizer` (tokenization_qwen2.py) NFC-normalises first and joins with no spaces;
  InternVL's `InternLM2Tokenizer` (tokenization_internlm2.py) writes a space before each run of special
  tokens, always cleans up " ." / " ," / " n't" ..., and joins with spaces; `LlamaTokenizer` (legacy) writes
  a space before special tokens that do not start the text. Other classes decode like a fast tokenizer.
"""

from __future__ import annotations

import json
import operator
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from minisail.checkpoint.paths import inside
from minisail.errors import TokenizerError
from minisail.text import sentencepiece, sentencepiece_model
from minisail.text.sentencepiece_model import SentencePieceModel

# Qwen2Tokenizer's PRETOKENIZE_REGEX (the same pattern is in Qwen's tokenizer.json)
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
QWEN2_SPLIT += r"|\s*[\r\n]+|\s+(?!\S)|\s+"
SPECIAL_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
CLEAN_UP = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m")]
CLEAN_UP += [(" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]
# Size limits of the files read here, well above real ones: the JSON configs are KBs (SAIL-VL2's
# tokenizer_config.json is 7 KB), Qwen's tokenizer.json 11 MB, its vocab.json 2.8 MB and merges.txt 1.7 MB.
TOKENIZER_FILES = (  # every file a tokenizer may be read from, each checked by checkpoint.paths.inside first
    "tokenizer_config.json", "tokenizer.json", "added_tokens.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.json", "merges.txt",
)  # fmt: skip
MAX_JSON_BYTES = 16 << 20
MAX_VOCAB_BYTES = 64 << 20
MAX_TOKEN_ID = (1 << 31) - 1  # ids index an embedding table: non-negative int32
MAX_ADDED_TOKENS = 1 << 16  # real checkpoints add a few hundred; the added-token regex compiles in ~3 s at this size


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`: drop the space before punctuation and English contractions."""
    for before, after in CLEAN_UP:
        text = text.replace(before, after)
    return text


@dataclass(frozen=True)
class AddedToken:
    content: str
    special: bool = False  # the flag in added_tokens_decoder; skipping follows the special-token list instead
    lstrip: bool = False  # eats the whitespace on its left when encoding
    rstrip: bool = False  # eats the whitespace on its right


class Tokenizer:
    """Encode and decode like the checkpoint's slow transformers tokenizer. Build it with `load_tokenizer`."""

    # What the slow classes change; the subclasses below set them.
    nfc_first = False  # normalize the whole text before cutting out added tokens
    adds_bos_eos = True  # honours add_bos_token / add_eos_token
    default_add_bos = False
    defaults: dict[str, str] = {}  # special tokens of the class's __init__, used when the config has none
    space_before_special = ""  # convert_tokens_to_string: "run" (before each run), "not_first", or none
    clean_up_runs = False  # convert_tokens_to_string always cleans up
    join_with_spaces = False  # _decode's spaces_between_special_tokens default

    def __init__(self, backend: Backend, base_size: int, added: dict[int, AddedToken], special: dict[str, str | None],
                 additional: list[str], config: dict, spm: SentencePieceModel | None = None):  # fmt: skip
        self._backend = backend  # the base model: text without added tokens <-> ids below base_size
        self._spm = spm  # for SentencePiece: ids to pieces (a hidden piece is not in the backend) and exact decoding
        self._spm_decode = sentencepiece.PieceDecoder(spm) if spm else None
        self.vocab_size = base_size
        self._added = dict(sorted(added.items()))
        self._added_ids = {token.content: token_id for token_id, token in self._added.items()}
        self._special = {key: special.get(key) for key in SPECIAL_ATTRIBUTES}
        self.special_tokens = list(dict.fromkeys([t for t in self._special.values() if t] + additional))
        listed = set(self.special_tokens)
        self._special_ids = {self._added_ids[token] for token in self.special_tokens}
        # decoded on their own: added tokens not listed as special, and listed additional ones past the vocab
        self._standalone_ids = {i for i, t in self._added.items() if t.content not in listed}
        self._standalone_ids |= {i for i in map(self._added_ids.get, additional) if i >= base_size}
        contents = sorted(self._added_ids, key=len, reverse=True)  # at one position the longest match wins
        self._added_pattern = re.compile("|".join(map(re.escape, contents))) if contents else None
        self.add_bos_token = self.adds_bos_eos and bool(config.get("add_bos_token", self.default_add_bos))
        self.add_eos_token = self.adds_bos_eos and bool(config.get("add_eos_token", False))
        self._clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False))

    def __len__(self) -> int:
        """All ids: the base vocabulary plus the added tokens past it."""
        return self.vocab_size + sum(1 for token_id in self._added if token_id >= self.vocab_size)

    def token_to_id(self, token: str | None) -> int | None:
        if token is None or token in self._added_ids:
            return self._added_ids.get(token)
        token_id = self._backend.token_to_id(token)
        return token_id if token_id is not None and token_id < self.vocab_size else None

    def id_to_token(self, token_id: int) -> str | None:
        if token_id in self._added:
            return self._added[token_id].content
        if not 0 <= token_id < self.vocab_size:
            return None
        return self._spm.pieces[token_id].text if self._spm else self._backend.id_to_token(token_id)

    def convert_ids_to_tokens(self, ids) -> list[str]:
        return [self.id_to_token(token_id) for token_id in self._check_ids(ids)]

    @property
    def added_tokens(self) -> dict[int, AddedToken]:
        return dict(self._added)

    @property
    def special_token_ids(self) -> set[int]:
        """The ids `decode(skip_special_tokens=True)` drops."""
        return set(self._special_ids)

    bos_token = property(lambda self: self._special["bos_token"])
    eos_token = property(lambda self: self._special["eos_token"])
    pad_token = property(lambda self: self._special["pad_token"])
    unk_token = property(lambda self: self._special["unk_token"])
    bos_token_id = property(lambda self: self.token_to_id(self.bos_token))
    eos_token_id = property(lambda self: self.token_to_id(self.eos_token))
    pad_token_id = property(lambda self: self.token_to_id(self.pad_token))
    unk_token_id = property(lambda self: self.token_to_id(self.unk_token))

    def encode(self, text: str, *, add_special_tokens: bool = True, split_special_tokens: bool = False) -> list[int]:
        """`tokenizer(text).input_ids`; `add_special_tokens` adds BOS / EOS as the checkpoint says."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode() takes a str, not {type(text).__name__}")
        if self.nfc_first:
            text = unicodedata.normalize("NFC", text)
        parts = [text] if split_special_tokens else self._split_added(text)
        ids = []
        for part in parts:
            if isinstance(part, int):
                ids.append(part)
            elif part:  # not encode_batch: once its thread pool ran, forked workers (DataLoader) print warnings
                ids += _guarded(
                    "encoding with this tokenizer",
                    lambda part=part: self._backend.encode(part, add_special_tokens=False).ids,
                )
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        if add_special_tokens and self.add_eos_token and self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        return ids

    def _split_added(self, text: str) -> list[str | int]:
        """Text pieces and added-token ids, alternating (pieces may be empty), lstrip / rstrip applied."""
        if self._added_pattern is None:
            return [text]
        parts: list = []
        start = 0
        for match in self._added_pattern.finditer(text):
            parts += [text[start : match.start()], self._added_ids[match.group()]]
            start = match.end()
        parts.append(text[start:])
        for i in range(1, len(parts), 2):
            if self._added[parts[i]].lstrip:
                parts[i - 1] = parts[i - 1].rstrip()
            if self._added[parts[i]].rstrip:
                parts[i + 1] = parts[i + 1].lstrip()
        return parts

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        """`tokenizer.decode(ids, skip_special_tokens=...)` of the slow tokenizer (its `_decode`)."""
        sub_texts, run = [], []  # run: base tokens and listed special tokens, converted together
        for token_id in self._check_ids(ids):
            if skip_special_tokens and token_id in self._special_ids:
                continue
            if token_id not in self._standalone_ids:
                run.append(token_id)
                continue
            if run and (text := self._run_to_text(run)):
                sub_texts.append(text)
            sub_texts.append(self._added[token_id].content)
            run = []
        if run:
            sub_texts.append(self._run_to_text(run))
        text = (" " if self.join_with_spaces else "").join(sub_texts)
        return clean_up_tokenization(text) if self._clean_up_spaces else text

    def _run_to_text(self, run: list[int]) -> str:
        """The class's `convert_tokens_to_string`: base tokens decoded together, special tokens as written."""
        out, pieces, prev_special = "", [], False
        for i, token_id in enumerate(run):
            if token_id not in self._added:  # in a run, the added tokens are exactly the special ones
                pieces.append(token_id)
                prev_special = False
                continue
            opens_run = not prev_special and (i > 0 or self.space_before_special == "run")
            space = " " if self.space_before_special and opens_run else ""
            out += space + self._base_text(pieces) + self._added[token_id].content
            pieces, prev_special = [], True
        out += self._base_text(pieces)
        return clean_up_tokenization(out) if self.clean_up_runs else out

    def _base_text(self, pieces: list[int]) -> str:
        if not pieces:
            return ""
        return self._spm_decode(pieces) if self._spm_decode else self._backend.decode(pieces, skip_special_tokens=True)

    def _check_ids(self, ids) -> list[int]:
        try:
            ids = [operator.index(token_id) for token_id in ids]
        except TypeError as exc:
            raise TokenizerError(f"token ids must be a sequence of ints ({exc})") from exc
        for token_id in ids:
            if not (0 <= token_id < self.vocab_size or token_id in self._added):
                raise TokenizerError(f"token id {token_id} is not in this tokenizer (it has {len(self)} ids)")
        return ids


class Qwen2Tokenizer(Tokenizer):
    nfc_first = True
    adds_bos_eos = False
    defaults = {"unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}


class InternLM2Tokenizer(Tokenizer):
    default_add_bos = True
    defaults = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>"}
    space_before_special, clean_up_runs, join_with_spaces = "run", True, True


class LlamaTokenizer(Tokenizer):
    default_add_bos = True
    defaults = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
    space_before_special, join_with_spaces = "not_first", True


CLASSES = {cls.__name__: cls for cls in (Qwen2Tokenizer, InternLM2Tokenizer, LlamaTokenizer)}


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a checkpoint folder, as `AutoTokenizer.from_pretrained(path, use_fast=False)`."""
    folder = Path(path)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise TokenizerError(f"tokenizer folder {folder} {what}: pass the checkpoint folder with the tokenizer files")
    for name in TOKENIZER_FILES:  # a file linked out of the folder is refused before anything is read
        inside(folder, name, "a tokenizer file")
    config_path = folder / "tokenizer_config.json"
    config = _read_object(config_path)
    backend, base_size, spm, added = _base_model(folder)
    name = str(config.get("tokenizer_class") or "").removesuffix("Fast")
    cls = CLASSES.get(name) or (LlamaTokenizer if spm else Tokenizer)

    special = {key: _content(config[key], config_path, key) if key in config else cls.defaults.get(key)
               for key in SPECIAL_ATTRIBUTES}  # fmt: skip
    additional = _additional(config, config_path)
    if "added_tokens_decoder" in config:  # then the slow tokenizer reads no other file (tokenizer.json's are ignored)
        added = _added_tokens_decoder(config["added_tokens_decoder"], config_path)
    else:  # the legacy files, read as PreTrainedTokenizerBase._from_pretrained reads them
        map_path = folder / "special_tokens_map.json"
        special_map = _read_object(map_path)
        special |= {
            key: _content(value, map_path, key) for key, value in special_map.items() if key in SPECIAL_ATTRIBUTES
        }
        additional += [t for t in _additional(special_map, map_path) if t not in additional]
        listed = set(additional) | set(special.values())
        legacy = _added_tokens_json(folder / "added_tokens.json")
        added = {i: AddedToken(content, special=content in listed) for content, i in legacy.items()} | added
    # as the slow __init__ does: special tokens not added yet are added, at their vocabulary id or past the end
    contents, next_id = {t.content for t in added.values()}, max([base_size - 1, *added]) + 1
    for token in [t for t in special.values() if t] + additional:
        if token not in contents:
            token_id = _guarded(f"{folder}: the tokenizer files", lambda token=token: backend.token_to_id(token))
            if token_id is None or token_id >= base_size:
                token_id, next_id = next_id, next_id + 1
            added[token_id] = AddedToken(token, special=True)
            contents.add(token)
    if len(added) > MAX_ADDED_TOKENS:
        raise TokenizerError(
            f"{folder}: {len(added)} added tokens, more than the {MAX_ADDED_TOKENS} minisail accepts (real checkpoints "
            "add a few hundred): use the tokenizer files of the checkpoint's repository"
        )
    return cls(backend, base_size, added, special, additional, config, spm)


def _guarded(what: str, call):
    """`call()`, a call into `tokenizers`, with any failure of it turned into TokenizerError naming `what`.

    The Rust library reports bad data by raising a bare Exception or by panicking; pyo3 turns a panic into
    PanicException, a BaseException (so `except Exception` misses it). Only Ctrl-C and exit pass through.
    """
    try:
        return call()
    except (KeyboardInterrupt, SystemExit, TokenizerError):
        raise
    except BaseException as exc:  # noqa: BLE001 -- pyo3's PanicException derives from BaseException
        raise TokenizerError(
            f"{what} made the tokenizers library fail ({type(exc).__name__}: {exc}); the file is probably corrupt: "
            "download it again from the checkpoint's repository"
        ) from None


def _base_model(folder: Path):
    """(backend, base vocabulary size, the SentencePiece model or None, tokenizer.json's added tokens)."""
    if (folder / "tokenizer.json").is_file():
        _check_size(folder / "tokenizer.json", MAX_VOCAB_BYTES)
        backend, added = _read_tokenizer_json(folder / "tokenizer.json")
        return backend, backend.get_vocab_size(with_added_tokens=False), None, added
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        _check_size(folder / "vocab.json", MAX_VOCAB_BYTES)
        _check_size(folder / "merges.txt", MAX_VOCAB_BYTES)
        backend = _qwen2_bpe(folder / "vocab.json", folder / "merges.txt")
        return backend, backend.get_vocab_size(with_added_tokens=False), None, {}
    if (folder / "tokenizer.model").is_file():
        path = folder / "tokenizer.model"
        model = sentencepiece_model.read_model(path)  # bounded: size, pieces, lengths, charsmap
        backend = _guarded(str(path), lambda: sentencepiece.build_backend(model, str(path)))
        return backend, len(model.pieces), model, {}
    raise TokenizerError(
        f"{folder} has no tokenizer files (tokenizer.json, vocab.json + merges.txt, or tokenizer.model): "
        "copy them from the checkpoint's repository"
    )


def _check_size(path: Path, limit: int) -> None:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise TokenizerError(f"cannot read {path}: {exc}") from None
    if size > limit:
        raise TokenizerError(
            f"{path} is {size} bytes, more than the {limit >> 20} MiB a tokenizer file may be (real ones are a few "
            "MB): use the file of the checkpoint's repository"
        )


def _read_json(path: Path):
    if not path.is_file():
        return None
    _check_size(path, MAX_JSON_BYTES)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise TokenizerError(f"cannot read {path} ({exc}): copy it again from the checkpoint's repository") from exc


def _read_object(path: Path) -> dict:
    """A JSON config that must be an object; {} if the file is absent."""
    value = _read_json(path)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TokenizerError(
            f"{path} is not a JSON object (it holds a {type(value).__name__}): copy it again from the checkpoint"
        )
    return value


def _content(token, path: Path, key: str) -> str | None:
    """A special token as tokenizer_config writes it: a string, null, or an AddedToken object."""
    if token is None or isinstance(token, str):
        return token
    if isinstance(token, dict) and isinstance(token.get("content"), str):
        return token["content"]
    raise TokenizerError(
        f"{path}: {key} is {_short(token)}; a special token must be a string or an object with a 'content' string"
    )


def _additional(config: dict, path: Path) -> list[str]:
    """`additional_special_tokens`: a list of tokens. A string is refused (iterating it would give characters)."""
    value = config.get("additional_special_tokens")
    if value is None:
        return []
    if not isinstance(value, list):
        raise TokenizerError(
            f"{path}: additional_special_tokens is {_short(value)}, not a list; write it as a JSON list of tokens, "
            'e.g. ["<img>", "</img>"]'
        )
    tokens = [_content(token, path, "additional_special_tokens") for token in value]
    if None in tokens:
        raise TokenizerError(f"{path}: additional_special_tokens holds null; list only tokens")
    return tokens


def _token_id(value, path: Path, token, *, key: bool = False) -> int:
    """An id from a config: an int in [0, MAX_TOKEN_ID] (a JSON object key: its decimal string)."""
    if key and isinstance(value, str) and re.fullmatch(r"[0-9]{1,10}", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKEN_ID:
        raise TokenizerError(
            f"{path}: the id of {_short(token)} is {_short(value)}; ids are whole numbers from 0 to {MAX_TOKEN_ID}"
        )
    return value


def _added_tokens_decoder(entries, path: Path) -> dict[int, AddedToken]:
    if not isinstance(entries, dict):
        raise TokenizerError(f"{path}: added_tokens_decoder is {_short(entries)}, not an object of id -> token")
    return {_token_id(i, path, entry, key=True): _added_token(entry, path) for i, entry in entries.items()}


def _added_tokens_json(path: Path) -> dict[str, int]:
    legacy = _read_object(path)
    return {content: _token_id(i, path, content) for content, i in legacy.items()}


def _added_token(entry, path: Path) -> AddedToken:
    if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
        raise TokenizerError(
            f"{path}: unexpected added token entry {_short(entry)}: expected an object with a 'content' string"
        )
    if entry.get("single_word"):
        raise TokenizerError(f"added token {entry['content']!r} is single_word, which minisail does not support")
    return AddedToken(entry["content"], *(bool(entry.get(key, False)) for key in ("special", "lstrip", "rstrip")))


def _short(value, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters: an error message names the value without printing megabytes."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_tokenizer_json(path: Path) -> tuple[Backend, dict[int, AddedToken]]:
    """The base model of a tokenizer.json, and its added tokens apart (handled like the config's)."""
    try:
        loaded = Backend.from_file(str(path))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 -- a bare Exception for an unreadable file, or a pyo3 panic
        raise TokenizerError(
            f"{path} is not a valid tokenizer.json ({exc}): it is probably truncated; download it again from the "
            "checkpoint's repository"
        ) from exc
    added = loaded.get_added_tokens_decoder()
    added = {i: AddedToken(t.content, t.special, t.lstrip, t.rstrip) for i, t in added.items()}
    backend = Backend(loaded.model)  # shares the model, without the added-token matching
    backend.normalizer, backend.pre_tokenizer, backend.decoder = loaded.normalizer, loaded.pre_tokenizer, loaded.decoder
    return backend, added


def _qwen2_bpe(vocab: Path, merges: Path) -> Backend:
    """Qwen2Tokenizer's pipeline: NFC, Qwen's split regex, byte-level BPE (what Qwen's tokenizer.json holds)."""
    try:
        backend = Backend(models.BPE.from_file(str(vocab), str(merges)))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 -- a bare Exception for an unreadable file, or a pyo3 panic
        raise TokenizerError(
            f"cannot read the BPE vocabulary {vocab} / {merges} ({exc}): copy them again from the checkpoint"
        ) from exc
    backend.normalizer = normalizers.NFC()
    split = pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated")
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend
