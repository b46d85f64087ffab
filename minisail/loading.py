"""`minisail.load(path, *, dtype=None, device=None, quantize=None, tp=None)`: an official checkpoint folder -> a
ready model.

1. read config.json and pick the family module from its sub-configs (models/registry.py), then read the files
   the config points to (Yi-VL: the vision folder's own config.json), and check every value the math depends
   on (`read_model_config`, which `python -m minisail prompt --model` runs too: both refuse the same configs);
2. open the checkpoint's tensor table (headers only) and check that it numbers as many layers as the config
   says, then build the model on the meta device: no memory, no random init;
3. turn into `Int8Linear` (minisail/fast/int8.py) every Linear the checkpoint stores as bitsandbytes int8, and with
   `quantize="int8"` every Linear of the decoder layers; with `quantize="int4"` those into `Int4Linear`
   (minisail/fast/int4.py, group-wise int4; which Linears and why: fast/int4_checkpoint.py);
4. fill every parameter from the memory-mapped checkpoint through the family's weight map, strictly
   (checkpoint/loader.py), each value on its way through the hooks of fast/hooks.py: int8, floats cast to `dtype`
   (default: the checkpoint's own, bf16 for the releases), mapped pages given back, files read ahead;
5. move to `device`, switch to eval mode, and read the image-token id from the tokenizer files if present.

Int8 (weight-only; activations stay in `dtype`):
- A pre-quantised bitsandbytes LLM.int8 checkpoint (InternVL-Chat-V1-5-Int8) is recognised tensor by tensor:
  a Linear is int8 exactly when each official weight it reads has an `.SCB` companion, whatever the config's
  skip list says. Such a checkpoint always loads as int8 (never dequantised); `quantize` may be None.
- `quantize="int8"` quantises a float checkpoint's decoder-layer Linears (attention qkv/o, MLP gate_up/down,
  Mono's visual experts) and the output head, row by row as each tensor is read: what every generated token
  re-reads, where int8 halves (bf16) or quarters (fp32) the bytes streamed. Kept float: the embedding (a step reads
  one row of it), and the vision tower and projector. Those run once per image over hundreds of tokens, where
  weight-only int8 saves no time (the matmul is compute-bound) and would only perturb every image token.

Int4 (`quantize="int4"`, weight-only, groups of 64 inputs with a bf16 scale and zero each: 4.5 bits per weight):
the decoder-layer Linears, quantised as each tensor is read, so loading peaks near the int4 size; the output head
is int8 (fast/int8_checkpoint.py `head_quantized` says why). Fast on the CPU in bf16 (torch's int4 kernel, proven
per shape at load); elsewhere a plain dequantising path with the same numbers. Its error against the float model
is in the README ("Speed and memory").
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from minisail.checkpoint.loader import fill_from_checkpoint
from minisail.checkpoint.paths import inside
from minisail.checkpoint.source import checkpoint_dtype
from minisail.config import read_config
from minisail.errors import ConfigError, MinisailError
from minisail.fast.hooks import load_hooks
from minisail.fast.int4 import swap_in_int4_linears
from minisail.fast.int4_checkpoint import int4_linear_names
from minisail.fast.int8 import swap_in_int8_linears
from minisail.fast.int8_checkpoint import int8_linear_names
from minisail.models.registry import check_layer_counts, detect_family
from minisail.text.image_tokens import IMG_CONTEXT
from minisail.text.tokenizer_reader import MAX_VOCAB_BYTES, TOKENIZER_FILES

QUANTIZE = (None, "int8", "int4")  # what `load(..., quantize=)` accepts
DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or dtype in (*DTYPE_NAMES.values(), torch.float64):  # float64: references, in tests
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPE_NAMES:
        return DTYPE_NAMES[dtype.lower()]
    raise ConfigError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPE_NAMES)}")


def resolve_device(device) -> torch.device | None:
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"unknown device {device!r} ({error}): use cpu, cuda, cuda:N or mps") from None
    if device.type == "meta":  # a model there has shapes and no values: nothing could run
        raise ConfigError("device meta holds no values: load onto cpu, cuda, cuda:N or mps")
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}.get(device.type)
    if available is not None and not available():
        raise ConfigError(f"device {device} is not available on this machine (this torch build or hardware)")
    return device


@dataclass(frozen=True)
class ModelConfig:
    """A checkpoint folder's config, read and checked: what `load` builds from, before any weight is read."""

    family: ModuleType  # the family module (models/registry.py)
    config: dict  # config.json, completed with the files it points to (Yi-VL: vision_config from vit/<name>/)
    parsed: Any  # the family's config dataclass (InternVLConfig, YiVLConfig)


def read_model_config(path) -> ModelConfig:
    """config.json -> family + checked config; a ConfigError (or CheckpointError for a missing vision folder)
    for anything `load` would refuse on the config alone. Reads no weights."""
    folder = Path(path)
    config = read_config(folder)
    check_quantization_config(config)
    family = detect_family(config)
    config = family.complete_config(folder, config)
    return ModelConfig(family, config, family.parse(config))


def load(path, *, dtype=None, device=None, quantize=None, tp=None):
    """`tp` (optional): tensor parallel over a number of ranks (the default torch.distributed group, which must
    have that size) or a ProcessGroup: this process loads only its own slices (minisail/parallel/tensor.py)."""
    if quantize not in QUANTIZE:
        raise ConfigError(f"unknown quantize={quantize!r}: use None (as stored), 'int8' or 'int4' (decoder weights)")
    device = resolve_device(device)  # before anything is read: a bad device should not cost a load
    folder = Path(path)
    checked = read_model_config(folder)
    family, config, parsed = checked.family, checked.config, checked.parsed
    tensors = family.open_tensors(folder, config)  # headers only: the data stays on disk until the fill
    check_layer_counts(family, parsed, tensors)  # before the build, which loops over the layers
    if isinstance(tp, int) and not isinstance(tp, bool) and tp == 1:
        tp = None  # one rank: the plain model (as the CLI's --tp 1)
    if tp is not None:  # this rank's decoder config: its heads and MLP columns
        from minisail.parallel.tensor import DecoderShard, TensorParallel, shard_model

        tp = TensorParallel.resolve(tp)
        shard = DecoderShard(parsed.llm, tp.rank, tp.size)
        parsed = dataclasses.replace(parsed, llm=shard.local_config())
    with torch.device("meta"):
        model = family.build(parsed)
    keymap = family.weight_map(parsed)
    # The checkpoint's parameters the model uses (not the keys its weight map ignores: Yi-VL's unused tower copy),
    # counted from the headers whatever int8 / int4 or tensor parallelism make of them
    stored = sum(math.prod(tensors.shape(key)) for key in tensors.keys() if not keymap.is_ignored(key))
    if tp is not None:  # swap in the sharded modules; read only this rank's slices
        tensors = shard_model(model, shard, keymap, tensors, tp)
    bnb = "quantization_config" in config
    if quantize == "int4" and bnb:
        raise ConfigError(
            f"{folder}: the checkpoint is already quantised (bitsandbytes int8); quantize='int4' reads float "
            "checkpoints: load it with quantize=None"
        )
    int8_names = int8_linear_names(model, keymap, tensors, quantize, bnb=bnb)
    if tp is not None and (int8_names or quantize == "int4"):
        raise ConfigError("tensor parallel runs float weights only: int8/int4 (quantize=, or an int8 checkpoint) "
                          "is not supported with tp yet")  # fmt: skip
    swap_in_int8_linears(model, int8_names)
    if quantize == "int4":
        swap_in_int4_linears(model, int4_linear_names(model))
    dtype = resolve_dtype(dtype) or checkpoint_dtype(tensors)
    family.check_dtype(dtype)  # a family that cannot run in some dtype says so before any tensor is read
    if tp is not None:  # the ranks must hold parts of one model: same config, dtype, tensors (parallel/agree.py)
        from minisail.parallel.agree import check_ranks_agree, fingerprint

        check_ranks_agree(fingerprint(config, tensors, dtype), tp.group)
    fill_from_checkpoint(model, tensors, keymap, load_hooks(dtype, device))
    model.eval()
    model.tensor_parallel = tp  # None, or this rank's place
    model.checkpoint_folder = folder
    model.checkpoint_parameters = stored  # the checkpoint's parameters (a tied head once), for a log line
    if model.image_token_id is None or model.image_token_id >= 0:  # Yi-VL's -200 is its own, no tokenizer's token
        model.image_token_id = image_token_id_from_tokenizer(folder, model.image_token_id)
    return model


def check_quantization_config(config: dict) -> None:
    """A `quantization_config` must be bitsandbytes 8-bit (LLM.int8), the only quantised format minisail reads."""
    quantization = config.get("quantization_config")
    if quantization is None:
        return
    if not isinstance(quantization, dict):
        raise ConfigError(f"config.json: quantization_config must be an object, not {quantization!r}")
    method = quantization.get("quant_method", "bitsandbytes")  # configs from before transformers 4.33 lack it
    if method != "bitsandbytes" or quantization.get("load_in_4bit") or not quantization.get("load_in_8bit", True):
        raise ConfigError(
            f"config.json: quantization_config {quantization!r} is not bitsandbytes 8-bit; minisail reads float "
            "checkpoints and bitsandbytes LLM.int8 ones (InternVL-Chat-V1-5-Int8) only"
        )


def image_token_id_from_tokenizer(folder: Path, default):
    """<IMG_CONTEXT>'s id as the checkpoint's own tokenizer says (SAIL-VL2 hard-codes it upstream; we don't).

    The added-token tables are small JSON files: read them first rather than building the whole tokenizer.
    Every file is checked by `inside` first: a tokenizer file linked out of the folder is refused, not read.
    """
    for name in TOKENIZER_FILES:
        inside(folder, name, "a tokenizer file")
    for name, table in (("tokenizer_config.json", "added_tokens_decoder"), ("tokenizer.json", "added_tokens")):
        try:
            if (folder / name).stat().st_size > MAX_VOCAB_BYTES:
                continue  # load_tokenizer below refuses it with a message
            entries = json.loads((folder / name).read_text(encoding="utf-8")).get(table)
        except (OSError, ValueError, AttributeError, RecursionError):
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


def default_dtype(path, device=None) -> tuple[torch.dtype, str]:
    """What `Session` and `python -m minisail chat` run a checkpoint in when no dtype is given, and why.

    On a GPU or MPS: the checkpoint's own dtype. On the CPU: `fast.packing.cpu_default_dtype`'s rule (float32 where the
    CPU has no native bf16 and the float32 weights fit in memory). Reads config.json and the weight files'
    headers only."""
    from minisail.fast.packing import cpu_default_dtype
    from minisail.system import available_memory_bytes

    checked = read_model_config(path)  # the same checks as load: a config load refuses fails here first
    tensors = checked.family.open_tensors(Path(path), checked.config)
    stored = checkpoint_dtype(tensors)
    device = resolve_device(device)
    if device is not None and device.type != "cpu":
        return stored, f"{str(stored).removeprefix('torch.')}, as the checkpoint stores it"
    floats = [name for name in tensors.keys() if tensors.dtype(name).is_floating_point]
    float32_bytes = sum(4 * math.prod(tensors.shape(name)) for name in floats)
    return cpu_default_dtype(stored, float32_bytes, available_memory_bytes())
