"""Checkpoint-form tokenizer folders for tests, rebuilt from the one compressed copy in tests/data/tokenizers/.

The repository keeps each real tokenizer file once (see tests/data/tokenizers/README.md):
- `sail-vl2/tokenizer.json.xz`: the genuine SAIL-VL2-2B tokenizer.json (Qwen3 + 9 InternVL image tokens);
- `internvl-internlm2/tokenizer.model.xz`: the genuine InternLM2 SentencePiece model;
- the small JSON configs of each folder, as they are.
Everything else is derived here, into a temporary folder, and checked byte for byte (sha256) against the
files of the shared data set:
- `vocab.json` and `merges.txt` are `model.vocab` / `model.merges` of that tokenizer.json;
- the InternVL Qwen2.5 tokenizer.json is the same file without Qwen3's four extra added tokens (151665..151668),
  the image tokens moving down to 151665..151673, serialized as `tokenizers` does (indent 2, UTF-8 kept).

Other tests reuse the folders through the session fixtures in conftest.py (`qwen25_tokenizer_dir`, ...).
"""

from __future__ import annotations

import functools
import hashlib
import json
import lzma
import shutil
from pathlib import Path

from helpers import paths

DATA = paths.DATA / "tokenizers"
CASES = paths.DATA / "tokenizer_cases.json"

# sha256 of every file of the shared folders (shared/data/tokenizers/<folder>/), which the rebuilt ones must match
SHA256 = {
    "internvl-qwen2.5": {
        "tokenizer.json": "6f9ba4b4a6625b5047a1356f6081b641c3e4e6a4a198facbd4bef217747d1685",
        "vocab.json": "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910",
        "merges.txt": "8831e4f1a044471340f7c0a83d7bd71306a5b867e95fd870f74d0c5308a904d5",
        "added_tokens.json": "e66b6bc948dec3421f01a8986f31632cf8d556aaa89f7b39c183b3dd4b5b2c83",
        "special_tokens_map.json": "1fa33547a5c7d8cf12b31e5bf57d1d57bcecc82a28f7a38912522f652ffef9b0",
        "tokenizer_config.json": "34c65a258cb0bcf36648ea68c337f35804eb737cdbf58e0f7eeae32a4ac84807",
    },
    "sail-vl2": {
        "tokenizer.json": "fc7a4004b65007afc1409bed6f57ca23287da9c8889b79974ba6ccb077d30eb9",
        "vocab.json": "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910",
        "merges.txt": "8831e4f1a044471340f7c0a83d7bd71306a5b867e95fd870f74d0c5308a904d5",
        "added_tokens.json": "e5c2531bd62d25dd2a7401203a20f7ffb0976a026299cb4d6ff2d559d7ac3e28",
        "chat_template.jinja": "b67524209115e55793a1f2b6e21a66b24d9e8b23df7f3bed9b55bf0827a0ef3e",
        "special_tokens_map.json": "76862e765266b85aa9459767e33cbaf13970f327a0e88d1c65846c2ddd3a1ecd",
        "tokenizer_config.json": "874e74814502ed9c682a3f3f7f7b622c5bc01bc0986afbc699051dacd533655d",
    },
    "internvl-internlm2": {
        "tokenizer.model": "f868398fc4e05ee1e8aeba95ddf18ddcc45b8bce55d5093bead5bbf80429b48b",
        "added_tokens.json": "df59e170102f8d19d3e186cc91c81006c9822ea9fe8ce2b68e7be77195c01db3",
        "special_tokens_map.json": "8102b9c2810564ad0f7d81ba7a5f11d2672ebc65e9ca9dfb57739bf32dd908bd",
        "tokenizer_config.json": "6c27d206776c54297a56cfa8fd59c3ac873e073f61ca1902944a61de5f25e092",
    },
}
QWEN3_ONLY_IDS = range(151665, 151669)  # <tool_response>, </tool_response>, <think>, </think>
IMAGE_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]


@functools.cache
def _sailvl2_tokenizer_json() -> str:
    return lzma.decompress((DATA / "sail-vl2" / "tokenizer.json.xz").read_bytes()).decode("utf-8")


@functools.cache
def _sailvl2_model() -> dict:
    return json.loads(_sailvl2_tokenizer_json())["model"]


def _qwen25_tokenizer_json() -> str:
    """Only the "added_tokens" list changes; it is re-serialized as json.dumps(indent=2) writes it at depth 1."""
    text = _sailvl2_tokenizer_json()
    start = text.index('"added_tokens": ') + len('"added_tokens": ')
    end = text.index("\n  ]", start) + len("\n  ]")
    tokens = json.loads(text[start:end])
    kept = [token for token in tokens if token["id"] < QWEN3_ONLY_IDS.start]
    image = [dict(token, id=QWEN3_ONLY_IDS.start + i) for i, token in enumerate(tokens[len(kept) + 4 :])]
    listing = json.dumps(kept + image, indent=2, ensure_ascii=False).replace("\n", "\n  ")
    return text[:start] + listing + text[end:]


def _derived_bytes(folder: str, name: str) -> bytes:
    if (DATA / folder / f"{name}.xz").is_file():
        return lzma.decompress((DATA / folder / f"{name}.xz").read_bytes())
    if name == "tokenizer.json":  # the Qwen2.5 one; SAIL-VL2's is stored
        return _qwen25_tokenizer_json().encode("utf-8")
    if name == "vocab.json":
        return json.dumps(_sailvl2_model()["vocab"], ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if name == "merges.txt":
        return ("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _sailvl2_model()["merges"])).encode("utf-8")
    return (DATA / folder / name).read_bytes()


def build_tokenizer_dir(folder: str, target: Path, *, tokenizer_json: bool = True) -> Path:
    """Write the checkpoint-form folder `folder` into `target` (without tokenizer.json if asked)."""
    target.mkdir(parents=True, exist_ok=True)
    for name, sha256 in SHA256[folder].items():
        if name == "tokenizer.json" and not tokenizer_json:
            continue
        data = _derived_bytes(folder, name)
        if hashlib.sha256(data).hexdigest() != sha256:
            raise AssertionError(f"rebuilt {folder}/{name} differs from the shared file (sha256 {sha256})")
        (target / name).write_bytes(data)
    return target


_built: dict[tuple, Path] = {}


def _cached_dir(tmp_path_factory, folder: str, tokenizer_json: bool = True) -> Path:
    key = (id(tmp_path_factory), folder, tokenizer_json)
    if key not in _built:
        suffix = "" if tokenizer_json else "-slow-files"
        _built[key] = build_tokenizer_dir(
            folder, tmp_path_factory.mktemp(folder + suffix), tokenizer_json=tokenizer_json
        )
    return _built[key]


def qwen25_tokenizer_dir(tmp_path_factory, *, tokenizer_json: bool = True) -> Path:
    """The SAIL-VL-2B-style Qwen2.5 folder (<IMG_CONTEXT> = 151667), image tokens listed as special."""
    return _cached_dir(tmp_path_factory, "internvl-qwen2.5", tokenizer_json)


def sailvl2_tokenizer_dir(tmp_path_factory, *, tokenizer_json: bool = True) -> Path:
    """The SAIL-VL2-2B folder (Qwen3, <IMG_CONTEXT> = 151671), image tokens special but not listed."""
    return _cached_dir(tmp_path_factory, "sail-vl2", tokenizer_json)


def internlm2_tokenizer_dir(tmp_path_factory) -> Path:
    """The InternVL-Chat-V1-5 / Mono-InternVL-2B folder (SentencePiece, <IMG_CONTEXT> = 92546)."""
    return _cached_dir(tmp_path_factory, "internvl-internlm2")


def relisted_copy(source: Path, target: Path, *, image_tokens_listed: bool) -> Path:
    """A copy of a folder whose config lists (or stops listing) the image tokens in additional_special_tokens."""
    shutil.copytree(source, target)
    config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    listed = [token for token in config["additional_special_tokens"] if token not in IMAGE_TOKENS]
    config["additional_special_tokens"] = listed + (IMAGE_TOKENS if image_tokens_listed else [])
    (target / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return target
