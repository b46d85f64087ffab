"""The benchmark's model presets: official `config.json` dicts at the real shapes of released checkpoints.

The weights are random (`bench/checkpoints.py` writes them once in the official layout), so a preset
is only its config: the same dict `minisail.load` reads from a downloaded folder. Sizes are those of the
released checkpoints' official config.json files (their Hugging Face repositories):

- `sail-vl-2b`: InternViT-300M (24 layers, 1024 wide, LayerNorm, qkv bias) + mlp1 + Qwen2.5-1.5B (28 layers,
  1536 wide, 12 / 2 heads, SwiGLU 8960, vocab 151936, its own lm_head). About 2.09 B parameters.
- `mono-internvl-2b`: patch embedding (1024 wide, no ViT layers) + mlp1 + InternLM2-1.8B with FFN visual experts
  (24 layers, 2048 wide, 16 / 8 heads, two SwiGLU 8192 per layer, vocab 92553). About 3.11 B parameters.
- `internvl-chat-v1-5`: InternVL-Chat-V1-5's vision side only, InternViT-6B (45 layers, 3200 wide, RMSNorm,
  qk-norm) + mlp1 to 6144: about 5.65 B parameters. Its InternLM2-20B (40 GB in bf16) does not fit a
  laptop-class machine, so this preset measures vision encoding and loading only.
- `sail-vl2-8b`: SAIL-ViT-Huge (24 layers, 1536 wide, 12 heads, SwiGLU 4096, RMSNorm, no biases) + mlp1
  (6144 -> 4096) + Qwen3-8B (36 layers, 4096 wide, 32 / 8 heads of 128, q/k norms, SwiGLU 12288, vocab 151936,
  untied lm_head). About 8.9 B parameters, 17.8 GB in bf16: issue 17's largest checkpoint this 24 GB machine can
  hold, measured in int4 and int8 (bf16 does not fit beside the page cache; the benchmark refuses it). The key
  layout is the golden sail-vl2 cases'; no transformers or llama.cpp comparison (hf_side / gguf_export: Qwen2).
- `tiny`: the same pipeline at toy widths (tests, smoke runs).

`select_layer` is -1 everywhere (SAIL-VL-2B's real value is unread; -1 is what InternVL2.5-era models and the
two others use), so minisail and transformers run the same number of ViT layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from minisail.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    name: str
    config: dict  # the official config.json (minisail reads it; transformers gets a converted one)
    image_token_id: int  # <IMG_CONTEXT> in the model's tokenizer
    has_llm: bool = True  # False: vision (+ mlp1) only
    transformers: bool = True  # transformers has native classes for this model
    about: str = ""


def _intern_vit(*, hidden, layers, heads, intermediate, six_b: bool) -> dict:
    return {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": intermediate,
        "image_size": 448,
        "patch_size": 14,
        "norm_type": "rms_norm" if six_b else "layer_norm",
        "layer_norm_eps": 1e-6,
        "qkv_bias": not six_b,
        "qk_normalization": six_b,
        "hidden_act": "gelu",
    }


def _chat_level(vision: dict, llm: dict, template: str) -> dict:
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "vision_config": vision,
        "llm_config": llm,
        "downsample_ratio": 0.5,
        "force_image_size": 448,
        "ps_version": "v2",
        "select_layer": -1,
        "template": template,
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 12,
        "torch_dtype": "bfloat16",
    }


QWEN25_1_5B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 1536,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "intermediate_size": 8960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}

QWEN3_8B = {  # Qwen3-8B's official config: SAIL-VL2-8B's language model (untied, its own lm_head)
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 4096,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 12288,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 40960,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}


def _sail_vl2(llm: dict, *, vit_hidden=1536, vit_layers=24, vit_heads=12, vit_intermediate=4096) -> dict:
    """SAIL-VL2's config.json (SAILVLModel): SAIL-ViT-Huge (AIMv2-style: 1536 wide, 24 layers, 12 heads, SwiGLU
    4096, RMSNorm 1e-5, no biases, a 1024-row position table, no CLS) + mlp1 + the given Qwen3."""
    vision = {
        "architectures": ["SAILViTModel"],
        "model_type": "sailvit",
        "hidden_size": vit_hidden,
        "num_hidden_layers": vit_layers,
        "num_attention_heads": vit_heads,
        "intermediate_size": vit_intermediate,
        "image_size": 448,
        "patch_size": 14,
        "num_channels": 3,
        "rms_norm_eps": 1e-5,
        "qkv_bias": False,
        "use_bias": False,
    }
    return {**_chat_level(vision, llm, "univl-chat"), "architectures": ["SAILVLModel"], "model_type": "sailvl"}


INTERNLM2_1_8B_VE = {
    "architectures": ["InternLM2VEForCausalLM"],
    "model_type": "internlm2",
    "vocab_size": 92553,
    "hidden_size": 2048,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "intermediate_size": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "dynamic", "factor": 2.0},
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
    "bias": False,
    "hidden_act": "silu",
}

PRESETS = {
    p.name: p
    for p in [
        Preset(
            "sail-vl-2b",
            _chat_level(
                _intern_vit(hidden=1024, layers=24, heads=16, intermediate=4096, six_b=False),
                QWEN25_1_5B,
                "internvl2_5",
            ),
            image_token_id=151667,
            about="InternViT-300M + Qwen2.5-1.5B",
        ),
        Preset(
            "mono-internvl-2b",
            _chat_level(
                {
                    "architectures": ["InternVisionPatchModel"],
                    "model_type": "intern_vit_patch",
                    "hidden_size": 1024,
                    "image_size": 448,
                    "patch_size": 14,
                },
                INTERNLM2_1_8B_VE,
                "internlm2-chat",
            ),
            image_token_id=92546,
            transformers=False,  # transformers has no InternLM2 with visual experts
            about="patch embedding + InternLM2-1.8B with FFN visual experts",
        ),
        Preset(
            "internvl-chat-v1-5",
            _chat_level(
                _intern_vit(hidden=3200, layers=45, heads=25, intermediate=12800, six_b=True),
                {"hidden_size": 6144},  # only mlp1's output width is read
                "internlm2-chat",
            ),
            image_token_id=92546,
            has_llm=False,
            about="InternViT-6B + mlp1 (vision side only)",
        ),
        Preset(
            "sail-vl2-8b",
            _sail_vl2(QWEN3_8B),
            image_token_id=151671,  # <IMG_CONTEXT> in SAIL-VL2's tokenizer (its added_tokens)
            transformers=False,  # hf_side.py compares InternVL + Qwen2 only
            about="SAIL-ViT-Huge + Qwen3-8B: the largest checkpoint a 24 GB machine holds (int4 / int8)",
        ),
        Preset(
            "tiny",  # for tests and smoke runs: the same pipeline in seconds
            _chat_level(
                _intern_vit(hidden=64, layers=2, heads=4, intermediate=128, six_b=False),
                {
                    **QWEN25_1_5B,
                    "vocab_size": 1000,
                    "hidden_size": 64,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "num_key_value_heads": 2,
                    "intermediate_size": 128,
                },
                "internvl2_5",
            ),
            image_token_id=999,
            about="a 2-layer InternViT + 2-layer Qwen2 with the real 448 px tiles and prompt length",
        ),
    ]
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown benchmark preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
