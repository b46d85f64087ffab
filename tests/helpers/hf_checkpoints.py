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
