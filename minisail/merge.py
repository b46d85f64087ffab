"""Vision tokens -> language-model rows: InternVL's pixel shuffle (each 2x2 block of ViT patch tokens becomes one
token with 4x the channels), then the projector MLP.

Mirrors `InternVLChatModel.pixel_shuffle` (with the reshapes around it in `extract_feature`) in
OpenGVLab/InternVL `internvl_chat/internvl/model/internvl_chat/modeling_internvl_chat.py`; SAIL-VL, SAIL-VL2
and Mono-InternVL merge the same way.

Shapes at 448 px, patch 14, scale 0.5 (k = 1/scale = 2):
    x [N, L=1024, C]  tokens row-major over a 32 x 32 patch grid (token r*32 + q is patch row r, column q)
 -> [N, 16, 2, 16, 2, C]  (block row bi, row parity dy, block column bj, column parity dx, channel)
 -> [N, 256, 4C]          merged token of block (bi, bj); its channels are [dy][dx][c]:
                          channel = dy*2C + dx*C + c, i.e. the concatenation of patches
                          (2bi, 2bj), (2bi, 2bj+1), (2bi+1, 2bj), (2bi+1, 2bj+1)
Token order, the only difference between the versions:
    v2: row-major over blocks, token bi*16 + bj (InternVL-Chat-V1-5, Mono-InternVL-2B and SAIL-VL2 configs);
    v1: the block grid transposed, token bj*16 + bi (upstream never swaps the axes back; it warns about it).
Upstream gets there with view/permute/view/permute on [N, h, w, C]; the single 6-d permute below is the same
map, checked in tests/unit/test_merge.py by filling every token with its coordinates.

Then the projector maps each merged token to a language-model row:
`MLPProjector` is InternVL's `mlp1` (InternVL `modeling_internvl_chat.py`): LayerNorm(4C) -> Linear(4C, H)
-> GELU (exact) -> Linear(H, H), applied to the pixel-shuffled tokens [N, T, 4C] -> [N, T, H].
The LayerNorm uses PyTorch's default eps 1e-5, not the ViT's 1e-6. Checkpoint keys: mlp1.0 (norm), mlp1.1, mlp1.3.

`LayerNormMLPProjector` is LLaVA's `mlp{depth}x_gelu_Norm` as Yi-VL builds it (Yi `VL/llava/model/
multimodal_projector/builder.py`): Linear(C, H) -> LayerNorm(H), then (depth - 1) x [GELU -> Linear(H, H) ->
LayerNorm(H)]. Yi-VL uses depth 2; it ends with a LayerNorm. eps 1e-5, exact GELU. Checkpoint keys:
model.mm_projector.{3k} (the k-th Linear) and .{3k + 1} (its LayerNorm); the GELUs hold no weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from minisail.errors import ConfigError

VERSIONS = ("v1", "v2")


def tokens_per_tile(image_size: int, patch_size: int, downsample_ratio: float) -> int:
    """Image tokens one tile becomes: upstream's int((image_size // patch_size) ** 2 * downsample_ratio ** 2)."""
    if image_size <= 0 or patch_size <= 0 or not 0 < downsample_ratio <= 1:
        raise ConfigError(
            f"need image_size > 0, patch_size > 0 and 0 < downsample_ratio <= 1, "
            f"got {image_size}, {patch_size}, {downsample_ratio}"
        )
    return int((image_size // patch_size) ** 2 * (downsample_ratio**2))


def pixel_shuffle(x: torch.Tensor, *, version: str = "v2", scale: float = 0.5) -> torch.Tensor:
    """[N, L, C] -> [N, L*scale^2, C/scale^2]: merge each k x k block of tokens (k = 1/scale) into one."""
    n, side, k, c = _check(x, version, scale)
    blocks = side // k
    x = x.reshape(n, blocks, k, blocks, k, c)  # [N, bi, dy, bj, dx, C]
    order = (0, 1, 3, 2, 4, 5) if version == "v2" else (0, 3, 1, 2, 4, 5)  # blocks (bi, bj) or (bj, bi)
    return x.permute(order).reshape(n, blocks * blocks, k * k * c)  # [N, L/k^2, k^2*C], channels [dy][dx][c]


def pixel_unshuffle(y: torch.Tensor, *, version: str = "v2", scale: float = 0.5) -> torch.Tensor:
    """The exact inverse of `pixel_shuffle`: [N, L', C'] -> [N, L'/scale^2, C'*scale^2]."""
    k = _factor(scale)
    if y.dim() != 3 or y.shape[2] % (k * k):
        raise ConfigError(f"pixel_unshuffle expects [N, L, C] with C divisible by {k * k}, got {list(y.shape)}")
    n, merged, ck = y.shape
    blocks = _square_side(merged)
    c = ck // (k * k)
    if version not in VERSIONS:
        raise ConfigError(f"unknown pixel shuffle version {version!r}; expected one of {VERSIONS}")
    y = y.reshape(n, blocks, blocks, k, k, c)  # v2: [N, bi, bj, dy, dx, C]; v1: [N, bj, bi, dy, dx, C]
    order = (0, 1, 3, 2, 4, 5) if version == "v2" else (0, 2, 3, 1, 4, 5)
    return y.permute(order).reshape(n, merged * k * k, c)  # via [N, bi, dy, bj, dx, C]


def _check(x: torch.Tensor, version: str, scale: float) -> tuple[int, int, int, int]:
    if version not in VERSIONS:
        raise ConfigError(f"unknown pixel shuffle version {version!r}; expected one of {VERSIONS}")
    k = _factor(scale)
    if x.dim() != 3:
        raise ConfigError(f"pixel_shuffle expects tokens [N, L, C], got shape {list(x.shape)}")
    n, length, c = x.shape
    side = _square_side(length)
    if side % k:
        raise ConfigError(
            f"pixel_shuffle at scale {scale} needs a token grid divisible by {k}, got {side}x{side} "
            f"({length} tokens); check the vision image_size / patch_size"
        )
    return n, side, k, c


def _factor(scale: float) -> int:
    """k = 1/scale, which must be a whole number (0.5 -> 2)."""
    if not 0 < scale <= 1 or (1 / scale) != round(1 / scale):
        raise ConfigError(f"pixel shuffle scale must be 1/k for a whole k (0.5 in every InternVL), got {scale}")
    return round(1 / scale)


def _square_side(length: int) -> int:
    side = math.isqrt(length)
    if side * side != length or length == 0:
        raise ConfigError(f"pixel shuffle needs a square token grid, got {length} tokens (not a perfect square)")
    return side


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
