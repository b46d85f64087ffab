"""The pieces every tower and the decoder share: RMSNorm, a ViT's self-attention, which hidden state leaves a tower.

Mirrors the parts that are the same math in several upstream files:
- `RMSNorm`: Qwen2RMSNorm / LlamaRMSNorm (transformers), InternLM2RMSNorm and InternRMSNorm (InternVL's
  `modeling_internlm2.py`, `modeling_intern_vit.py`), and SAIL-ViT's RMSNorm (SAIL-VL2 `modeling_sailvit.py`);
- `vit_attention`: the head split, unmasked softmax attention and head merge of InternAttention, SAIL-ViT's
  attention and CLIPAttention. Each tower keeps its own projections (a fused `qkv` or separate q/k/v), its own
  q/k norms and its own scaling, because those are where they differ (and where their official names live);
- `hidden_state_depth`: how `select_layer` indexes a tower's hidden states, InternViT / CLIP / Mono's patch
  model (`hidden_states[0]` is the embeddings) and SAIL-ViT (it is the output of block 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minisail.errors import ConfigError


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
    head_dim-wide slices of C. The softmax runs in the activation dtype, as in every tower's upstream code.
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
