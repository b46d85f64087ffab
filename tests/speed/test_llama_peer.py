"""llama.cpp as the benchmark's peer: the GGUF holds the very model minisail loads, and llama.cpp computes it.

Three layers, each running wherever its packages are:
- always: when llama.cpp is not compared, the report says why (--quick, --no-llama, not installed, no Qwen2);
- with `gguf` (the test extra): the GGUF written from the official checkpoint has llama.cpp's Qwen2 names,
  shapes, hyper-parameters and no vocabulary; F32 and BF16 hold the checkpoint's values bit for bit, Q8_0 / Q4_0
  within their formats' rounding step of each block of 32;
- with `llama_cpp` (the llama extra, built from source): llama.cpp's logits from the F32 GGUF equal minisail's
  float32 logits within the golden tolerance (1e-4; measured 3e-6 on logits of magnitude ~4 on the tiny preset,
  AVX-512 EPYC), which a wrong name, a transposed matrix or a missing bias would miss by orders of magnitude;
  and `python -m bench --llama` reports llama.cpp's figures and the ratios per format.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

import minisail
from bench import checkpoints, gguf_export
from bench.__main__ import main
from bench.presets import get_preset
from bench.runner import Settings, llama_peer
from minisail.checkpoint.files import open_safetensors_folder

HAS_GGUF = importlib.util.find_spec("gguf") is not None
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None and HAS_GGUF
needs_gguf = pytest.mark.skipif(not HAS_GGUF, reason="needs gguf (the test extra)")
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="needs llama-cpp-python (the llama extra)")


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The tiny preset's official bf16 checkpoint and its language model's tensors as float32."""
    folder = tmp_path_factory.mktemp("official")
    checkpoints.write_official(get_preset("tiny"), folder, seed=5)
    tensors = open_safetensors_folder(folder)
    return folder, {n: tensors.read(n).float() for n in tensors.keys() if n.startswith("language_model.")}


def llama_cpp_names(layers: int) -> dict[str, str]:
    """llama.cpp's Qwen2 names (llama-arch.cpp, convert_hf_to_gguf.py) for the official ones, written out here
    independently of gguf_export's table."""
    names = {
        "language_model.model.embed_tokens.weight": "token_embd.weight",
        "language_model.model.norm.weight": "output_norm.weight",
        "language_model.lm_head.weight": "output.weight",
    }
    parts = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for p in "qkv":
        parts[f"self_attn.{p}_proj.weight"], parts[f"self_attn.{p}_proj.bias"] = f"attn_{p}.weight", f"attn_{p}.bias"
    for i in range(layers):
        names.update({f"language_model.model.layers.{i}.{o}": f"blk.{i}.{g}" for o, g in parts.items()})
    return names


def read_gguf(path):
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return reader, fields, {t.name: t for t in reader.tensors}


def test_llama_cpp_runs_only_when_asked_installed_and_possible(monkeypatch):
    tiny = get_preset("tiny")
    assert "not asked for" in llama_peer(tiny, Settings.quick())  # CI's --quick never needs it
    assert "not asked for" in llama_peer(tiny, Settings(llama=False))
    assert "no Qwen2" in llama_peer(get_preset("mono-internvl-2b"), Settings())  # InternLM2 + visual experts
    assert "no Qwen2" in llama_peer(get_preset("internvl-chat-v1-5"), Settings())  # vision only
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    reason = llama_peer(tiny, Settings())
    assert "llama_cpp not installed" in reason and ".[llama]" in reason


@needs_gguf
def test_gguf_holds_the_official_language_model_under_llama_cpp_names(official, tmp_path):
    folder, weights = official
    config = get_preset("tiny").config["llm_config"]
    about = gguf_export.write_gguf(get_preset("tiny"), folder, tmp_path / "m.gguf", "F32")
    reader, fields, tensors = read_gguf(tmp_path / "m.gguf")
    names = llama_cpp_names(config["num_hidden_layers"])
    assert set(names) == set(weights)  # every language-model tensor of the checkpoint, nothing else
    assert set(tensors) == set(names.values()) and about["tensors"] == len(names)
    for name, gguf_name in names.items():
        t = tensors[gguf_name]
        assert t.tensor_type.name == "F32"
        assert list(t.shape[::-1]) == list(weights[name].shape)  # ggml lists dimensions innermost first
        assert np.array_equal(np.asarray(t.data).reshape(weights[name].shape), weights[name].numpy()), name
    assert fields["general.architecture"] == "qwen2" and fields["tokenizer.ggml.model"] == "none"
    want = {
        "qwen2.context_length": config["max_position_embeddings"],
        "qwen2.embedding_length": config["hidden_size"],
        "qwen2.block_count": config["num_hidden_layers"],
        "qwen2.feed_forward_length": config["intermediate_size"],
        "qwen2.attention.head_count": config["num_attention_heads"],
        "qwen2.attention.head_count_kv": config["num_key_value_heads"],
        "qwen2.vocab_size": config["vocab_size"],
        "general.file_type": 0,  # LLAMA_FTYPE_ALL_F32
    }
    assert {key: fields[key] for key in want} == want
    assert fields["qwen2.rope.freq_base"] == pytest.approx(config["rope_theta"])
    assert fields["qwen2.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"], rel=1e-6)


@needs_gguf
@pytest.mark.parametrize(
    ("type_name", "step"), [("BF16", 0.0), ("Q8_0", (0.5 + 127 * 2**-11) / 127), ("Q4_0", (1 + 8 * 2**-11) / 8)]
)
def test_each_file_type_holds_the_same_weights(official, tmp_path, type_name, step):
    """Norms and biases F32; every matrix in the file's type (a Q4_0 file's output head Q8_0): BF16 the
    checkpoint's bits, Q8_0 / Q4_0 within the rounding of each block of 32. Q8_0: half a step d = the block's
    largest |w| / 127, plus the float16 scale's rounding (2^-11 relative) times up to 127 steps. Q4_0: one step
    d = largest |w| / 8 (the end of its range opposite the largest value is clipped one step short), plus up to 8
    steps' scale rounding."""
    import gguf

    folder, weights = official
    about = gguf_export.write_gguf(get_preset("tiny"), folder, tmp_path / "m.gguf", type_name)
    _reader, fields, tensors = read_gguf(tmp_path / "m.gguf")
    assert fields["general.file_type"] == gguf_export.FILE_TYPES[type_name]
    names = llama_cpp_names(get_preset("tiny").config["llm_config"]["num_hidden_layers"])
    for name, gguf_name in names.items():
        t, want = tensors[gguf_name], weights[name].numpy()
        head = gguf_name == "output.weight" and type_name == "Q4_0"
        expected_type = "F32" if want.ndim == 1 else "Q8_0" if head else type_name
        assert t.tensor_type.name == expected_type, gguf_name
        if want.ndim == 1:
            assert np.array_equal(np.asarray(t.data), want)
            continue
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(want.shape)
        if type_name == "BF16":
            assert np.array_equal(got, want)
            continue
        blocks, error = want.reshape(-1, 32), np.abs(got - want).reshape(-1, 32)
        bound = (0.5 + 127 * 2**-11) / 127 if head else step
        assert (error <= bound * np.abs(blocks).max(axis=1, keepdims=True) + 1e-12).all(), gguf_name
        assert error.max() > 0  # it is quantized
    embed = weights["language_model.model.embed_tokens.weight"].shape
    row = tensors["token_embd.weight"].n_bytes // embed[0]
    assert about["decode_bytes"] == about["tensor_bytes"] - tensors["token_embd.weight"].n_bytes + row
    assert about["tensor_bytes"] == sum(int(t.n_bytes) for t in tensors.values())


@needs_gguf
def test_ggufs_are_cached_beside_the_checkpoints(tmp_path):
    preset = get_preset("tiny")
    folder = checkpoints.ensure_checkpoints(preset, tmp_path, transformers=False)["minisail"]
    made = gguf_export.ensure_gguf(preset, tmp_path, folder, "Q8_0")
    assert made == checkpoints.entry_folder(tmp_path, preset) / "gguf-Q8_0" and checkpoints.is_complete(made)
    stamp = (made / "model.gguf").stat().st_mtime_ns
    assert gguf_export.ensure_gguf(preset, tmp_path, folder, "Q8_0") == made
    assert (made / "model.gguf").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert gguf_export.about(made)["type"] == "Q8_0"
    assert gguf_export.about(made)["head_type"] == "Q8_0"


@needs_gguf
def test_a_q4_0_gguf_of_an_older_layout_is_rewritten(tmp_path):
    # Q4_0 files hold their head in Q8_0 since the int4 head became int8: a cached file with a Q4_0 head (or none
    # recorded) is written again, not compared with the new minisail.
    preset = get_preset("tiny")
    folder = checkpoints.ensure_checkpoints(preset, tmp_path, transformers=False)["minisail"]
    made = gguf_export.ensure_gguf(preset, tmp_path, folder, "Q4_0")
    assert gguf_export.about(made)["head_type"] == "Q8_0"
    about = gguf_export.about(made)
    del about["head_type"]
    (made / "about.json").write_text(json.dumps(about))
    gguf_export.ensure_gguf(preset, tmp_path, folder, "Q4_0")
    assert gguf_export.about(made)["head_type"] == "Q8_0"
    dead = checkpoints.entry_folder(tmp_path, preset) / ".gguf-Q8_0.partial-999999999"  # an interrupted run's
    dead.mkdir()
    checkpoints.tidy_cache(tmp_path)
    assert not dead.exists() and made.exists()


@needs_llama_cpp
def test_llama_cpp_computes_minisails_logits_from_the_f32_gguf(official, tmp_path):
    from bench.llama_side import LlamaCppModel

    folder, _weights = official
    gguf_export.write_gguf(get_preset("tiny"), folder, tmp_path / "m.gguf", "F32")
    ids = torch.randint(0, 999, (40,), generator=torch.Generator().manual_seed(0))  # 999: the image token
    # a float32 KV cache and no flash attention (which rounds to float16 on the CPU): float32 throughout
    llama = LlamaCppModel(tmp_path / "m.gguf", threads=2, context=64, batch=64, kv_f32=True)
    try:
        theirs = torch.from_numpy(llama.decode(ids.tolist(), 0, all_logits=True))
        # and position by position through the KV cache, as the benchmark decodes
        llama.clear()
        stepwise = [llama.decode([token], position)[0] for position, token in enumerate(ids.tolist())]
    finally:
        llama.close()
    with torch.inference_mode():
        ours = minisail.load(folder, dtype=torch.float32)(ids[None])[0]
    assert theirs.shape == ours.shape == (40, 1000)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(np.stack(stepwise)), ours, atol=1e-4, rtol=1e-4)


@needs_llama_cpp
def test_bench_compares_with_llama_cpp_per_format(tmp_path, capsys):
    argv = ["--preset", "tiny", "--quick", "--llama", "--dtype", "bf16", "--dtype", "int8", "--no-transformers"]
    assert main([*argv, "--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])
    assert report["llama_cpp_skipped"] is None and report["machine"]["llama_cpp"]
    assert report["machine"]["isa"]  # every figure with the CPU's ISA
    for dtype, kind in (("bf16", "BF16"), ("int8", "Q8_0")):
        theirs = report["results"][dtype]["llama.cpp"]
        assert theirs["prefill_s"] > 0 and theirs["decode_tok_s"] > 0 and theirs["ttft_s"] > 0
        assert theirs["vision_1tile_s"] is None  # llama.cpp has no vision tower
        ratios = report["ratios_vs_llama_cpp"][dtype]
        assert ratios["format"] == kind and ratios["prefill_s"] > 0 and ratios["decode_tok_s"] > 0
        ours = report["results"][dtype]["minisail"]
        assert ratios["decode_tok_s"] == pytest.approx(ours["decode_tok_s"] / theirs["decode_tok_s"], abs=1e-3)
        assert f"{dtype}_decode_vs_llama_cpp_{kind}" in report["targets"]
        notes = report["notes"][dtype]
        assert notes["llama.cpp_type"] == kind and notes["llama.cpp_decode_gb"] > 0
        assert "CPU" in notes["llama.cpp_system_info"] and notes["interleaved"] is True
    assert "vs Q8_0" in "\n".join(out[:-1])
