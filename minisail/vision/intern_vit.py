"""InternViT: the vision transformer of SAIL-VL-2B (InternViT-300M-448px) and InternVL-Chat-V1-5 (InternViT-6B).

Mirrors InternVL's `modeling_intern_vit.py` (InternVisionEmbeddings / InternAttention / InternVisionEncoderLayer);
parameter names are the official ones, so the checkpoint's `vision_model.*` keys load unchanged.

    pixel_values [N, 3, S, S]
      -> patch conv (14x14, stride 14, bias) -> [N, C, g, g] -> tokens [N, g*g, C] (row-major)
      -> prepend class_embedding -> [N, 1 + g*g, C]
      -> + position_embedding (its patch part bicubic-resized, in float32, to g x g)
      -> layers: x + ls1 * attn(norm1(x));  x + ls2 * mlp(norm2(x))      (pre-norm, layer scale)
      -> hidden_states[select_layer] (0 = embeddings, L = last layer), CLS dropped -> [N, g*g, C]

Two variants, set by the config: InternViT-300M uses LayerNorm and a qkv bias; InternViT-6B uses RMSNorm, no
qkv bias, and RMS-normalises q and k over all heads at once (one norm of width heads*head_dim, not per head).
There is no final norm. Attention is SDPA (layers.vit_attention): upstream's naive path takes the softmax in the
activation dtype, SDPA in float32 (the same in float32; in bf16 slightly closer to exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minisail.config import choice, epsilon, flag, vit_sizes
from minisail.layers import RMSNorm, hidden_state_depth, vit_attention


@dataclass(frozen=True)
class InternViTConfig:
    hidden_size: int
    num_heads: int
    num_layers: int
    intermediate_size: int
    image_size: int  # the size the position table was trained at (its grid is image_size // patch_size)
    patch_size: int
    norm_type: str  # "layer_norm" (300M) or "rms_norm" (6B)
    norm_eps: float
    qkv_bias: bool
    qk_normalization: bool

    @classmethod
    def from_config(cls, vision: dict, where: str = "vision_config") -> InternViTConfig:
        """InternViT's `vision_config` (InternVisionConfig). Defaults are the upstream class defaults, used only
        where a released config omits the key (InternViT-6B-V1-5 has no norm_type). Ignored on purpose:
        num_channels (the upstream patch conv hard-codes 3 input channels), use_flash_attn (the same math),
        dropout, attention_dropout and drop_path_rate (off at eval), initializer_factor (initialisation only)."""
        norm_type = choice(vision, "norm_type", where, ("rms_norm", "layer_norm"), "rms_norm")
        # upstream applies ACT2FN[hidden_act] in the MLP; minisail implements exact (erf) GELU, the class default
        choice(vision, "hidden_act", where, ("gelu",), "gelu", why=": InternViT's MLP is exact (erf) GELU")
        return cls(
            **vit_sizes(vision, where),
            norm_type=norm_type,
            norm_eps=epsilon(vision, "layer_norm_eps", where, 1e-6),
            qkv_bias=flag(vision, "qkv_bias", where, False),
            qk_normalization=flag(vision, "qk_normalization", where, False),
        )


def make_norm(config: InternViTConfig, dim: int) -> nn.Module:
    if config.norm_type == "rms_norm":
        return RMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps)


class InternVisionEmbeddings(nn.Module):
    def __init__(self, config: InternViTConfig):
        super().__init__()
        C, self.grid = config.hidden_size, config.image_size // config.patch_size
        self.class_embedding = nn.Parameter(torch.empty(1, 1, C))
        self.patch_embedding = nn.Conv2d(3, C, kernel_size=config.patch_size, stride=config.patch_size)
        self.position_embedding = nn.Parameter(torch.empty(1, 1 + self.grid**2, C))

    def position_table(self, height: int, width: int) -> torch.Tensor:
        """[1, 1 + height*width, C]: the CLS row as stored, the patch rows bicubic-resized (float32) to the grid."""
        table = self.position_embedding
        patches = table[:, 1:].float().reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)  # [1, C, G, G]
        patches = F.interpolate(patches, size=(height, width), mode="bicubic", align_corners=False)
        patches = patches.reshape(1, -1, height * width).permute(0, 2, 1).to(table.dtype)  # [1, h*w, C]
        return torch.cat([table[:, :1], patches], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [N, C, h, w]
        N, C, h, w = patches.shape
        tokens = patches.flatten(2).transpose(1, 2)  # [N, h*w, C]
        cls = self.class_embedding.expand(N, 1, C).to(tokens.dtype)
        return torch.cat([cls, tokens], dim=1) + self.position_table(h, w).to(tokens.dtype)  # [N, 1+h*w, C]


class InternAttention(nn.Module):
    attend = staticmethod(vit_attention)  # the attention core (a CPU fast path may swap it: fast/vit_attention.py)

    def __init__(self, config: InternViTConfig):
        super().__init__()
        C = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, C // config.num_heads
        self.qkv = nn.Linear(C, 3 * C, bias=config.qkv_bias)  # rows: [q all heads; k; v]
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:  # 6B: RMSNorm over the whole width C = heads * head_dim
            self.q_norm = RMSNorm(C, config.norm_eps)
            self.k_norm = RMSNorm(C, config.norm_eps)
        self.proj = nn.Linear(C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split(x.shape[-1], dim=-1)  # each [N, L, C]
        if self.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.proj(self.attend(q, k, v, self.num_heads))  # softmax(q k^T / sqrt(d)) v, no mask


class InternMLP(nn.Module):
    def __init__(self, config: InternViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class InternVisionLayer(nn.Module):
    def __init__(self, config: InternViTConfig):
        super().__init__()
        C = config.hidden_size
        self.norm1, self.norm2 = make_norm(config, C), make_norm(config, C)
        self.attn, self.mlp = InternAttention(config), InternMLP(config)
        self.ls1 = nn.Parameter(torch.empty(C))  # layer scales
        self.ls2 = nn.Parameter(torch.empty(C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class InternVisionEncoder(nn.Module):
    def __init__(self, config: InternViTConfig):
        super().__init__()
        self.layers = nn.ModuleList(InternVisionLayer(config) for _ in range(config.num_layers))


class InternViT(nn.Module):
    """`forward(pixel_values [N,3,S,S], select_layer) -> [N, g*g, C]`: a hidden state with the CLS token dropped."""

    def __init__(self, config: InternViTConfig):
        super().__init__()
        self.config = config
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        # hidden_states = [embeddings, layer 1, ..., layer L]; later layers cannot influence the one selected.
        depth = hidden_state_depth(select_layer, self.config.num_layers, embeddings_first=True, tower="InternViT")
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers[:depth]:
            x = layer(x)
        return x[:, 1:]  # drop CLS
