"""Projectors: vision features -> language-model embeddings.

`MLPProjector` is InternVL's `mlp1` (InternVL `modeling_internvl_chat.py`): LayerNorm(4C) -> Linear(4C, H)
-> GELU (exact) -> Linear(H, H), applied to the pixel-shuffled tokens [N, T, 4C] -> [N, T, H].
The LayerNorm uses PyTorch's default eps 1e-5, not the ViT's 1e-6. Checkpoint keys: mlp1.0 (norm), mlp1.1, mlp1.3.

`LayerNormMLPProjector` is LLaVA's `mlp{depth}x_gelu_Norm` as Yi-VL builds it (Yi `VL/llava/model/
multimodal_projector/builder.py`): Linear(C, H) -> LayerNorm(H), then (depth - 1) x [GELU -> Linear(H, H) ->
LayerNorm(H)]. Yi-VL uses depth 2; it ends with a LayerNorm. eps 1e-5, exact GELU. Checkpoint keys:
model.mm_projector.{3k} (the k-th Linear) and .{3k + 1} (its LayerNorm); the GELUs hold no weights.
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


class LayerNormMLPProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, depth: int = 2, eps: float = 1e-5):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(in_dim if k == 0 else out_dim, out_dim) for k in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(out_dim, eps=eps) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k, (fc, norm) in enumerate(zip(self.fcs, self.norms, strict=True)):
            x = norm(fc(x if k == 0 else F.gelu(x)))  # [N, T, H]
        return x
