"""CLIP ViT: the vision tower of Yi-VL (CLIP ViT-H/14 at 448 px, from `vit/<name>/` beside the checkpoint).

Mirrors transformers 4.36 `models/clip/modeling_clip.py` (CLIPVisionEmbeddings, CLIPAttention, CLIPMLP,
CLIPEncoderLayer, CLIPVisionTransformer) as Yi's `VL/llava/model/clip_encoder/clip_encoder.py` calls it.
Parameter names are the official ones under `vision_model.`, so the vit folder's keys load by a plain rename.

    pixel_values [N, 3, S, S]
      -> patch conv (p x p, stride p, NO bias) -> [N, C, g, g] -> tokens [N, g*g, C] (row-major)
      -> prepend class_embedding -> [N, 1 + g*g, C]
      -> + position_embedding.weight (an Embedding looked up at 0..g*g: the whole table, never resized)
      -> pre_layrnorm (sic, the official name)                 = hidden_states[0]
      -> blocks: x + attn(layer_norm1(x)); x + mlp(layer_norm2(x))   block k gives hidden_states[k]
      -> hidden_states[depth]: [N, 1 + g*g, C] (CLS still first; the caller picks the patch rows)

- attention: separate q/k/v/out projections, all with biases; q is multiplied by head_dim^-0.5 *before*
  q k^T, as upstream does (not folded into the softmax); upstream's softmax runs in the activation dtype, SDPA's
  in float32 (the same in float32);
- MLP: fc1 -> GELU -> fc2 with `hidden_act` "gelu" (exact erf, Yi-VL) or "quick_gelu" (x * sigmoid(1.702 x),
  the CLIPVisionConfig default);
- `post_layernorm` only feeds the pooled CLS output, which LLaVA never uses: it is not built (its keys are
  ignored by the weight map). Blocks after `depth` cannot influence hidden_states[depth], so only `depth`
  blocks are built: Yi-VL's mm_vision_select_layer -2 runs 31 of ViT-H's 32 blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minisail.config import MAX_CHANNELS, choice, epsilon, positive, vit_sizes
from minisail.errors import ImageError
from minisail.layers import vit_attention

ACTIVATIONS = {
    "gelu": F.gelu,  # exact (erf) GELU
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


@dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int  # C
    num_heads: int
    num_layers: int  # blocks in the checkpoint (the tower may build fewer: `layers.hidden_state_depth`)
    intermediate_size: int
    image_size: int  # S: the only input size the position table fits (no interpolation)
    patch_size: int  # p
    layer_norm_eps: float
    hidden_act: str  # a key of ACTIVATIONS
    num_channels: int = 3

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return 1 + self.grid**2  # CLS + patches

    @classmethod
    def from_config(cls, vision: dict, where: str = "the vision tower's config.json") -> CLIPVisionConfig:
        """CLIPVisionConfig's keys (class defaults where absent); dropout / attention_dropout are off at eval."""
        act = choice(vision, "hidden_act", where, tuple(ACTIVATIONS), "quick_gelu")  # class default; Yi-VL's is gelu
        return cls(
            **vit_sizes(vision, where),
            layer_norm_eps=epsilon(vision, "layer_norm_eps", where, 1e-5),  # the class default
            hidden_act=act,
            num_channels=positive(vision, "num_channels", where, 3, limit=MAX_CHANNELS),
        )


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        C, p = config.hidden_size, config.patch_size
        self.class_embedding = nn.Parameter(torch.empty(C))  # 1-D, as stored
        self.patch_embedding = nn.Conv2d(config.num_channels, C, kernel_size=p, stride=p, bias=False)
        self.position_embedding = nn.Embedding(config.num_positions, C)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [N, C, g, g]
        tokens = patches.flatten(2).transpose(1, 2)  # [N, g*g, C]
        cls = self.class_embedding.expand(tokens.shape[0], 1, -1)  # [N, 1, C]
        # upstream looks the table up at position_ids = 0..g*g, i.e. takes every row in order
        return torch.cat([cls, tokens], dim=1) + self.position_embedding.weight  # [N, 1 + g*g, C]


class CLIPAttention(nn.Module):
    attend = staticmethod(vit_attention)  # the attention core (a CPU fast path may swap it: fast/vit_attention.py)

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        C = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, C // config.num_heads
        self.scale = self.head_dim**-0.5
        self.q_proj, self.k_proj = nn.Linear(C, C), nn.Linear(C, C)
        self.v_proj, self.out_proj = nn.Linear(C, C), nn.Linear(C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q_proj(x) * self.scale  # [N, L, C], scaled before the product, as upstream
        y = self.attend(q, self.k_proj(x), self.v_proj(x), self.num_heads, scale=1.0)  # softmax(q k^T) v, no mask
        return self.out_proj(y)


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.activation = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        C, eps = config.hidden_size, config.layer_norm_eps
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(C, eps=eps), nn.LayerNorm(C, eps=eps)
        self.self_attn, self.mlp = CLIPAttention(config), CLIPMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPVisionConfig, depth: int):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(depth))


class CLIPVisionTower(nn.Module):
    """`forward(pixel_values [N, C_in, S, S]) -> hidden_states[depth] [N, 1 + g*g, C]` (CLS first)."""

    def __init__(self, config: CLIPVisionConfig, depth: int):
        super().__init__()
        if not 0 <= depth <= config.num_layers:
            raise ValueError(f"depth {depth} is outside a {config.num_layers}-block ViT")
        self.config, self.depth = config, depth
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config, depth)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        c = self.config
        expected = (c.num_channels, c.image_size, c.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ImageError(
                f"the CLIP vision tower takes pixel_values [N, {c.num_channels}, {c.image_size}, {c.image_size}], "
                f"got {list(pixel_values.shape)}: its position table has exactly {c.num_positions} rows and is "
                f"not interpolated; preprocess with yivl_pixel_values(image, image_size={c.image_size})"
            )
        x = self.pre_layrnorm(self.embeddings(pixel_values))  # hidden_states[0]
        for layer in self.encoder.layers:
            x = layer(x)
        return x
