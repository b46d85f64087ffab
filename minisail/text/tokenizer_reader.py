"""Reading a checkpoint's tokenizer files: bounded, type-checked, and turned into a `tokenizers` base model.

What a model repository ships, read as transformers' `PreTrainedTokenizerBase._from_pretrained` (4.44,
tokenization_utils_base.py) reads it:
- the base model: `tokenizer.json` if present, else `vocab.json` + `merges.txt` (Qwen2 byte-level BPE, the
  pipeline of tokenization_qwen2.py), else a SentencePiece `tokenizer.model` (read by
  `minisail.text.sentencepiece_model`, built into a pipeline by `minisail.text.sentencepiece`);
- `tokenizer_config.json`: the class, `added_tokens_decoder`, the special tokens, `add_bos_token`; the older
  `added_tokens.json` + `special_tokens_map.json` when it has no `added_tokens_decoder`.
`minisail.text.tokenizer.load_tokenizer` puts these together into a Tokenizer.

Tokenizer files are untrusted input: every file is checked by `checkpoint.paths.inside` before anything is
read, each is read only up to a documented size (MAX_JSON_BYTES for the JSON configs, MAX_VOCAB_BYTES for
tokenizer.json / vocab.json / merges.txt), every config field is type-checked (a string where a list belongs
is refused, not split into characters), and every call into `tokenizers` that builds or runs a base model
goes through `call_tokenizers`, which turns its errors, including Rust panics (pyo3's PanicException is a
BaseException), into TokenizerError.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from minisail.checkpoint.paths import inside
from minisail.errors import TokenizerError
from minisail.text import sentencepiece, sentencepiece_model

# Qwen2Tokenizer's PRETOKENIZE_REGEX (the same pattern is in Qwen's tokenizer.json)
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
QWEN2_SPLIT += r"|\s*[\r\n]+|\s+(?!\S)|\s+"
# Size limits of the files read here, well above real ones: the JSON configs are KBs (SAIL-VL2's
# tokenizer_config.json is 7 KB), Qwen's tokenizer.json 11 MB, its vocab.json 2.8 MB and merges.txt 1.7 MB.
TOKENIZER_FILES = (  # every file a tokenizer may be read from, each checked by checkpoint.paths.inside first
    "tokenizer_config.json", "tokenizer.json", "added_tokens.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.json", "merges.txt",
)  # fmt: skip
MAX_JSON_BYTES = 16 << 20
MAX_VOCAB_BYTES = 64 << 20
MAX_TOKEN_ID = (1 << 31) - 1  # ids index an embedding table: non-negative int32


@dataclass(frozen=True)
class AddedToken:
    """A token added to the base model, with the flags tokenizer_config.json (or tokenizer.json) gives it."""

    content: str
    special: bool = False  # the flag in added_tokens_decoder; skipping follows the special-token list instead
    lstrip: bool = False  # eats the whitespace on its left when encoding
    rstrip: bool = False  # eats the whitespace on its right


def check_tokenizer_folder(path: str | Path) -> Path:
    """The folder, once it exists and no tokenizer file in it is linked out of it (checked before any reading)."""
    folder = Path(path)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise TokenizerError(f"tokenizer folder {folder} {what}: pass the checkpoint folder with the tokenizer files")
    for name in TOKENIZER_FILES:
        inside(folder, name, "a tokenizer file")
    return folder


def call_tokenizers(what: str, call):
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


def read_base_model(folder: Path):
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
        backend = call_tokenizers(str(path), lambda: sentencepiece.build_backend(model, str(path)))
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


def read_object(path: Path) -> dict:
    """A JSON config that must be an object; {} if the file is absent."""
    value = _read_json(path)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TokenizerError(
            f"{path} is not a JSON object (it holds a {type(value).__name__}): copy it again from the checkpoint"
        )
    return value


def token_content(token, path: Path, key: str) -> str | None:
    """A special token as tokenizer_config writes it: a string, null, or an AddedToken object."""
    if token is None or isinstance(token, str):
        return token
    if isinstance(token, dict) and isinstance(token.get("content"), str):
        return token["content"]
    raise TokenizerError(
        f"{path}: {key} is {_short(token)}; a special token must be a string or an object with a 'content' string"
    )


def additional_special_tokens(config: dict, path: Path) -> list[str]:
    """`additional_special_tokens`: a list of tokens. A string is refused (iterating it would give characters)."""
    value = config.get("additional_special_tokens")
    if value is None:
        return []
    if not isinstance(value, list):
        raise TokenizerError(
            f"{path}: additional_special_tokens is {_short(value)}, not a list; write it as a JSON list of tokens, "
            'e.g. ["<img>", "</img>"]'
        )
    tokens = [token_content(token, path, "additional_special_tokens") for token in value]
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


def added_tokens_decoder(entries, path: Path) -> dict[int, AddedToken]:
    if not isinstance(entries, dict):
        raise TokenizerError(f"{path}: added_tokens_decoder is {_short(entries)}, not an object of id -> token")
    return {_token_id(i, path, entry, key=True): _added_token(entry, path) for i, entry in entries.items()}


def added_tokens_json(path: Path) -> dict[str, int]:
    legacy = read_object(path)
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
