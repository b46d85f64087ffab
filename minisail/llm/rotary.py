"""Rotary position embedding (RoPE) in the rotate-half layout, with InternLM2's dynamic NTK scaling.

Mirrors the rotary classes of transformers' `modeling_qwen2.py` / `modeling_llama.py` (Qwen2RotaryEmbedding,
`rotate_half`, `apply_rotary_pos_emb`) and InternVL's `modeling_internlm2.py`
(InternLM2DynamicNTKScalingRotaryEmbedding). Every family minisail runs uses the same rotation:

- channel pair i of a head is (i, i + head_dim/2), the first half against the second half (NeoX layout), and
  it turns by the angle `position * base^(-2i/head_dim)`;
- `base` is `rope_theta`, except with InternLM2's dynamic NTK scaling past `max_position_embeddings`.

`Rotary` is the one place the tables are made: the decoder asks it for cos/sin at the positions of a step,
given how many keys the step attends over. Numerics follow upstream: the angles and their cos/sin in float32,
then cast to the activation dtype, so the rotation itself runs in the activation dtype.
"""

from __future__ import annotations

import torch


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
    """x [B, heads, T, D] rotated by cos/sin [B, T, D]."""
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    return x * cos + rotate_half(x) * sin
