"""The building blocks of the decoder: grouped-query attention, SwiGLU (the rotation: rotary.py).

Mirrors the layer classes of transformers' `modeling_qwen2.py` / `modeling_llama.py` and InternVL's
`modeling_internlm2.py`; the families differ only in the switches of `DecoderConfig`:

- q/k/v biases (Qwen2), per-head q/k RMSNorm before the rotary embedding (Qwen3), neither (InternLM2, Llama);
- the rotary embedding (`minisail/llm/rotary.py`) is applied to q and k after the optional q/k norm;
- the query, key and value projections are one fused Linear (`qkv`), and gate/up one fused Linear
  (`gate_up`): the official checkpoints store them apart (or grouped, for InternLM2) and the weight maps
  in `minisail/checkpoint/keymaps.py` join them at load. One matmul instead of three is the same math.

RMSNorm is shared with the vision towers (`minisail/layers.py`): statistics in float32, cast back to the
activation dtype before the weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minisail.layers import RMSNorm
from minisail.llm.cache import KVCache
from minisail.llm.decoder_config import DecoderConfig
from minisail.llm.rotary import apply_rope

# ----------------------------------------------------------------------------------------------------------
# Attention and MLP
# ----------------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Causal grouped-query self-attention: `num_heads` query heads share `num_kv_heads` key/value heads."""

    def __init__(self, config: DecoderConfig, layer_index: int):
        super().__init__()
        self.config = config
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
        )
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # Rows of qkv: [q heads; k heads; v heads], each head head_dim rows (official q_proj/k_proj/v_proj stacked).
        self.qkv = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.qkv_bias)
        self.o = nn.Linear(q_size, config.hidden_size, bias=False)
        if config.qk_norm:  # Qwen3: RMSNorm over each head's head_dim, before the rotary embedding
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        B, T, _ = x.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # write this step's keys/values, attend over everything cached so far
            k, v = cache.update(self.layer_index, k, v)  # [B, kv_heads, S, D]
        # Query head h reads key/value head h // (num_heads / num_kv_heads).
        if T == 1 and self.num_kv_heads != self.num_heads:
            # Decoding: one query per head, and a key/value head's g query heads share its keys and the mask row,
            # so they are g query rows of that head (the same numbers): CPU SDPA runs this one product per
            # key/value head several times faster than the grouped-query path does g one-row products.
            g = self.num_heads // self.num_kv_heads
            rows = q.reshape(B, self.num_kv_heads, g, self.head_dim)  # [B, kv_heads, g, D]
            y = F.scaled_dot_product_attention(rows, k, v, attn_mask=mask).reshape(B, self.num_heads, 1, self.head_dim)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o(y.transpose(1, 2).reshape(B, T, q_size))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); `gate_up` holds the gate rows then the up rows."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)
