"""The one table of official <-> transformers-native weight names, shared by the benchmark and the parity tests.

- bench/hf_side.py writes the benchmark's official checkpoint again under the names of transformers'
  `InternVLForConditionalGeneration` (`to_transformers(internvl(), ...)`), as transformers' own converter
  (`convert_internvl_weights_to_hf.py`) lays them out.
- tests/families/test_hf_parity_*.py write official-layout checkpoints from random transformers models
  (`to_official(intern_vit(...), ...)`, `to_official(sail_vit(), ...)`), which `minisail.load` then reads.

Each table is a minisail `KeyMap` (minisail/checkpoint/keymaps.py) whose targets are the official names and whose
sources are transformers' names: the official side holds the fused tensors (InternViT's and SAIL-ViT's
`attn.qkv`, rows [q; k; v]), and a `Join` makes one target from several sources and `split`s it back, exactly as
minisail's own maps fuse q/k/v. One table per tower, read in both directions, so the two can never disagree.

This module imports nothing from transformers: names are strings. It lives in bench/ (not installed), since
nothing under minisail/ is about transformers; the tests import it from the repository root.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from minisail.checkpoint.keymaps import Join, KeyMap, Rule
from minisail.errors import CheckpointError

# The official fused qkv = transformers' q_proj, k_proj, v_proj stacked by rows (equal sizes in both towers).
QKV = Join(lambda parts: torch.cat(parts, dim=0), lambda whole: list(whole.chunk(3, dim=0)))
# SAIL-ViT stores its position table as [1, g*g, C]; Aimv2 as an embedding's weight [g*g, C].
LEADING_AXIS = Join(lambda parts: parts[0][None], lambda whole: [whole[0]])


def intern_vit(official: str = "vision_model.", hf: str = "model.vision_tower.") -> KeyMap:
    """InternViT (300M and 6B) <-> transformers' InternVLVisionModel (`hf` = its prefix; "" when standalone)."""
    layer, hf_layer = f"{official}encoder.layers.{{i}}.", f"{hf}encoder.layer.{{i}}."
    return KeyMap(
        [
            Rule(f"{official}embeddings.class_embedding", (f"{hf}embeddings.cls_token",)),
            Rule(f"{official}embeddings.position_embedding", (f"{hf}embeddings.position_embeddings",)),
            Rule(f"{official}embeddings.patch_embedding.*", (f"{hf}embeddings.patch_embeddings.projection.*",)),
            Rule(f"{layer}attn.qkv.*", tuple(f"{hf_layer}attention.{p}_proj.*" for p in "qkv"), QKV),
            Rule(f"{layer}attn.proj.*", (f"{hf_layer}attention.projection_layer.*",)),
            Rule(f"{layer}attn.q_norm.*", (f"{hf_layer}attention.q_norm.*",)),  # 6B only
            Rule(f"{layer}attn.k_norm.*", (f"{hf_layer}attention.k_norm.*",)),
            Rule(f"{layer}ls1", (f"{hf_layer}lambda_1",)),
            Rule(f"{layer}ls2", (f"{hf_layer}lambda_2",)),
            Rule(f"{layer}norm1.*", (f"{hf_layer}layernorm_before.*",)),
            Rule(f"{layer}norm2.*", (f"{hf_layer}layernorm_after.*",)),
            Rule(f"{layer}mlp.*", (f"{hf_layer}mlp.*",)),
        ]
    )


def mlp1_projector(official: str = "mlp1.", hf: str = "model.multi_modal_projector.") -> KeyMap:
    """InternVL's mlp1 = Sequential(LayerNorm, Linear, GELU, Linear) <-> transformers' named projector."""
    names = {0: "layer_norm", 1: "linear_1", 3: "linear_2"}
    return KeyMap([Rule(f"{official}{index}.*", (f"{hf}{name}.*",)) for index, name in names.items()])


def language_model(hf: str = "model.language_model.", head: str = "lm_head.weight") -> KeyMap:
    """The official `language_model.` (a *ForCausalLM) <-> transformers' composite: its base model under `hf`,
    the head at the top level."""
    return KeyMap(
        [
            Rule("language_model.lm_head.weight", (head,)),
            Rule("language_model.model.*", (f"{hf}*",)),
        ]
    )


def internvl(prefix: str = "model.") -> KeyMap:
    """A whole InternVL checkpoint <-> transformers' InternVLForConditionalGeneration (`prefix` "model.") or
    InternVLModel (`prefix` ""; the vision-only benchmark preset)."""
    vision = intern_vit(hf=f"{prefix}vision_tower.")
    return vision + mlp1_projector(hf=f"{prefix}multi_modal_projector.") + language_model(f"{prefix}language_model.")


def sail_vit(official: str = "vision_model.", hf: str = "") -> KeyMap:
    """SAIL-VL2's SAIL-ViT <-> transformers' Aimv2VisionModel (use_head False, is_native False: AIMv2 at a fixed
    resolution, which SAIL-ViT is). SAIL-ViT's fc1/fc3 are the SwiGLU's gate/up, fc2 its down projection."""
    block, hf_layer = f"{official}trunk.blocks.{{i}}.", f"{hf}encoder.layers.{{i}}."
    return KeyMap(
        [
            Rule(f"{official}preprocessor.patchifier.proj.*", (f"{hf}embeddings.patch_embed.*",)),
            Rule(f"{official}preprocessor.patchifier.norm.*", (f"{hf}embeddings.rms_norm.*",)),
            Rule(f"{official}preprocessor.pos_embed", (f"{hf}embeddings.position_embedding.weight",), LEADING_AXIS),
            Rule(f"{block}attn.qkv.*", tuple(f"{hf_layer}attention.{p}_proj.*" for p in "qkv"), QKV),
            Rule(f"{block}attn.proj.*", (f"{hf_layer}attention.out_proj.*",)),
            Rule(f"{block}mlp.fc1.*", (f"{hf_layer}ffn.gate_proj.*",)),
            Rule(f"{block}mlp.fc2.*", (f"{hf_layer}ffn.down_proj.*",)),
            Rule(f"{block}mlp.fc3.*", (f"{hf_layer}ffn.up_proj.*",)),
            Rule(f"{block}norm_1.*", (f"{hf_layer}rms_norm1.*",)),
            Rule(f"{block}norm_2.*", (f"{hf_layer}rms_norm2.*",)),
            Rule(f"{official}trunk.post_trunk_norm.weight", (f"{hf}rms_norm.weight",)),
        ]
    )


def to_transformers(keymap: KeyMap, official: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official tensors -> transformers' names and values (fused tensors split). Every name must have a rule."""
    out = {}
    for name, tensor in official.items():
        try:
            rule, sources, _tied = keymap.resolve(name)
        except KeyError as error:
            raise CheckpointError(f"no transformers name for the official tensor {name!r}") from error
        out.update(zip(sources, rule.join.split(tensor), strict=True))
    return out


def to_official(keymap: KeyMap, hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers state dict -> official names and values (q/k/v fused). Every name must have a rule."""
    left, out = dict(hf_state), {}
    for name in hf_state:
        if name not in left:  # already consumed by a fused target
            continue
        found = keymap.resolve_source(name)
        if found is None:
            raise CheckpointError(f"no official name for the transformers tensor {name!r}")
        rule, target, sources = found
        missing = [s for s in sources if s not in left]
        if missing:
            raise CheckpointError(f"{target!r} needs {missing} besides {name!r}, which the state dict lacks")
        out[target] = rule.join.join([left.pop(s) for s in sources])
    return out
