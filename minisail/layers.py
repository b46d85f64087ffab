"""The layers every model is built from: norms, attention, rotary embedding, MLP.

Shared by the vision towers and the decoder:
- `RMSNorm`: Qwen2RMSNorm / LlamaRMSNorm (transformers), InternLM2RMSNorm and InternRMSNorm (InternVL's
  `modeling_internlm2.py`, `modeling_intern_vit.py`), and SAIL-ViT's RMSNorm (SAIL-VL2 `modeling_sailvit.py`):
  statistics in float32, cast back to the activation dtype before the weight;
- `vit_attention`: the head split, unmasked softmax attention and head merge of InternAttention, SAIL-ViT's
  attention and CLIPAttention. Each tower keeps its own projections (a fused `qkv` or separate q/k/v), its own
  q/k norms and its own scaling, because those are where they differ (and where their official names live);
- `hidden_state_depth`: how `select_layer` indexes a tower's hidden states, InternViT / CLIP / Mono's patch
  model (`hidden_states[0]` is the embeddings) and SAIL-ViT (it is the output of block 1).

The decoder's own blocks (used by `minisail/llm/decoder.py`), mirroring the layer classes of transformers'
`modeling_qwen2.py` / `modeling_llama.py` and InternVL's `modeling_internlm2.py`:
- `Rotary`, `apply_rope`: rotary position embedding in the rotate-half (NeoX) layout, with InternLM2's dynamic
  NTK scaling (InternLM2DynamicNTKScalingRotaryEmbedding). Channel pair i of a head is (i, i + head_dim/2) and
  turns by `position * base^(-2i/head_dim)`; angles and cos/sin in float32, then cast to the activation dtype;
- `Attention`: causal grouped-query attention. The families differ only in `DecoderConfig` switches: q/k/v
  biases (Qwen2), per-head q/k RMSNorm before the rotary embedding (Qwen3), neither (InternLM2, Llama);
- `SwiGLU`: down(silu(gate(x)) * up(x)).
q/k/v and gate/up are fused Linears (`qkv`, `gate_up`): the checkpoints store them apart (or grouped, for
InternLM2) and the weight maps in `minisail/checkpoint/keymaps.py` join them at load: one matmul, the same math.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from minisail.errors import ConfigError

if TYPE_CHECKING:  # annotations only: the decoder imports this module
    from minisail.llm.decoder import KVCache
    from minisail.llm.decoder_config import DecoderConfig


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, normalised in float32 and cast back before the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def vit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, scale: float | None = None
) -> torch.Tensor:
    """softmax(q k^T * scale) v per head, every token attending to every token: q, k, v [N, L, C] -> [N, L, C].

    `scale` defaults to head_dim^-0.5; CLIP passes 1.0 because it has already scaled q before the product, as
    upstream does (scaling q first rounds differently from scaling the product). Heads are the consecutive
    head_dim-wide slices of C. Upstream's eager paths take the softmax in the activation dtype; SDPA's CPU kernels
    take it in float32 between their products (for bf16 inputs: closer to exact, not the same bits; float32 is the
    logit-for-logit mode).
    """
    N, L, C = q.shape
    q, k, v = (t.view(N, L, num_heads, C // num_heads).transpose(1, 2) for t in (q, k, v))  # [N, heads, L, d]
    y = F.scaled_dot_product_attention(q, k, v, scale=scale)  # no mask: a ViT is bidirectional
    return y.transpose(1, 2).reshape(N, L, C)  # heads back side by side


def hidden_state_depth(
    select_layer: int, num_layers: int, *, embeddings_first: bool, tower: str, source: str = "select_layer"
) -> int:
    """How many layers a tower runs so that its output is `hidden_states[select_layer]` (Python indexing).

    Towers differ only in what their tuple of hidden states holds:
    - embeddings_first (InternViT, CLIP, Mono's patch model with no layers): `[embeddings, layer 1, ..., layer L]`,
      L + 1 entries, so hidden state k is the output after k layers;
    - otherwise (SAIL-ViT): `[layer 1, ..., layer L]`, L entries, so hidden state k is the output after k + 1.
    Layers after the selected one cannot influence it, so they need not run (or even be built).
    A `select_layer` outside the tuple is a ConfigError (a ValueError) naming `source` and the valid range.
    """
    depths = range(0 if embeddings_first else 1, num_layers + 1)  # depths[k]: layers behind hidden state k
    try:
        return depths[select_layer]
    except IndexError:
        first = "the embeddings" if embeddings_first else "the output of layer 1"
        raise ConfigError(
            f"{source} {select_layer} is outside a {num_layers}-layer {tower} "
            f"(valid: -{len(depths)} .. {len(depths) - 1}; 0 is {first})"
        ) from None


# -------------------------------------------------- the decoder's blocks


class Rotary:
    """cos/sin tables [B, T, head_dim] for integer positions, for a step over a given number of keys.

    Not an nn.Module on purpose: it holds no weights, and the official checkpoints' `rotary_emb.inv_freq`
    buffers are recomputed here rather than loaded (they are listed as ignored in the weight maps).
    """

    def __init__(self, head_dim: int, theta: float, max_positions: int, dynamic_factor: float | None = None):
        self.head_dim = head_dim
        self.theta = float(theta)
        self.max_positions = max_positions
        self.dynamic_factor = dynamic_factor  # InternLM2 rope_scaling {type: dynamic, factor}; None: plain RoPE
        self._inv_freq: tuple[tuple[float, torch.device], torch.Tensor] | None = None  # ((base, device), freqs)

    def base(self, kv_length: int) -> float:
        """The rotary base in effect when the key/value sequence holds `kv_length` tokens.

        Plain RoPE uses theta everywhere. InternLM2's dynamic NTK scaling switches to a larger base once the
        sequence is longer than max_positions:
            base = theta * (factor * n / max_positions - (factor - 1)) ** (d / (d - 2)).
        Upstream recomputes it from the current key/value length at every call, and keys already in the cache
        keep the rotation they were given. (Upstream also keeps the grown table for later, shorter calls on the
        same module; minisail computes it from the call alone, which agrees within any one generation.)
        """
        if self.dynamic_factor is None or kv_length <= self.max_positions:
            return self.theta
        factor, d = self.dynamic_factor, self.head_dim
        scale = factor * kv_length / self.max_positions - (factor - 1)
        return self.theta * scale ** (d / (d - 2))

    def inv_freq(self, kv_length: int, device=None) -> torch.Tensor:
        """The rotation speed of each channel pair, base^(-2i/d) for i < d/2: float32 [head_dim/2].

        One tensor, reused while the base stays the same (it only changes past InternLM2's NTK limit)."""
        key = (self.base(kv_length), torch.device(device or "cpu"))
        if self._inv_freq is None or self._inv_freq[0] != key:
            base, device = key
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
            self._inv_freq = (key, 1.0 / (base**exponents))
        return self._inv_freq[1]

    def tables(self, positions: torch.Tensor, kv_length: int, dtype: torch.dtype):
        """cos, sin [B, T, head_dim] in `dtype` for integer `positions` [B, T] of a step over kv_length keys."""
        angles = positions.float()[..., None] * self.inv_freq(kv_length, positions.device)  # [B, T, head_dim/2]
        angles = torch.cat((angles, angles), dim=-1)  # [B, T, head_dim]: pair i is (i, i + head_dim/2)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dimension: a quarter turn of every channel pair (i, i + d/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D] rotated by cos/sin [B, 1, T, D] (one table for every head)."""
    return x * cos + rotate_half(x) * sin


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
        H, KV, D = self.num_heads, self.num_kv_heads, self.head_dim
        heads = self.qkv(x).view(B, T, H + 2 * KV, D).transpose(1, 2)  # [B, q heads; k heads; v heads, T, D]
        q, k, v = heads.split([H, KV, KV], dim=1)  # [B, heads, T, D] each
        if self.config.qk_norm:
            q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        else:  # every q and k head turns by the same angles: one rotation over both (the same numbers)
            q, k = apply_rope(heads[:, : H + KV], cos, sin).split([H, KV], dim=1)
        if cache is not None:  # write this step's keys/values, attend over everything cached so far
            k, v = cache.update(self.layer_index, k, v)  # [B, kv_heads, S, D]: S slots written (all, traced)
            mask = mask[..., : k.shape[2]]  # [B, 1, T, S]
        # Query head h reads key/value head h // (num_heads / num_kv_heads).
        if T == 1 and KV != H:
            # Decoding: one query per head, and a key/value head's g query heads share its keys and the mask row,
            # so they are g query rows of that head (the same numbers): CPU SDPA runs this one product per
            # key/value head several times faster than the grouped-query path does g one-row products.
            g = H // KV
            rows = q.reshape(B, KV, g, D)  # [B, kv_heads, g, D]
            y = F.scaled_dot_product_attention(rows, k, v, attn_mask=mask).reshape(B, H, 1, D)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=KV != H)
        return self.o(y.transpose(1, 2).reshape(B, T, H * D))


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
