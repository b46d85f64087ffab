"""One decoder core for every language model minisail runs: Qwen2 (SAIL-VL-2B, InternVL2), Qwen3 (SAIL-VL2),
InternLM2 (InternVL-Chat-V1-5, Mono-InternVL) and Llama (Yi-VL).

They are the same pre-norm transformer: token embedding -> L x [RMSNorm -> GQA attention with RoPE -> residual,
RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> lm_head. The differences are fields of `DecoderConfig`
(read from each family's config by `minisail/config.py`) and the weight maps in `minisail/checkpoint/keymaps.py`.

Mirrors transformers' Qwen2ForCausalLM / Qwen3ForCausalLM / LlamaForCausalLM and InternVL's InternLM2ForCausalLM.

Positions come from the attention mask (`mask.cumsum(-1) - 1`, pads at 1), as transformers' generate() makes
them, so left-padded batches see the same positions as unpadded rows. Logits are returned in float32, as the
upstream heads upcast them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minisail.layers import RMSNorm
from minisail.llm.cache import KVCache
from minisail.llm.layers import Attention, SwiGLU, rope_base, rope_cos_sin, rope_cos_sin_from, rope_inv_freq
from minisail.llm.moe import VisualExpertMLP


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


class DecoderLayer(nn.Module):
    def __init__(self, config: DecoderConfig, layer_index: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer_index)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.visual_experts = config.visual_experts
        if config.visual_experts:  # text and visual FFN, routed per token by visual_token_mask
            self.mlp = VisualExpertMLP(config.hidden_size, config.intermediate_size)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, mask, cache, visual_token_mask=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        if self.visual_experts:
            return x + self.mlp(self.mlp_norm(x), visual_token_mask)  # visual_token_mask [B, T] bool
        return x + self.mlp(self.mlp_norm(x))


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] positions: 0, 1, 2, ... over the real tokens of each row; left pads get 1 (transformers' rule)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def attention_mask_4d(key_valid: torch.Tensor, query_slots: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, T, S] mask: query t (in slot query_slots[t]) may see key slot s if s <= its own slot and
    the key is a real token. A query always sees itself, so pad rows stay finite (never an all-masked row)."""
    S = key_valid.shape[1]
    key_slots = torch.arange(S, device=key_valid.device)
    causal = key_slots[None, :] <= query_slots[:, None]  # [T, S]
    itself = key_slots[None, :] == query_slots[:, None]  # [T, S]
    return (causal[None] & (key_valid[:, None, :] | itself[None]))[:, None]  # [B, 1, T, S]


class Decoder(nn.Module):
    """A causal language model: `forward(embeds, attention_mask, positions, cache) -> float32 logits`."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        # `_weight` given: no random init (the model is built on the meta device and filled from the checkpoint)
        self.embed = nn.Embedding(
            config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size)
        )
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._inv_freq: tuple[float, torch.Tensor] | None = None  # (rotary base, its frequencies), for decoding

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        c = self.config
        return KVCache(
            num_layers=c.num_layers,
            batch_size=batch_size,
            num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim,
            capacity=capacity,
            dtype=self.embed.weight.dtype,
            device=self.embed.weight.device,
        )

    def forward(
        self,
        embeds: torch.Tensor,  # [B, T, H] token embeddings (image rows already placed)
        attention_mask: torch.Tensor,  # [B, T] 1 = real token, 0 = left pad
        positions: torch.Tensor,  # [B, T] rotary positions
        cache: KVCache | None = None,
        last_only: bool = False,  # return logits of the last position only (generation)
        **layer_kwargs,
    ) -> torch.Tensor:
        c = self.config
        if cache is None:  # a plain full forward: the keys are this call's tokens
            slots = torch.arange(embeds.shape[1], device=embeds.device)
            mask = attention_mask_4d(attention_mask.bool(), slots)
            kv_length = embeds.shape[1]
        else:
            slots = cache.begin_step(attention_mask)
            mask = attention_mask_4d(cache.valid, slots)
            kv_length = cache.length
        base = rope_base(c.rope_theta, kv_length, c.max_position_embeddings, c.rope_dynamic_factor, c.head_dim)
        cos, sin = rope_cos_sin(positions, c.head_dim, base, embeds.dtype)

        x = embeds
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache, **layer_kwargs)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x)).float()  # [B, T, V]

    def rope_inv_freq(self, kv_length: int) -> torch.Tensor:
        """The rotary frequencies [head_dim/2] in effect for `kv_length` cached tokens; one tensor, reused while
        the base stays the same (it only changes past InternLM2's dynamic-NTK limit)."""
        c = self.config
        base = rope_base(c.rope_theta, kv_length, c.max_position_embeddings, c.rope_dynamic_factor, c.head_dim)
        if self._inv_freq is None or self._inv_freq[0] != base:
            self._inv_freq = (base, rope_inv_freq(c.head_dim, base, self.embed.weight.device))
        return self._inv_freq[1]

    def decode_step(self, tokens, positions, cache: KVCache, inv_freq, **layer_kwargs) -> torch.Tensor:
        """One new token per row at fixed shapes: tokens, positions [B, 1] -> float32 logits [B, V].

        The hot loop of generation. The caller does the Python bookkeeping first (`cache.begin_step` reserves
        this step's slot, `rope_inv_freq(cache.length)` gives the frequencies), so nothing in here reads a
        Python number that changes from step to step and `torch.compile` captures it once, with no graph
        breaks, for a whole generation. It runs the same layers as `forward`: the same numbers.
        """
        x = self.embed(tokens)  # [B, 1, H]
        mask = attention_mask_4d(cache.valid, cache.slots)  # [B, 1, 1, S]
        cos, sin = rope_cos_sin_from(positions, inv_freq, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache, **layer_kwargs)
        return self.lm_head(self.norm(x)).float()[:, -1]  # [B, V]
