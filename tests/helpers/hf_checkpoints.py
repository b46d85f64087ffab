"""Official-layout checkpoints around random transformers models (the `parity` extra; import it inside a test
that has called `pytest.importorskip("transformers")`)."""

from __future__ import annotations

from helpers.checkpoints import golden_config, golden_tensors, randomize_, write_checkpoint


def qwen2_checkpoint(tmp_path, tie: bool):
    """An official-layout InternVL checkpoint whose language model is a random transformers Qwen2."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hf_config = Qwen2Config(
        vocab_size=400,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        attn_implementation="eager",
    )
    hf = randomize_(Qwen2ForCausalLM(hf_config), seed=2).eval()
    config = golden_config("internvl-qwen2-tiny")
    llm = hf_config.to_dict()
    llm["architectures"] = ["Qwen2ForCausalLM"]
    config["llm_config"] = llm
    tensors = {k: v for k, v in golden_tensors("internvl-qwen2-tiny").items() if not k.startswith("language_model.")}
    state = hf.state_dict()
    if tie:
        state.pop("lm_head.weight")  # a tied checkpoint stores only the embedding
    tensors.update({f"language_model.{k}": v for k, v in state.items()})
    return hf, write_checkpoint(tmp_path / "ckpt", config, tensors)


def assert_padded_batch_matches(model, hf, *, vocab: int, pad: int, pad_length: int, seed: int) -> None:
    """minisail's logits and greedy tokens on a 2-row batch (row 1 left-padded by `pad_length` ids `pad`) equal
    transformers' causal LM `hf` run with mask-derived positions and its own `generate()`."""
    import torch

    from minisail.generate import greedy_generate

    input_ids = torch.randint(3, vocab, (2, 20), generator=torch.Generator().manual_seed(seed))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :pad_length], input_ids[1, :pad_length] = 0, pad
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = hf(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        got = model(input_ids, attention_mask)
        real = attention_mask.bool()
        torch.testing.assert_close(got[real], want[real].float(), atol=1e-5, rtol=0)
        hf_tokens = hf.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=None,
        )[:, input_ids.shape[1] :]
    assert greedy_generate(model, input_ids, attention_mask, max_new_tokens=8).tolist() == hf_tokens.tolist()
