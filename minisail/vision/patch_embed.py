"""Mono-InternVL's vision "encoder": a patch embedding and nothing else (InternVisionPatchModel).

Mirrors `InternVisionPatchModel` in Mono-InternVL's `internvl/model/internvl_chat/modeling_intern_vit.py`
(github OpenGVLab/Mono-InternVL @ 5b17ab45) and lmdeploy's `internvl_patch.py`. Mono-InternVL is monolithic:
the language model's visual experts do the work a ViT would, so the vision side is only

    pixel_values [N, 3, S, S]
      -> patch conv (14x14, stride 14, with bias)                 [N, C, g, g], g = S / 14
      -> tokens, row-major, with class_embedding prepended        [N, 1 + g*g, C]
      -> + position_embedding: the CLS row as stored, the patch rows bicubic-resized in float32
         (align_corners=False) from the table's own grid (vision image_size / 14) to g x g
      -> CLS dropped                                               [N, g*g, C]

No transformer layers, no norm: the CLS token is computed and thrown away, so `class_embedding` never
reaches any output (it is still a checkpoint tensor, loaded like the others). These are exactly the first
steps of InternViT, so `InternVisionEmbeddings` (minisail/vision/intern_vit.py) is reused as is; it reads
only hidden_size, image_size and patch_size from its config. Checkpoint keys are the official
`vision_model.embeddings.{class_embedding, patch_embedding.weight, patch_embedding.bias, position_embedding}`.

The vision config of a Mono checkpoint keeps InternViT-6B's class defaults for fields this model never reads
(num_hidden_layers 48, num_attention_heads 25, intermediate_size 12800, norm_type, qk_normalization, ...);
they are ignored here, as upstream ignores them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minisail.config import image_and_patch, positive
from minisail.layers import hidden_state_depth
from minisail.vision.intern_vit import InternVisionEmbeddings


@dataclass(frozen=True)
class PatchEmbedConfig:
    hidden_size: int  # C: 1024 for Mono-InternVL-2B (INFERRED)
    image_size: int  # the size the position table was trained at: its grid is image_size // patch_size
    patch_size: int  # 14

    @classmethod
    def from_config(cls, vision: dict, where: str = "vision_config") -> PatchEmbedConfig:
        """Only what the patch model computes with: it has no layers, MLP or norm, so num_hidden_layers,
        hidden_act, layer_norm_eps and the other InternViT fields a Mono config carries are ignored, as upstream
        ignores them."""
        image_size, patch_size = image_and_patch(vision, where)
        return cls(hidden_size=positive(vision, "hidden_size", where), image_size=image_size, patch_size=patch_size)


class InternVisionPatchModel(nn.Module):
    """`forward(pixel_values [N,3,S,S], select_layer=-1) -> [N, (S/14)^2, C]`: position-embedded patches."""

    def __init__(self, config: PatchEmbedConfig):
        super().__init__()
        self.config = config
        self.embeddings = InternVisionEmbeddings(config)

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        # With no layers the only hidden state is the embeddings: index 0, or -1 counted from the end.
        hidden_state_depth(select_layer, 0, embeddings_first=True, tower="patch-embedding model")
        return self.embeddings(pixel_values)[:, 1:]  # drop CLS
