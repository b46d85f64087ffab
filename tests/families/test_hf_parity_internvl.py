"""Tiny random-config parity against transformers' native classes for the same math (the `parity` extra).

- InternVLVisionModel (transformers' port of InternViT, both the 300M LayerNorm variant and the 6B RMSNorm +
  qk-norm variant) against minisail's InternViT, hidden state by hidden state; its weights renamed to the
  official names by bench/hf_names.py, the table the benchmark uses the other way round.
- Qwen2ForCausalLM against minisail's decoder loaded through `minisail.load` from an official-layout checkpoint:
  logits of a left-padded batch, and greedy tokens with the KV cache against transformers' generate().
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers.checkpoints import randomize_  # noqa: E402
from helpers.hf_checkpoints import assert_padded_batch_matches, qwen2_checkpoint  # noqa: E402

import minisail  # noqa: E402
from bench.hf_names import intern_vit, to_official  # noqa: E402
from minisail.vision.intern_vit import InternViT, InternViTConfig  # noqa: E402


@pytest.mark.parametrize("variant", ["300m", "6b"])
def test_intern_vit_matches_transformers(variant):
    from transformers import InternVLVisionConfig, InternVLVisionModel

    six_b = variant == "6b"
    hf_config = InternVLVisionConfig(
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=96,
        image_size=[56, 56],
        patch_size=[14, 14],
        norm_type="rms_norm" if six_b else "layer_norm",
        use_qk_norm=six_b,
        attention_bias=not six_b,
        layer_norm_eps=1e-6,
        use_mean_pooling=True,
        attn_implementation="eager",
    )
    hf = randomize_(InternVLVisionModel(hf_config), seed=1).eval()
    ours = InternViT(
        InternViTConfig.from_config(
            {
                "hidden_size": 48,
                "num_attention_heads": 4,
                "num_hidden_layers": 3,
                "intermediate_size": 96,
                "image_size": 56,
                "patch_size": 14,
                "norm_type": "rms_norm" if six_b else "layer_norm",
                "layer_norm_eps": 1e-6,
                "qkv_bias": not six_b,
                "qk_normalization": six_b,
            }
        )
    )
    hf_state = {k: v for k, v in hf.state_dict().items() if not k.startswith("layernorm")}  # InternViT has none
    ours.load_state_dict(to_official(intern_vit(official="", hf=""), hf_state), strict=True)
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hidden = hf(pixels, output_hidden_states=True).hidden_states  # (embeddings, layer 1, ..., layer L)
        for select in (-1, -2, -3, 0):
            want = hidden[select][:, 1:]
            got = ours(pixels, select_layer=select)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tie", [False, True])
def test_qwen2_matches_transformers(tmp_path, tie):
    hf, folder = qwen2_checkpoint(tmp_path, tie)
    model = minisail.load(folder, dtype=torch.float32)
    assert_padded_batch_matches(model, hf, vocab=360, pad=360, pad_length=6, seed=4)
