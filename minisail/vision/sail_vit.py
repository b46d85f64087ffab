"""SAIL-ViT: the vision transformer of SAIL-VL2, an AIMv2 encoder at one fixed resolution.

Mirrors SAIL-VL2's remote `modeling_sailvit.py` (SAILViTPreprocessor / SAILViTBlock / SAILViTTransformer, itself
adapted from apple/aimv2-huge-patch14-448). Parameter names are the official ones under `vision_model.`, so the
weight map (`keymaps.sail_vit`) is a list of plain renames. transformers' native `Aimv2VisionModel` (use_head
False, is_native False, silu) is the same math and is the test oracle (tests/families/test_hf_parity_sailvl2.py).

    pixel_values [N, 3, S, S]                        S = image_size (448 in SAIL-VL2-2B), nothing else accepted
      -> preprocessor.patchifier.proj: conv 14x14, stride 14, with bias  -> [N, C, g, g] -> tokens [N, g*g, C]
      -> preprocessor.patchifier.norm: RMSNorm (rms_norm_eps, 1e-5)
      -> + preprocessor.pos_embed [1, g*g, C]        learned; no CLS token, no interpolation
      -> trunk.blocks: x + attn(norm_1(x));  x + mlp(norm_2(x))         (pre-norm, no layer scale)
             attn: qkv Linear (rows [q; k; v], each heads x head_dim), SDPA without mask, proj Linear
             mlp:  fc2(silu(fc1(x)) * fc3(x))                          (SwiGLU; fc1 = gate, fc3 = up)
      -> trunk.post_trunk_norm: RMSNorm                                -> [N, g*g, C]

What `select_layer` means here (upstream `SAILVLModel.extract_feature`, which differs from InternViT's):
    -1        the trunk output *after* post_trunk_norm (`last_hidden_state`) - what every release uses;
    any other upstream's `hidden_states[select_layer]`, a tuple holding the output of each block (block 1 first)
              *before* any final norm and *without* the embeddings: 0 = after block 1, -2 = after block L-1,
              L-1 = after block L but un-normed. Valid range: -L <= select_layer <= L-1.
Every output row is a patch token: there is no CLS token to drop.

Biases follow the config as upstream: `qkv_bias` for qkv, `use_bias` for proj and the three MLP matrices
(both false in the releases). Norm statistics run in float32; attention's products run in the activation dtype
(SDPA: its softmax in float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minisail.config import MAX_CHANNELS, choice, epsilon, flag, positive, vit_sizes
from minisail.errors import ConfigError, ImageError
from minisail.layers import RMSNorm, hidden_state_depth, vit_attention


@dataclass(frozen=True)
class SailViTConfig:
    hidden_size: int
    num_heads: int
    num_layers: int
    intermediate_size: int
    image_size: int  # the only tile size accepted: the position table has exactly (image_size / patch_size)^2 rows
    patch_size: int
    num_channels: int
    norm_eps: float  # rms_norm_eps, for every RMSNorm of the tower
    qkv_bias: bool
    use_bias: bool  # proj and MLP biases

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_config(cls, vision: dict, where: str = "vision_config") -> SailViTConfig:
        """The SAIL-ViT part of config.json (`vision_config`, SAILViTConfig; class defaults where a key may be
        absent). SAILViTConfig has no hidden_act: upstream's SwiGLU calls F.silu. A config that names another
        activation describes another model, so it is refused; attention_dropout / projection_dropout are off
        at eval."""
        why = ": SAIL-ViT's SwiGLU is SiLU, fixed in upstream's code"
        choice(vision, "hidden_act", where, ("silu",), "silu", why=why)
        sizes = vit_sizes(vision, where)
        if sizes["image_size"] % sizes["patch_size"]:
            raise ConfigError(
                f"config.json: {where}.image_size {sizes['image_size']} is not a multiple of patch_size "
                f"{sizes['patch_size']}"
            )
        return cls(
            **sizes,
            num_channels=positive(vision, "num_channels", where, 3, limit=MAX_CHANNELS),
            norm_eps=epsilon(vision, "rms_norm_eps", where, 1e-5),
            qkv_bias=flag(vision, "qkv_bias", where, False),
            use_bias=flag(vision, "use_bias", where, False),
        )


def select_depth(select_layer: int, num_layers: int, source: str = "select_layer") -> tuple[int, bool]:
    """(blocks to run, whether post_trunk_norm applies) for upstream's select_layer (see the module docstring).

    The hidden states hold no embeddings, so hidden state k is the output of block k + 1; only -1 is special."""
    depth = hidden_state_depth(select_layer, num_layers, embeddings_first=False, tower="SAIL-ViT", source=source)
    return depth, select_layer == -1


class SailViTPatchifier(nn.Module):
    def __init__(self, config: SailViTConfig):
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=p, stride=p)
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.proj(pixel_values)  # [N, C, g, g]
        return self.norm(patches.flatten(2).transpose(1, 2))  # [N, g*g, C], row-major over the patch grid


class SailViTPreprocessor(nn.Module):
    def __init__(self, config: SailViTConfig):
        super().__init__()
        self.patchifier = SailViTPatchifier(config)
        self.pos_embed = nn.Parameter(torch.empty(1, config.grid**2, config.hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = self.patchifier(pixel_values)  # [N, g*g, C]
        return tokens + self.pos_embed.to(tokens.dtype)  # added after the norm


class SailViTAttention(nn.Module):
    attend = staticmethod(vit_attention)  # the attention core (a CPU fast path may swap it: fast/vit_attention.py)

    def __init__(self, config: SailViTConfig):
        super().__init__()
        C = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, C // config.num_heads
        self.qkv = nn.Linear(C, 3 * C, bias=config.qkv_bias)  # rows: [q all heads; k; v]
        self.proj = nn.Linear(C, C, bias=config.use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split(x.shape[-1], dim=-1)  # each [N, L, C]
        return self.proj(self.attend(q, k, v, self.num_heads))  # softmax(q k^T / sqrt(d)) v, every patch sees all


class SailViTSwiGLU(nn.Module):
    def __init__(self, config: SailViTConfig):
        super().__init__()
        C, inner, bias = config.hidden_size, config.intermediate_size, config.use_bias
        self.fc1 = nn.Linear(C, inner, bias=bias)  # gate
        self.fc2 = nn.Linear(inner, C, bias=bias)  # down
        self.fc3 = nn.Linear(C, inner, bias=bias)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)) * self.fc3(x))


class SailViTBlock(nn.Module):
    def __init__(self, config: SailViTConfig):
        super().__init__()
        self.norm_1 = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = SailViTAttention(config)
        self.norm_2 = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = SailViTSwiGLU(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x))
        return x + self.mlp(self.norm_2(x))


class SailViTTrunk(nn.Module):
    def __init__(self, config: SailViTConfig):
        super().__init__()
        self.blocks = nn.ModuleList(SailViTBlock(config) for _ in range(config.num_layers))
        self.post_trunk_norm = RMSNorm(config.hidden_size, config.norm_eps)


class SailViT(nn.Module):
    """`forward(pixel_values [N,3,S,S], select_layer) -> [N, g*g, C]`: every patch token, no CLS."""

    def __init__(self, config: SailViTConfig):
        super().__init__()
        self.config = config
        self.preprocessor = SailViTPreprocessor(config)
        self.trunk = SailViTTrunk(config)

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        S, channels = self.config.image_size, self.config.num_channels
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (channels, S, S):
            raise ImageError(
                f"SAIL-ViT takes tiles of shape [N, {channels}, {S}, {S}] (its position table is not resized), "
                f"got {list(pixel_values.shape)}: preprocess the image with image_size={S}"
            )
        depth, normed = select_depth(select_layer, self.config.num_layers)
        x = self.preprocessor(pixel_values.to(self.preprocessor.pos_embed.dtype))  # [N, g*g, C]
        for block in self.trunk.blocks[:depth]:  # later blocks cannot influence the one selected
            x = block(x)
        return self.trunk.post_trunk_norm(x) if normed else x
