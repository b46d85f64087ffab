"""Mono-InternVL-2B: patch embedding, visual-expert routing through prefill and decoding, weights, dtypes.

Uses the golden checkpoints in tests/golden/mono-internvl-{tiny,textonly} (produced by the official
Mono-InternVL code; tests/golden_cases/test_golden.py checks them against its outputs). Here: what those cases
cannot show on their own, chunked prefill over image tokens, decoded <IMG_CONTEXT>, batches, the float16 refusal, and an
independent oracle (transformers' Llama with its MLP swapped for the routed pair).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import paths

import minisail
from minisail.checkpoint.export import to_official_state_dict
from minisail.checkpoint.safetensors_mmap import SafetensorsFile
from minisail.config import read_config
from minisail.errors import ConfigError
from minisail.generate import greedy_generate
from minisail.llm.decoder import positions_from_mask
from minisail.models import mono
from minisail.models.registry import detect_family

GOLDEN = paths.GOLDEN
TINY = GOLDEN / "mono-internvl-tiny"


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    file = SafetensorsFile(path)
    return {name: file.read(name) for name in file.entries}


def image_token_id() -> int:
    meta = json.loads((TINY / "meta.json").read_text())
    return meta["tokens"]["IMG_CONTEXT (<IMG_CONTEXT>)"]


@pytest.fixture(scope="module")
def tiny():
    model = minisail.load(TINY / "checkpoint", dtype=torch.float32)
    model.image_token_id = image_token_id()
    return model, read_tensors(TINY / "inputs.safetensors"), read_tensors(TINY / "expected.safetensors")


# --- structure and weights --------------------------------------------------------------------------------------


def test_family_and_the_patch_model_ignore_the_vit_fields(tiny):
    model, _, _ = tiny
    config = read_config(TINY / "checkpoint")
    assert detect_family(config).NAME == "mono-internvl" and model.family == "mono-internvl"
    assert config["vision_config"]["num_hidden_layers"] == 48  # present in the file, meaningless here
    names = {name: tuple(p.shape) for name, p in model.vision_model.named_parameters()}
    assert names == {
        "embeddings.class_embedding": (1, 1, 32),
        "embeddings.patch_embedding.weight": (32, 3, 14, 14),
        "embeddings.patch_embedding.bias": (32,),
        "embeddings.position_embedding": (1, 1 + 4 * 4, 32),  # vision image_size 56 -> a 4x4 table
    }
    assert model.config.tokens_per_tile == 16  # force_image_size 112 -> 8x8 patches -> 16 after the shuffle
    assert all(hasattr(layer.mlp, "visual") for layer in model.language_model.layers)


def test_weights_round_trip_to_the_official_keys(tiny):
    """Every official tensor is used and comes back bit-exact, feed_forward_ve included."""
    model, _, _ = tiny
    official = read_tensors(TINY / "checkpoint" / "model.safetensors")
    written = to_official_state_dict(model, detect_family(read_config(TINY / "checkpoint")).weight_map(model.config))
    assert set(written) == set(official)
    for key, value in official.items():
        assert torch.equal(written[key], value), key
    assert "language_model.model.layers.1.feed_forward_ve.w3.weight" in official
    assert sorted(k for k in official if k.startswith("vision_model.")) == [
        "vision_model.embeddings.class_embedding",
        "vision_model.embeddings.patch_embedding.bias",
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.embeddings.position_embedding",
    ]


def test_patch_model_is_conv_plus_resized_table_and_ignores_the_class_embedding(tiny):
    model, inputs, _ = tiny
    embeddings = model.vision_model.embeddings
    pixels = inputs["pixel_values"]
    with torch.no_grad():
        got = model.vision_model(pixels)  # [N, 64, C]
        conv = F.conv2d(pixels, embeddings.patch_embedding.weight, embeddings.patch_embedding.bias, stride=14)
        table = embeddings.position_embedding[0, 1:].reshape(4, 4, -1).permute(2, 0, 1)[None]  # [1, C, 4, 4]
        table = F.interpolate(table, size=(8, 8), mode="bicubic", align_corners=False)  # [1, C, 8, 8]
        want = (conv + table).flatten(2).transpose(1, 2)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        saved = embeddings.class_embedding.clone()
        embeddings.class_embedding.add_(100.0)
        try:
            assert torch.equal(model.vision_model(pixels), got)
        finally:
            embeddings.class_embedding.copy_(saved)


# --- routing ----------------------------------------------------------------------------------------------------


def test_visual_mask_routes_exactly_the_image_context_tokens(tiny):
    model, inputs, _ = tiny
    ids = inputs["input_ids"]
    mask = model.visual_mask(ids)
    assert mask.dtype == torch.bool and torch.equal(mask, ids == image_token_id())
    assert int(mask.sum()) == 48 and not mask[ids == 391].any() and not mask[ids == 392].any()  # <img>, </img>


def prefill_in_chunks(model, inputs, bounds, route=True):
    """Logits [1, T, V] of the prompt fed through the KV cache in chunks [a, b)."""
    prepared = model.prepare_inputs(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    decoder, T = model.language_model, prepared.embeds.shape[1]
    positions = positions_from_mask(prepared.attention_mask)
    cache = decoder.new_cache(1, T)
    pieces = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        visual = model.visual_mask(inputs["input_ids"][:, a:b])
        if not route and a > 0:  # upstream's rule: any step with a cache uses the text FFN for every token
            visual = None
        embeds, mask = prepared.embeds[:, a:b], prepared.attention_mask[:, a:b]
        pieces.append(decoder(embeds, positions[:, a:b], cache, attention_mask=mask, visual_mask=visual))
    return torch.cat(pieces, dim=1)


def test_chunked_prefill_over_image_tokens_matches_the_full_forward(tiny):
    model, inputs, expected = tiny
    bounds = [0, 20, 40, 66, 74]  # splits inside the 48 image tokens (slots 14..61)
    with torch.no_grad():
        chunked = prefill_in_chunks(model, inputs, bounds)
        upstream_rule = prefill_in_chunks(model, inputs, bounds, route=False)
    diff = (chunked - expected["logits"]).abs().max().item()
    assert diff < 1e-5, diff
    # Upstream's "text FFN whenever there is a cache" would get these chunks wrong.
    assert (upstream_rule - expected["logits"]).abs().max().item() > 1e-2


def test_a_decoded_image_context_token_takes_the_visual_expert(tiny):
    """Cached decoding of <IMG_CONTEXT> equals a no-cache forward of the same sequence (upstream would not)."""
    model, inputs, _ = tiny
    img = image_token_id()
    decoder = model.language_model
    with torch.no_grad():
        prepared = model.prepare_inputs(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
        ids = torch.cat([inputs["input_ids"], torch.tensor([[img]])], dim=1)
        embeds = torch.cat([prepared.embeds, decoder.embed(torch.tensor([[img]]))], dim=1)
        mask = torch.ones_like(ids)
        positions = positions_from_mask(mask)
        full = decoder(embeds, positions, visual_mask=model.visual_mask(ids))[:, -1]

        T = inputs["input_ids"].shape[1]
        cache = decoder.new_cache(1, T + 1)
        decoder(prepared.embeds, positions[:, :T], cache, visual_mask=prepared.visual_mask)
        step_ids = ids[:, T:]
        step = decoder(embeds[:, T:], positions[:, T:], cache, visual_mask=model.visual_mask(step_ids))[:, -1]
        text_ffn = decoder(embeds, positions, visual_mask=(ids == img) & (positions < T))[:, -1]
    assert (step - full).abs().max().item() < 1e-5
    assert (text_ffn - full).abs().max().item() > 1e-3  # the expert choice matters for this token


def test_greedy_decoding_equals_a_no_cache_replay(tiny):
    model, inputs, expected = tiny
    with torch.no_grad():
        tokens = greedy_generate(
            model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], max_new_tokens=6
        )
        ids = inputs["input_ids"]
        for t in range(tokens.shape[1]):
            logits = model(torch.cat([ids, tokens[:, :t]], dim=1), None, inputs["pixel_values"])
            assert int(logits[0, -1].argmax()) == int(tokens[0, t])
    assert torch.equal(tokens, expected["generated_ids"][:, :6])


def test_left_padded_batch_matches_single_rows(tiny):
    model, inputs, _ = tiny
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    short = torch.cat([ids[:, :1], ids[:, 6:]], dim=1)  # drop 5 text tokens after <s>
    pad = ids.shape[1] - short.shape[1]
    batch_ids = torch.cat([ids, F.pad(short, (pad, 0), value=0)], dim=0)
    batch_mask = torch.ones_like(batch_ids)
    batch_mask[1, :pad] = 0
    batch_pixels = torch.cat([pixels, pixels], dim=0)
    with torch.no_grad():
        batched = model(batch_ids, batch_mask, batch_pixels)
        row0 = model(ids, None, pixels)
        row1 = model(short, None, pixels)
        assert (batched[0] - row0[0]).abs().max().item() < 1e-5
        assert (batched[1, pad:] - row1[0]).abs().max().item() < 1e-5
        tokens = greedy_generate(model, batch_ids, batch_mask, batch_pixels, max_new_tokens=5)
        assert torch.equal(tokens[1:], greedy_generate(model, short, None, pixels, max_new_tokens=5))


def test_text_only_prompt_never_uses_the_visual_expert():
    model = minisail.load(GOLDEN / "mono-internvl-textonly" / "checkpoint", dtype=torch.float32)
    inputs = read_tensors(GOLDEN / "mono-internvl-textonly" / "inputs.safetensors")
    expected = read_tensors(GOLDEN / "mono-internvl-textonly" / "expected.safetensors")
    with torch.no_grad():
        for layer in model.language_model.layers:
            layer.mlp.visual.down.weight.fill_(float("nan"))  # any use of it would show
        logits = model(inputs["input_ids"], inputs["attention_mask"])
    assert (logits - expected["logits"]).abs().max().item() < 1e-5


# --- dtypes and config ------------------------------------------------------------------------------------------


def test_float16_is_refused_at_load_and_after_a_cast(tiny):
    with pytest.raises(ConfigError, match="float16"):
        minisail.load(TINY / "checkpoint", dtype=torch.float16)
    model = minisail.load(TINY / "checkpoint", dtype="bf16")
    model.image_token_id = image_token_id()
    _, inputs, expected = tiny
    with torch.no_grad():
        logits = model(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
        assert torch.isfinite(logits).all()
        assert (logits - expected["logits"]).abs().max().item() < 0.05  # bf16 rounding, |logits| <= 0.61
    for cast in (lambda m: m.half(), lambda m: m.to(torch.float16), lambda m: m.to("cpu", torch.float16)):
        with pytest.raises(ConfigError, match="float16"):
            cast(model)  # refused before any weight changes
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    model.float()  # other conversions go through
    assert model.language_model.embed.weight.dtype == torch.float32
    with torch.no_grad():  # float16 weights that got there some other way are still refused at the first forward
        model.language_model.embed.weight.data = model.language_model.embed.weight.data.half()
        with pytest.raises(ConfigError, match="float16"):
            model(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])


def test_config_errors(tmp_path):
    config = read_config(TINY / "checkpoint")
    with pytest.raises(ConfigError, match="select_layer"):
        mono.parse({**config, "select_layer": -4})
    vision = {k: v for k, v in config["vision_config"].items() if k != "image_size"}
    with pytest.raises(ConfigError, match="image_size"):
        mono.parse({**config, "vision_config": vision})
    # A checkpoint whose weights lack the visual experts is refused by the strict loader.
    folder = tmp_path / "checkpoint"
    shutil.copytree(TINY / "checkpoint", folder)
    official = read_tensors(folder / "model.safetensors")
    from safetensors.torch import save_file

    save_file({k: v for k, v in official.items() if "feed_forward_ve" not in k}, str(folder / "model.safetensors"))
    with pytest.raises(minisail.CheckpointError, match="feed_forward_ve"):
        minisail.load(folder)


# --- oracle: transformers' Llama with the routed MLP ------------------------------------------------------------


def test_matches_transformers_llama_with_a_routed_mlp(tiny):
    transformers = pytest.importorskip("transformers")
    from torch import nn

    model, inputs, _ = tiny
    c = model.config.llm
    hf_config = transformers.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=False,
    )
    hf_config._attn_implementation = "eager"
    oracle = transformers.LlamaForCausalLM(hf_config).eval()
    route = {}

    class RoutedMLP(nn.Module):
        def __init__(self, text, visual):
            super().__init__()
            self.text, self.visual = text, visual

        def forward(self, x):
            return torch.where(route["mask"][..., None], self.visual(x), self.text(x))

    def llama_mlp(swiglu):
        mlp = transformers.models.llama.modeling_llama.LlamaMLP(hf_config)
        gate, up = swiglu.gate_up.weight.chunk(2, dim=0)
        mlp.gate_proj.weight.data.copy_(gate)
        mlp.up_proj.weight.data.copy_(up)
        mlp.down_proj.weight.data.copy_(swiglu.down.weight)
        return mlp

    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    with torch.no_grad():
        oracle.model.embed_tokens.weight.copy_(model.language_model.embed.weight)
        oracle.model.norm.weight.copy_(model.language_model.norm.weight)
        oracle.lm_head.weight.copy_(model.language_model.lm_head.weight)
        for ours, theirs in zip(model.language_model.layers, oracle.model.layers, strict=True):
            wq, wk, wv = ours.attn.qkv.weight.split([q, kv, kv], dim=0)
            theirs.self_attn.q_proj.weight.copy_(wq)
            theirs.self_attn.k_proj.weight.copy_(wk)
            theirs.self_attn.v_proj.weight.copy_(wv)
            theirs.self_attn.o_proj.weight.copy_(ours.attn.o.weight)
            theirs.input_layernorm.weight.copy_(ours.attn_norm.weight)
            theirs.post_attention_layernorm.weight.copy_(ours.mlp_norm.weight)
            theirs.mlp = RoutedMLP(llama_mlp(ours.mlp.text), llama_mlp(ours.mlp.visual))

        prepared = model.prepare_inputs(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
        route["mask"] = inputs["input_ids"] == image_token_id()
        want = oracle(inputs_embeds=prepared.embeds, attention_mask=inputs["attention_mask"]).logits.float()
        got = model(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    diff = (got - want).abs().max().item()
    assert diff < 1e-5, diff
