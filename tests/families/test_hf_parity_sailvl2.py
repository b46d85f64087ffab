"""SAIL-VL2 against transformers' native classes for the same math (the `parity` extra), on tiny random configs.

One official-layout SAIL-VL2 checkpoint is written per test: its SAIL-ViT weights come from a random
`Aimv2VisionModel` (use_head False, is_native False, silu: AIMv2 at a fixed resolution, which SAIL-ViT is;
renamed by bench/hf_names.py's table), its language model from a random `Qwen3ForCausalLM` with
head_dim != hidden / heads, and `minisail.load` reads it exactly as a user would. Compared in float32:
- the SAIL-ViT output for every select_layer kind (normed last layer, inner un-normed block outputs);
- the decoder logits of a left-padded batch and the greedy tokens with the KV cache against generate(), with
  the head stored although the config says tied (as SAIL-VL2-2B ships it), and with a truly tied head.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers.checkpoints import golden_config, randomize_, write_checkpoint  # noqa: E402
from helpers.hf_checkpoints import assert_padded_batch_matches  # noqa: E402

import minisail  # noqa: E402
from bench.hf_names import sail_vit, to_official  # noqa: E402

VISION = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96, image_size=56)
LLM = dict(
    vocab_size=400,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,  # 4 x 24 = 96 != 64: Qwen3 states head_dim on its own
    rms_norm_eps=1e-6,
    max_position_embeddings=512,
)


def aimv2(bias: bool):
    from transformers import Aimv2VisionConfig, Aimv2VisionModel

    config = Aimv2VisionConfig(
        **VISION,
        patch_size=14,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        use_head=False,
        is_native=False,
        qkv_bias=bias,  # Aimv2 puts this on q/k/v and out_proj, SAIL-ViT on qkv only ...
        mlp_bias=bias,  # ... and SAIL-ViT's use_bias covers proj and the MLP: equal when both flags agree
        attn_implementation="eager",
    )
    return randomize_(Aimv2VisionModel(config), seed=11).eval()


def qwen3(tie: bool):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**LLM, rope_theta=1e6, tie_word_embeddings=tie, attn_implementation="eager")
    return randomize_(Qwen3ForCausalLM(config), seed=12).eval()


def sailvl2_checkpoint(tmp_path, vision, llm, *, head: str, vision_bias: bool = False):
    """head: "stored" (config tied, separate lm_head stored, as SAIL-VL2-2B) or "tied" (no lm_head stored)."""
    config = golden_config("sail-vl2-tiny")  # the official key set, sizes replaced
    config["force_image_size"] = VISION["image_size"]
    config["vision_config"].update(VISION, qkv_bias=vision_bias, use_bias=vision_bias)
    config["llm_config"].update(LLM, tie_word_embeddings=True)
    tensors = to_official(sail_vit(), vision.state_dict())
    generator = torch.Generator().manual_seed(13)
    merged, hidden = 4 * VISION["hidden_size"], LLM["hidden_size"]
    for index, shape, centre in [(0, (merged,), 1.0), (1, (hidden, merged), 0.0), (3, (hidden, hidden), 0.0)]:
        tensors[f"mlp1.{index}.weight"] = centre + 0.1 * torch.randn(shape, generator=generator)  # LN weight ~ 1
        tensors[f"mlp1.{index}.bias"] = 0.1 * torch.randn(shape[0], generator=generator)
    state = llm.state_dict()
    if head == "tied":
        state.pop("lm_head.weight")
    else:
        assert not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    tensors.update({f"language_model.{k}": v for k, v in state.items()})
    return write_checkpoint(tmp_path / "ckpt", config, tensors)


@pytest.mark.parametrize("bias", [False, True])
def test_sail_vit_matches_aimv2(tmp_path, bias):
    vision = aimv2(bias)
    model = minisail.load(sailvl2_checkpoint(tmp_path, vision, qwen3(False), head="stored", vision_bias=bias))
    assert model.family == "sailvl2"
    pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        out = vision(pixels, output_hidden_states=True)
        # transformers: (embeddings, block 1, ..., block L), un-normed; upstream SAIL: (block 1, ..., block L).
        hidden = out.hidden_states
        assert len(hidden) == VISION["num_hidden_layers"] + 1
        cases = {-1: out.last_hidden_state, -2: hidden[-2], -3: hidden[-3], 0: hidden[1], 2: hidden[3]}
        for select, want in cases.items():
            got = model.vision_model(pixels, select_layer=select)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=f"select_layer {select}")
    # -1 is the normed output, 2 (= L-1) the same block un-normed: they must differ.
    assert not torch.allclose(cases[-1], cases[2], atol=1e-3)


@pytest.mark.parametrize("head", ["stored", "tied"])
def test_qwen3_matches_transformers(tmp_path, head):
    llm = qwen3(tie=head == "tied")
    model = minisail.load(sailvl2_checkpoint(tmp_path, aimv2(False), llm, head=head), dtype=torch.float32)
    lm_head = model.language_model.lm_head.weight
    torch.testing.assert_close(lm_head, llm.lm_head.weight, atol=0, rtol=0)
    assert torch.equal(lm_head, model.language_model.embed.weight) == (head == "tied")

    assert_padded_batch_matches(model, llm, vocab=360, pad=360, pad_length=5, seed=15)
