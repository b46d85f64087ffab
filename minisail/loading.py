"""`minisail.load(path, *, dtype=None, device=None)`: an official checkpoint folder -> a ready model.

1. read config.json and pick the family from its sub-configs (models/registry.py), then read the files the
   config points to (Yi-VL: the vision folder's own config.json);
2. build the model on the meta device: no memory, no random init;
3. fill every parameter from the memory-mapped checkpoint through the family's weight map, strictly
   (checkpoint/loader.py), casting floats to `dtype` (default: the checkpoint's own, bf16 for the releases);
4. move to `device`, switch to eval mode, and read the image-token id from the tokenizer files if present.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from minisail.chat import bind_chat
from minisail.checkpoint.loader import checkpoint_dtype, fill_from_checkpoint
from minisail.config import read_config
from minisail.errors import ConfigError, MinisailError
from minisail.models.registry import detect_family

IMG_CONTEXT = "<IMG_CONTEXT>"

DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPE_NAMES:
        return DTYPE_NAMES[dtype.lower()]
    raise ConfigError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPE_NAMES)}")


def load(path, *, dtype=None, device=None):
    folder = Path(path)
    config = read_config(folder)
    family = detect_family(config)
    config = family.complete_config(folder, config)
    with torch.device("meta"):
        model = family.build(config)
    tensors = family.open_tensors(folder, config)
    dtype = resolve_dtype(dtype) or checkpoint_dtype(tensors)
    if hasattr(model, "check_dtype"):  # a family that cannot run in some dtype says so before any tensor is read
        model.check_dtype(dtype)
    fill_from_checkpoint(model, tensors, family.keymap(model), dtype)
    model.eval()
    if device is not None:
        model.to(device)
    model.checkpoint_folder = folder
    model.family = family.name
    model.image_token_id = image_token_id_from_tokenizer(folder, model.image_token_id)
    bind_chat(model)  # model.chat(tokenizer, pixel_values, question, generation_config) as upstream
    return model


def image_token_id_from_tokenizer(folder: Path, default):
    """<IMG_CONTEXT>'s id as the checkpoint's own tokenizer says (SAIL-VL2 hard-codes it upstream; we don't).

    The added-token tables are small JSON files: read them first rather than building the whole tokenizer.
    """
    for name, table in (("tokenizer_config.json", "added_tokens_decoder"), ("tokenizer.json", "added_tokens")):
        try:
            entries = json.loads((folder / name).read_text(encoding="utf-8")).get(table)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(entries, dict):  # {"151667": {"content": "<IMG_CONTEXT>", ...}}
            entries = [{"id": int(k), **v} for k, v in entries.items() if isinstance(v, dict) and k.isdigit()]
        for entry in entries or []:
            if isinstance(entry, dict) and entry.get("content") == IMG_CONTEXT and isinstance(entry.get("id"), int):
                return entry["id"]
    try:
        token_id = json.loads((folder / "added_tokens.json").read_text(encoding="utf-8")).get(IMG_CONTEXT)
        if isinstance(token_id, int):
            return token_id
    except (OSError, ValueError, AttributeError):
        pass
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return default
    try:  # e.g. a SentencePiece folder whose extra tokens live elsewhere: ask the tokenizer itself
        from minisail.text.tokenizer import load_tokenizer

        token_id = load_tokenizer(folder).token_to_id(IMG_CONTEXT)
    except MinisailError:
        return default
    return default if token_id is None else token_id
