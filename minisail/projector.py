"""Projectors: vision features -> language-model embeddings.

`MLPProjector` is InternVL's `mlp1` (InternVL `modeling_internvl_chat.py`): LayerNorm(4C) -> Linear(4C, H)
-> GELU (exact) -> Linear(H, H), applied to the pixel-shuffled tokens [N, T, 4C] -> [N, T, H].
The LayerNorm uses PyTorch's default eps 1e-5, not the ViT's 1e-6. Checkpoint keys: mlp1.0 (norm), mlp1.1, mlp1.3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLPProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim, eps=eps)
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))
