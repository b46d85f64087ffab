"""Tiny random-config parity of Yi-VL's parts against transformers' native classes (the `parity` extra).

- CLIPVisionModel against minisail's CLIP tower: hidden_states[k] for several k (Yi-VL takes -2), exact and quick GELU.
- A whole Yi-VL checkpoint in the official main-branch layout, written here with official key names: a random
  LlamaForCausalLM + a projector built as upstream's builder builds mlp2x_gelu_Norm, as bf16-free .bin shards with
  an index, plus vit/<name>/ from a random CLIPVisionModel. Loaded with `minisail.load`, then compared with
  transformers: text-only left-padded logits and greedy tokens; the image path against the same pipeline
  assembled from the transformers modules (hidden_states[-2] without CLS -> projector -> splice -> Llama).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from helpers.checkpoints import golden_config, randomize_  # noqa: E402
from helpers.hf_checkpoints import assert_padded_batch_matches  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import minisail  # noqa: E402
from minisail.generate import greedy_generate  # noqa: E402
from minisail.layers import hidden_state_depth  # noqa: E402
from minisail.text.prompt import YIVL_IMAGE_TOKEN_INDEX  # noqa: E402
from minisail.vision.clip_vit import CLIPVisionConfig, CLIPVisionTower  # noqa: E402

VIT = "vit/clip-vit-random-p14-56"
CLIP_SIZES = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4)
LLM_SIZES = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=512,
)


def random_clip(hidden_act: str = "gelu", seed: int = 1):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        **CLIP_SIZES, image_size=56, patch_size=14, hidden_act=hidden_act, attn_implementation="eager"
    )
    return randomize_(CLIPVisionModel(config), seed=seed).eval()


def clip_config_json(hf) -> dict:
    """The vit folder's config.json, with the keys transformers 4.36 wrote (the official folder's format)."""
    c = hf.config
    keys = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size"]
    keys += ["patch_size", "hidden_act", "layer_norm_eps", "num_channels"]
    return {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", **{k: getattr(c, k) for k in keys}}


@pytest.mark.parametrize("hidden_act", ["gelu", "quick_gelu"])
def test_clip_tower_matches_transformers(hidden_act):
    hf = random_clip(hidden_act)
    config = CLIPVisionConfig.from_config(clip_config_json(hf))
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hidden = hf(pixels, output_hidden_states=True).hidden_states  # (pre_layrnorm(embeddings), block 1, ..., 3)
        for select in (-2, -1, 0, 1):
            depth = hidden_state_depth(select, config.num_layers, embeddings_first=True, tower="CLIP ViT")
            tower = CLIPVisionTower(config, depth)
            state = {  # transformers 5 names the tower's modules without the official "vision_model." prefix
                k: v
                for k, v in hf.state_dict().items()
                if not k.startswith("post_layernorm") and not any(f"layers.{i}." in k for i in range(depth, 3))
            }
            tower.load_state_dict(state, strict=True)
            torch.testing.assert_close(tower(pixels), hidden[select], atol=1e-5, rtol=0)


def upstream_projector(in_dim: int, out_dim: int) -> nn.Sequential:
    """mlp2x_gelu_Norm as Yi's multimodal_projector/builder.py assembles it (keys 0, 1, 3, 4)."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim), nn.GELU(), nn.Linear(out_dim, out_dim),
                         nn.LayerNorm(out_dim))  # fmt: skip


def write_bin_shards(folder, tensors: dict, shards: int = 2):
    names = sorted(tensors)
    weight_map = {}
    for k in range(shards):
        shard = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        torch.save({n: tensors[n].contiguous() for n in names[k::shards]}, folder / shard)
        weight_map.update({n: shard for n in names[k::shards]})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def yivl(tmp_path_factory):
    """(minisail model, transformers CLIP, upstream-style projector, transformers Llama) sharing their weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("yi-vl") / "checkpoint"
    (folder / VIT).mkdir(parents=True)
    clip = random_clip(seed=5)
    llama_config = LlamaConfig(**LLM_SIZES, rope_theta=5e6, tie_word_embeddings=False, attn_implementation="eager")
    llama = randomize_(LlamaForCausalLM(llama_config), seed=6).eval()
    projector = randomize_(upstream_projector(48, 64), seed=7).eval()

    config = golden_config("yi-vl-tiny")  # the official key set; sizes replaced below
    config.update(LLM_SIZES, rope_theta=5e6, mm_hidden_size=48, mm_vision_tower=f"./{VIT}")
    (folder / "config.json").write_text(json.dumps(config))
    tensors = dict(llama.state_dict())
    tensors.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()})
    # The main-shard tower copy upstream drops: zeros here, so using it would break every image comparison.
    vision = {f"vision_model.{k}": v for k, v in clip.state_dict().items()}
    tensors.update({f"model.vision_tower.vision_tower.{k}": torch.zeros_like(v) for k, v in vision.items()})
    write_bin_shards(folder, tensors)
    (folder / VIT / "config.json").write_text(json.dumps(clip_config_json(clip)))
    save_file({k: v.contiguous() for k, v in vision.items()}, folder / VIT / "model.safetensors")

    model = minisail.load(folder, dtype=torch.float32)
    return model, clip, projector, llama


def test_text_only_batch_matches_llama(yivl):
    model, _clip, _projector, llama = yivl
    assert_padded_batch_matches(model, llama, vocab=300, pad=0, pad_length=5, seed=8)


def test_image_path_matches_the_transformers_pipeline(yivl):
    model, clip, projector, llama = yivl
    generator = torch.Generator().manual_seed(9)
    pixels = torch.randn(1, 3, 56, 56, generator=generator)
    input_ids = torch.randint(3, 300, (1, 14), generator=generator)
    slot = 6
    input_ids[0, slot] = YIVL_IMAGE_TOKEN_INDEX
    with torch.no_grad():
        features = clip(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]  # Yi: select -2, drop CLS
        image = projector(features)  # [1, 16, 64]
        embed = llama.get_input_embeddings()
        spliced = torch.cat([embed(input_ids[:, :slot]), image, embed(input_ids[:, slot + 1 :])], dim=1)  # [1, 29, 64]
        ones = torch.ones(spliced.shape[:2], dtype=torch.long)
        want = llama(inputs_embeds=spliced, attention_mask=ones, position_ids=ones.cumsum(-1) - 1).logits

        torch.testing.assert_close(model.encode_images(pixels), image, atol=1e-5, rtol=0)
        got = model(input_ids, None, pixels)
        assert got.shape == want.shape == (1, 14 - 1 + 16, 300)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

        hf_tokens = llama.generate(
            inputs_embeds=spliced, attention_mask=ones, max_new_tokens=8, do_sample=False, eos_token_id=None
        )
    assert greedy_generate(model, input_ids, None, pixels, max_new_tokens=8).tolist() == hf_tokens.tolist()
