"""`DecoderConfig`, the switches of the one decoder (llm/decoder.py), and its reader of an official LLM config.

Qwen2, Qwen3, InternLM2 and Llama (Yi) text configs become one `DecoderConfig` through
`DecoderConfig.from_config(llm_config_dict, where)`; the key-by-key table below says what is read, refused and
ignored. Mirrors the config classes of transformers' `configuration_qwen2.py`, `configuration_qwen3.py`,
`configuration_llama.py` and InternVL's `configuration_internlm2.py`. Values are read through the typed readers
of `minisail/config.py`, so a bad value is a ConfigError that names its key.
"""

from __future__ import annotations

from dataclasses import dataclass

from minisail.config import MAX_SIZE, architecture, choice, epsilon, flag, optional, positive, real
from minisail.errors import ConfigError

# What the decoder does with each key of the official LLM config classes (Qwen2Config, Qwen3Config, LlamaConfig,
# InternLM2Config), decided key by key:
# - read and checked: the sizes, hidden_act, rms_norm_eps, rope_theta / rope_scaling / rope_parameters,
#   head_dim, the bias switches, tie_word_embeddings, max_position_embeddings;
# - refused when they ask for math the decoder does not implement: use_sliding_window true, layer_types other
#   than "full_attention", mlp_bias true, attention_bias / bias true (where the family has none), a RoPE type
#   other than dynamic NTK, partial_rotary_factor other than 1;
# - ignored, because they do not change inference: attention_dropout (dropout is off at eval), pretraining_tp
#   (Llama's sliced matmuls: the same products, summed in another order), sliding_window and max_window_layers
#   (read upstream only when use_sliding_window is true), attn_implementation, use_cache, initializer_range,
#   and the bos / eos / pad ids (the tokenizer's and generation's business).
SILU = ("silu", "swish")  # transformers' ACT2FN maps both names to SiLU, the SwiGLU gate the decoder implements
MAX_POSITIONS = 1 << 31  # not an allocation bound (caches are sized by the prompt): keeps float/int64 math exact


def _llm_kind(llm: dict, arch: str) -> str:
    model_type = llm.get("model_type")
    for kind, prefix in (("internlm2", "InternLM2"), ("qwen2", "Qwen2"), ("qwen3", "Qwen3")):
        if arch.startswith(prefix) or model_type == kind:
            return kind
    return "llama"  # Yi-VL's language model, and any other LlamaForCausalLM-shaped config


MAX_NTK_FACTOR = 1024.0  # far beyond any official config; an absurd factor gave an infinite context length


def _rope(llm: dict, where: str, head_dim: int) -> tuple[float, float | None]:
    """(rope_theta, dynamic NTK factor or None). transformers 4.x writes rope_theta / rope_scaling; 5.x writes
    both into rope_parameters ({"rope_type": "default", "rope_theta": ...})."""
    rope = optional(llm, "rope_parameters", where, dict, {})
    if llm.get("rope_theta") is not None:
        theta = real(llm, "rope_theta", where, above=0.0)
    else:  # every class default is 10000
        theta = real(rope, "rope_theta", f"{where}.rope_parameters", 1e4, above=0.0)
    scaling, scaling_where = optional(llm, "rope_scaling", where, dict, None), f"{where}.rope_scaling"
    if scaling is None:
        scaling, scaling_where = rope, f"{where}.rope_parameters"
    for table, table_where in ((llm, where), (scaling, scaling_where)):
        if real(table, "partial_rotary_factor", table_where, 1.0) != 1.0:
            raise ConfigError(
                f"config.json: {table_where}.partial_rotary_factor = {table['partial_rotary_factor']!r} is not "
                "supported: minisail rotates every channel of a head (accepted: 1.0)"
            )
    key = "rope_type" if scaling.get("rope_type") is not None else "type"
    kind = optional(scaling, key, scaling_where, str, "default")
    if kind == "default":
        return theta, None
    if kind != "dynamic":
        raise ConfigError(
            f"config.json: {scaling_where} type {kind!r} is not supported (only 'dynamic', InternLM2's dynamic "
            "NTK, or none)"
        )
    if head_dim <= 2:  # dynamic NTK raises the base to the power head_dim / (head_dim - 2)
        raise ConfigError(f"config.json: {where}: dynamic NTK RoPE needs a head_dim above 2, not {head_dim}")
    # Official InternLM2 configs use 2.0-3.0; the context is max_position_embeddings times this, a Python int
    return theta, real(scaling, "factor", scaling_where, above=1.0, at_most=MAX_NTK_FACTOR)


def _head_dim(llm: dict, where: str, kind: str, hidden: int, heads: int) -> int:
    if kind == "qwen3":  # Qwen3 states head_dim; Qwen3Config's class default is 128, not hidden / heads
        head_dim = positive(llm, "head_dim", where, 128)
    elif llm.get("head_dim") is not None:  # newer Llama / Qwen2 code honours an explicit head_dim
        head_dim = positive(llm, "head_dim", where)
        if kind == "internlm2" and head_dim * heads != hidden:
            raise ConfigError(
                f"config.json: {where}.head_dim {head_dim} != hidden_size {hidden} / {heads} heads: InternLM2's code "
                "ignores head_dim and splits hidden_size into the heads, so the two must agree"
            )
    elif hidden % heads:
        raise ConfigError(f"config.json: {where}.hidden_size {hidden} is not divisible by {heads} heads")
    else:
        head_dim = hidden // heads
    if head_dim % 2 or heads * head_dim > MAX_SIZE:
        raise ConfigError(
            f"config.json: {where}: head_dim {head_dim} x {heads} heads is not supported: RoPE rotates channel pairs "
            f"(accepted: an even head_dim, at most {MAX_SIZE} channels over all heads)"
        )
    return head_dim


def _refuse_unimplemented(llm: dict, where: str, num_layers: int) -> None:
    """A ConfigError for the switches that ask for math the decoder does not implement."""
    choice(llm, "hidden_act", where, SILU, "silu", why=": the decoder's SwiGLU gate is SiLU (every class default)")
    if flag(llm, "use_sliding_window", where, False):
        raise ConfigError(
            f"config.json: {where}.use_sliding_window = true is not supported: minisail's attention sees the whole "
            "context in every layer (accepted: false, as in every Qwen2.5 / Qwen3 release)"
        )
    layer_types = optional(llm, "layer_types", where, list, None)
    if layer_types is not None and (len(layer_types) != num_layers or any(t != "full_attention" for t in layer_types)):
        raise ConfigError(
            f"config.json: {where}.layer_types must be {num_layers} x 'full_attention' (one per layer; minisail has "
            f"no sliding-window layers), not {layer_types!r:.200}"
        )
    if flag(llm, "mlp_bias", where, False):
        raise ConfigError(f"config.json: {where}.mlp_bias = true is not supported (accepted: false; no MLP biases)")


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_dynamic_factor: float | None = None  # InternLM2 rope_scaling {type: dynamic, factor}
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3
    visual_experts: bool = False  # Mono-InternVL: a second FFN for <IMG_CONTEXT> tokens (minisail/llm/moe.py)
    tie_word_embeddings: bool = False  # only used when the checkpoint stores no lm_head
    architecture: str = ""  # the official class name, for messages

    @classmethod
    def from_config(cls, llm: dict, where: str = "llm_config") -> DecoderConfig:
        """A DecoderConfig from a Qwen2 / Qwen3 / InternLM2 / Llama text config (see the key table above)."""
        arch = architecture(llm)
        kind = _llm_kind(llm, arch)
        hidden, heads = positive(llm, "hidden_size", where), positive(llm, "num_attention_heads", where)
        kv_heads = positive(llm, "num_key_value_heads", where, heads)  # absent: plain multi-head attention
        if heads % kv_heads:
            raise ConfigError(
                f"config.json: {where} has {heads} attention heads, not a multiple of {kv_heads} kv heads"
            )
        head_dim = _head_dim(llm, where, kind, hidden, heads)
        rope_theta, dynamic_factor = _rope(llm, where, head_dim)
        num_layers = positive(llm, "num_hidden_layers", where)
        _refuse_unimplemented(llm, where, num_layers)
        if kind == "internlm2":
            if flag(llm, "bias", where, False):
                raise ConfigError(f"config.json: {where}.bias = true (InternLM2 with biases) is not supported")
            qkv_bias = False
        elif kind == "qwen2":
            qkv_bias = True  # Qwen2 always has q/k/v biases (and none on o_proj)
        else:
            if flag(llm, "attention_bias", where, False):
                what = arch or "this model"
                raise ConfigError(f"config.json: {where}.attention_bias = true is not supported for {what}")
            qkv_bias = False
        return cls(
            vocab_size=positive(llm, "vocab_size", where),
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=positive(llm, "intermediate_size", where),
            rms_norm_eps=epsilon(llm, "rms_norm_eps", where),
            rope_theta=rope_theta,
            max_position_embeddings=positive(llm, "max_position_embeddings", where, limit=MAX_POSITIONS),
            rope_dynamic_factor=dynamic_factor,
            qkv_bias=qkv_bias,
            qk_norm=kind == "qwen3",
            tie_word_embeddings=flag(llm, "tie_word_embeddings", where, False),
            architecture=arch,
        )
