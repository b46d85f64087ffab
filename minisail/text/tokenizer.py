"""A checkpoint's tokenizer, behaving like the slow transformers tokenizer the model cards load.

`load_tokenizer(folder)` reads the folder's tokenizer files (`minisail.text.tokenizer_reader`: the base model,
the added and special tokens, every file bounded and type-checked) and builds the Tokenizer of the class
`tokenizer_config.json` names.

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

import operator
import re
import unicodedata
from pathlib import Path

from tokenizers import Tokenizer as Backend

from minisail.errors import PromptError, TokenizerError
from minisail.text.sentencepiece import PieceDecoder
from minisail.text.sentencepiece_model import SentencePieceModel
from minisail.text.tokenizer_reader import (
    AddedToken,
    added_tokens_decoder,
    added_tokens_json,
    additional_special_tokens,
    call_tokenizers,
    check_tokenizer_folder,
    read_base_model,
    read_object,
    token_content,
)

SPECIAL_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
CLEAN_UP = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m")]
CLEAN_UP += [(" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]
MAX_ADDED_TOKENS = 1 << 16  # real checkpoints add a few hundred; the added-token regex compiles in ~3 s at this size


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`: drop the space before punctuation and English contractions."""
    for before, after in CLEAN_UP:
        text = text.replace(before, after)
    return text


def check_unicode(text: str) -> None:
    """Refuse text the tokenizers library cannot take (it would blame the tokenizer file): lone surrogates, which
    is how Python keeps bytes that were not UTF-8 (a terminal or file in another encoding, `surrogateescape`)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        char = text[error.start]
        shown = f"byte 0x{ord(char) - 0xDC00:02x}" if 0xDC80 <= ord(char) <= 0xDCFF else f"{char!r}"
        raise PromptError(
            f"the text is not valid Unicode at character {error.start} ({shown}: bytes that were not UTF-8): "
            "give the text in UTF-8 (e.g. a UTF-8 terminal or file)"
        ) from None


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
        self._spm_decode = PieceDecoder(spm) if spm else None
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
        check_unicode(text)
        if self.nfc_first:
            text = unicodedata.normalize("NFC", text)
        parts = [text] if split_special_tokens else self._split_added(text)
        ids = []
        for part in parts:
            if isinstance(part, int):
                ids.append(part)
            elif part:  # not encode_batch: once its thread pool ran, forked workers (DataLoader) print warnings
                ids += call_tokenizers(
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
    folder = check_tokenizer_folder(path)
    config_path = folder / "tokenizer_config.json"
    config = read_object(config_path)
    backend, base_size, spm, added = read_base_model(folder)
    name = str(config.get("tokenizer_class") or "").removesuffix("Fast")
    cls = CLASSES.get(name) or (LlamaTokenizer if spm else Tokenizer)

    special = {key: token_content(config[key], config_path, key) if key in config else cls.defaults.get(key)
               for key in SPECIAL_ATTRIBUTES}  # fmt: skip
    additional = additional_special_tokens(config, config_path)
    if "added_tokens_decoder" in config:  # then the slow tokenizer reads no other file (tokenizer.json's are ignored)
        added = added_tokens_decoder(config["added_tokens_decoder"], config_path)
    else:  # the legacy files, read as PreTrainedTokenizerBase._from_pretrained reads them
        map_path = folder / "special_tokens_map.json"
        special_map = read_object(map_path)
        special |= {
            key: token_content(value, map_path, key) for key, value in special_map.items() if key in SPECIAL_ATTRIBUTES
        }
        additional += [t for t in additional_special_tokens(special_map, map_path) if t not in additional]
        listed = set(additional) | set(special.values())
        legacy = added_tokens_json(folder / "added_tokens.json")
        added = {i: AddedToken(content, special=content in listed) for content, i in legacy.items()} | added
    # as the slow __init__ does: special tokens not added yet are added, at their vocabulary id or past the end
    contents, next_id = {t.content for t in added.values()}, max([base_size - 1, *added]) + 1
    for token in [t for t in special.values() if t] + additional:
        if token not in contents:
            token_id = call_tokenizers(f"{folder}: the tokenizer files", lambda token=token: backend.token_to_id(token))
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
