"""The benchmark's language model as a GGUF file for llama.cpp: the same random weights, llama.cpp's names.

    <cache>/<preset>-v<FORMAT>/gguf-<TYPE>/model.gguf   TYPE = F32, BF16, Q8_0 or Q4_0 (+ about.json, COMPLETE)

Written with the `gguf` package (llama.cpp's own Python writer, `pip install gguf`) from the official bf16
checkpoint of checkpoints.py, so llama.cpp computes the very model minisail loads: a Qwen2 language model
(architecture "qwen2", as llama.cpp's convert_hf_to_gguf.py writes one). Only the language model: llama.cpp has
no InternViT, so vision is never compared with it.

- Names: `gguf_names()` is one minisail `KeyMap` (targets: the official names; sources: llama.cpp's), like
  hf_names.py's tables: `token_embd`, `blk.N.attn_norm`, `blk.N.attn_{q,k,v}` (+ biases), `blk.N.attn_output`,
  `blk.N.ffn_norm`, `blk.N.ffn_{gate,up,down}`, `output_norm`, `output`. Matrices keep their [out, in] layout
  (the writer stores dimensions innermost first, which is llama.cpp's {in, out}); Qwen2's rotary embedding is
  llama.cpp's NEOX kind, so q and k need no permutation.
- Hyper-parameters: `qwen2.{context_length, embedding_length, block_count, feed_forward_length,
  attention.head_count, attention.head_count_kv, rope.freq_base, attention.layer_norm_rms_epsilon, vocab_size}`.
- No vocabulary: `tokenizer.ggml.model = "none"` (llama.cpp then creates `vocab_size` nameless tokens). The
  benchmark feeds token ids, never text, so both sides process the same ids.
- Types per file: every matrix (the embedding included) in the file's type, norms and biases F32; the output head
  too, except in a Q4_0 file, where it is Q8_0 (`HEAD_TYPES`). llama.cpp's own quantizer gives a Q4_0 model a
  higher-precision head as well (Q6_K, which the `gguf` package cannot write), and minisail's int4 keeps its head
  in int8 rows: so both sides stream about the same bytes. BF16 is the checkpoint's bits; F32 their exact
  widening; Q8_0 / Q4_0 (blocks of 32 with a float16 scale) by the `gguf` package's numpy quantizer, which rounds
  as llama.cpp's reference quantizer does. about.json records the bytes one decode step reads from the file
  (`decode_bytes`), so the report can say who reads more.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from bench.checkpoints import _build, entry_folder, is_complete, log
from bench.presets import Preset
from minisail.checkpoint.files import open_safetensors_folder
from minisail.checkpoint.keymaps import KeyMap, Rule

# The bench's dtype -> the llama.cpp file type it is compared with.
GGUF_TYPES = {"fp32": "F32", "bf16": "BF16", "int8": "Q8_0", "int4": "Q4_0"}
FILE_TYPES = {"F32": 0, "BF16": 32, "Q8_0": 7, "Q4_0": 2}  # llama.cpp's llama_ftype (LLAMA_FTYPE_ALL_F32, ...)
HEAD_TYPES = {"Q4_0": "Q8_0"}  # the output head's type where it is not the file's (see the module docstring)
HEAD = "output.weight"
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION: the block layouts this writer produces


def gguf_names(official: str = "language_model.") -> KeyMap:
    """The official Qwen2 language model's names (targets) <-> llama.cpp's GGUF names (sources)."""
    layer = f"{official}model.layers.{{i}}."
    rules = [
        Rule(f"{official}model.embed_tokens.weight", ("token_embd.weight",)),
        Rule(f"{official}model.norm.weight", ("output_norm.weight",)),
        Rule(f"{official}lm_head.weight", ("output.weight",)),
        Rule(f"{layer}input_layernorm.weight", ("blk.{i}.attn_norm.weight",)),
        Rule(f"{layer}post_attention_layernorm.weight", ("blk.{i}.ffn_norm.weight",)),
        Rule(f"{layer}self_attn.o_proj.*", ("blk.{i}.attn_output.*",)),
    ]
    rules += [Rule(f"{layer}self_attn.{p}_proj.*", (f"blk.{{i}}.attn_{p}.*",)) for p in "qkv"]
    rules += [Rule(f"{layer}mlp.{p}_proj.*", (f"blk.{{i}}.ffn_{p}.*",)) for p in ("gate", "up", "down")]
    return KeyMap(rules)


def supports(preset: Preset) -> bool:
    """llama.cpp gets the preset's language model when it is a Qwen2 (InternLM2 with visual experts: no)."""
    return preset.has_llm and preset.config["llm_config"].get("model_type") == "qwen2"


def _official_tensors(folder: Path) -> dict[str, tuple[str, object]]:
    """{gguf name: (official name, the checkpoint)} for every language-model tensor of the official folder."""
    tensors, names, out = open_safetensors_folder(folder), gguf_names(), {}
    for name in tensors.keys():
        if not name.startswith("language_model."):
            continue
        _rule, sources, _tied = names.resolve(name)
        out[sources[0]] = (name, tensors)
    return out


def tensor_type(name: str, ndim: int, type_name: str):
    """The GGML type of tensor `name` in a file of `type_name`: norms and biases (1-D) F32, the output head
    HEAD_TYPES', other matrices the file's."""
    import gguf

    if ndim == 1:
        return gguf.GGMLQuantizationType.F32
    return gguf.GGMLQuantizationType[HEAD_TYPES.get(type_name, type_name) if name == HEAD else type_name]


def _encode(name: str, weight: torch.Tensor, type_name: str) -> np.ndarray:
    """The bytes of one tensor as the file stores it (numpy: float32, bf16 bits as int16, or quantized blocks)."""
    import gguf

    qtype = tensor_type(name, weight.ndim, type_name)
    if qtype.name == "BF16":  # the checkpoint's own bits
        return weight.to(torch.bfloat16).view(torch.int16).numpy()
    if qtype.name == "F32":
        return weight.to(torch.float32).numpy()
    return gguf.quants.quantize(weight.to(torch.float32).numpy(), qtype)


def write_gguf(preset: Preset, official: Path, path: Path, type_name: str) -> dict:
    """The preset's language model from the official checkpoint in `official`, as one GGUF file at `path`.

    Tensors are converted one at a time as they are written (the writer needs only their sizes up front), so
    the peak memory is about one matrix, not the model. Returns about.json's content."""
    import gguf

    llm = preset.config["llm_config"]
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_name(f"minisail bench {preset.name} language model (random weights)")
    writer.add_file_type(FILE_TYPES[type_name])
    if type_name.startswith("Q"):
        writer.add_quantization_version(QUANTIZATION_VERSION)
    writer.add_context_length(int(llm["max_position_embeddings"]))
    writer.add_embedding_length(int(llm["hidden_size"]))
    writer.add_block_count(int(llm["num_hidden_layers"]))
    writer.add_feed_forward_length(int(llm["intermediate_size"]))
    writer.add_head_count(int(llm["num_attention_heads"]))
    writer.add_head_count_kv(int(llm["num_key_value_heads"]))
    writer.add_rope_freq_base(float(llm["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(llm["rms_norm_eps"]))
    writer.add_vocab_size(int(llm["vocab_size"]))
    writer.add_tokenizer_model("none")
    tensors = _official_tensors(official)
    infos = {}
    for gguf_name, (name, source) in tensors.items():  # every tensor's type and size first, then the data
        shape = tuple(source.shape(name))
        qtype = tensor_type(gguf_name, len(shape), type_name)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        infos[gguf_name] = (shape, qtype, int(np.prod(shape)) // block * size)
        writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), infos[gguf_name][2], raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for gguf_name, (name, source) in tensors.items():  # in the order of their infos
        writer.write_tensor_data(_encode(gguf_name, source.read(name), type_name))
    writer.close()
    total = sum(nbytes for _s, _q, nbytes in infos.values())
    shape, _q, embed = infos["token_embd.weight"]
    return {
        "type": type_name,
        "head_type": infos[HEAD][1].name,
        "tensor_bytes": total,
        "decode_bytes": total - embed + embed // shape[0],  # every matrix once, one row of the embedding
        "tensors": len(infos),
    }


def gguf_folder(preset: Preset, cache: Path, type_name: str) -> Path:
    return entry_folder(cache, preset) / f"gguf-{type_name}"


def ensure_gguf(preset: Preset, cache: Path, official: Path, type_name: str) -> Path:
    """The cached GGUF of the preset's language model in `type_name` (written if missing); its folder."""
    folder = gguf_folder(preset, cache, type_name)
    if is_complete(folder) and about(folder).get("head_type") != HEAD_TYPES.get(type_name, type_name):
        shutil.rmtree(folder)  # written by an earlier layout: the head's type has changed since
    if not is_complete(folder):
        log(f"writing the language model as a {type_name} GGUF for llama.cpp to {folder}")

    def write(tmp: Path) -> None:
        about = write_gguf(preset, official, tmp / "model.gguf", type_name)
        (tmp / "about.json").write_text(json.dumps(about, indent=2))

    return _build(folder.parent, folder.name, write)


def about(folder: Path) -> dict:
    return json.loads((Path(folder) / "about.json").read_text())
