"""SAIL-VL2 model side: family detection, SAIL-ViT shapes and select_layer, the lm_head rule, clear errors.

Built from the `sail-vl2-tiny` golden checkpoint (SAIL-ViT 4 layers at 112 px, Qwen3 with head_dim 32 != 64/4,
tie_word_embeddings true with a separate stored lm_head); logits parity itself is in tests/golden_cases/test_golden.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers.checkpoints import GOLDEN, golden_config, golden_tensors, write_checkpoint

import minisail
from minisail.checkpoint.export import to_official_state_dict
from minisail.errors import CheckpointError, ConfigError, ImageError
from minisail.models.registry import FAMILIES, detect_family
from minisail.parity import read_tensors
from minisail.vision.sail_vit import select_depth

CASE = "sail-vl2-tiny"


@pytest.fixture(scope="module")
def model():
    return minisail.load(GOLDEN / CASE / "checkpoint", dtype=torch.float32)


@pytest.fixture(scope="module")
def pixels():
    return read_tensors(GOLDEN / CASE / "inputs.safetensors")["pixel_values"]  # [3, 3, 112, 112]


def test_family_is_told_apart_by_its_sub_configs():
    config = golden_config(CASE)
    assert detect_family(config).NAME == "sailvl2"
    assert [f.NAME for f in FAMILIES if f.detect(config)] == ["sailvl2"]
    config["vision_config"].pop("architectures")  # model_type sailvit alone is enough
    assert detect_family(config).NAME == "sailvl2"
    config["llm_config"]["architectures"] = ["Qwen2ForCausalLM"]
    config["llm_config"]["model_type"] = "qwen2"
    with pytest.raises(ConfigError, match="vision sailvit, language model Qwen2ForCausalLM"):
        detect_family(config)


def test_shapes_and_no_cls(model, pixels):
    config = model.config
    assert config.tokens_per_tile == 16 and config.select_layer == -1 and config.ps_version == "v2"
    assert config.llm.head_dim == 32 and config.llm.qk_norm and config.llm.num_heads * config.llm.head_dim == 128
    with torch.no_grad():
        features = model.vision_model(pixels)
        assert features.shape == (3, 64, 64)  # all (112/14)^2 patch tokens: nothing dropped
        assert model.encode_images(pixels).shape == (3, 16, 64)


def test_select_layer_means_upstream_hidden_states(model, pixels):
    # hidden_states = (block 1, ..., block L) before post_trunk_norm; -1 alone is the normed trunk output.
    assert select_depth(-1, 4) == (4, True)
    assert [select_depth(s, 4) for s in (-4, -2, 0, 3)] == [(1, False), (3, False), (1, False), (4, False)]
    vit = model.vision_model
    with torch.no_grad():
        torch.testing.assert_close(vit.trunk.post_trunk_norm(vit(pixels, 3)), vit(pixels, -1), atol=0, rtol=0)
        torch.testing.assert_close(vit(pixels, 0), vit(pixels, -4), atol=0, rtol=0)
        assert not torch.allclose(vit(pixels, 3), vit(pixels, -1), atol=1e-3)
    for bad in (4, -5):
        with pytest.raises(ConfigError, match=f"select_layer {bad} is outside a 4-layer SAIL-ViT"):
            select_depth(bad, 4)


def test_stored_lm_head_is_used_although_config_says_tied(model):
    assert golden_config(CASE)["llm_config"]["tie_word_embeddings"] is True
    stored = golden_tensors(CASE)["language_model.lm_head.weight"]
    assert torch.equal(model.language_model.lm_head.weight, stored)
    assert not torch.equal(stored, model.language_model.embed.weight)


def test_weight_map_round_trips_the_official_layout(model):
    official = golden_tensors(CASE)
    written = to_official_state_dict(model, detect_family(golden_config(CASE)).weight_map(model.config))
    assert sorted(written) == sorted(official)
    assert all(torch.equal(written[name], official[name]) for name in official)


def test_tied_head_load(tmp_path):
    """A checkpoint without lm_head ties it to the embedding when the config says so, and only then."""
    tensors = golden_tensors(CASE)
    tensors.pop("language_model.lm_head.weight")
    tied = minisail.load(write_checkpoint(tmp_path / "tied", golden_config(CASE), tensors))
    assert torch.equal(tied.language_model.lm_head.weight, tensors["language_model.model.embed_tokens.weight"])
    # The golden case tells the two heads apart: a tied head moves its logits by far more than the tolerance.
    inputs = read_tensors(GOLDEN / CASE / "inputs.safetensors")
    tied.image_token_id = 388
    with torch.no_grad():
        logits = tied(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    expected = read_tensors(GOLDEN / CASE / "expected.safetensors")["logits"]
    assert (logits - expected).abs().max() > 0.1

    config = golden_config(CASE)
    config["llm_config"]["tie_word_embeddings"] = False
    with pytest.raises(CheckpointError, match="language_model.lm_head.weight"):
        minisail.load(write_checkpoint(tmp_path / "untied", config, tensors))


def test_position_table_must_match_the_image_size(tmp_path):
    config = golden_config(CASE)
    config["vision_config"]["image_size"] = config["force_image_size"] = 56  # a 16-row table; the weights have 64
    with pytest.raises(CheckpointError, match=r"preprocessor\.pos_embed.*\(1, 16, 64\).*\(1, 64, 64\)"):
        minisail.load(write_checkpoint(tmp_path / "ckpt", config, golden_tensors(CASE)))


def test_tiles_of_another_size_are_refused(model):
    with pytest.raises(ImageError, match=r"SAIL-ViT takes tiles of shape \[N, 3, 112, 112\].*\[1, 3, 224, 224\]"):
        model.encode_images(torch.zeros(1, 3, 224, 224))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(force_image_size=224), "force_image_size 224 differs from vision_config.image_size 112"),
        (lambda c: c["vision_config"].update(image_size=100), "image_size 100 is not a multiple of patch_size 14"),
        (lambda c: c["vision_config"].update(num_attention_heads=5), "not divisible by 5 heads"),
        (lambda c: c["vision_config"].pop("hidden_size"), "no 'hidden_size' in vision_config"),
        (lambda c: c["llm_config"].pop("rms_norm_eps"), "no 'rms_norm_eps' in llm_config"),
        (lambda c: c.update(select_layer=4), "select_layer 4 is outside a 4-layer SAIL-ViT"),
        (lambda c: c.update(ps_version="v3"), "ps_version 'v3'"),
    ],
)
def test_config_errors_name_the_key(tmp_path, edit, message):
    config = golden_config(CASE)
    edit(config)
    with pytest.raises(ConfigError, match=message):
        minisail.load(write_checkpoint(tmp_path / "ckpt", config, golden_tensors(CASE)))


def test_missing_tensor_is_named(tmp_path):
    tensors = golden_tensors(CASE)
    tensors.pop("vision_model.trunk.post_trunk_norm.weight")
    with pytest.raises(CheckpointError, match="vision_model.trunk.post_trunk_norm.weight"):
        minisail.load(write_checkpoint(tmp_path / "ckpt", golden_config(CASE), tensors))
