"""Declarative weight maps: official checkpoint keys -> minisail parameter names, per family.

A `Rule` says which official tensors make one minisail parameter and how (`Join`): most are a rename; the
fused projections are the official q/k/v (or gate/up) matrices stacked by rows; InternLM2's `wqkv`, stored
grouped per key/value head, is regrouped into [q; k; v]. Every `Join` has its inverse (`split`), so the same
table writes official-layout checkpoints (tests, benchmark) and round-trips exactly. Joins only move rows, so
an int8 Linear's per-row scales (bitsandbytes' `X.SCB`) go through its weight's rule unchanged (loader.py).
The benchmark and the transformers parity tests map official <-> transformers names with the same machinery
(bench/hf_names.py), `resolve_source` being the lookup from the other side.

Patterns: `{i}` stands for a layer index, `*` for the rest of a name (one per pattern). Rules are tried in
order and the first whose target matches a parameter name wins.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from minisail.llm.decoder_config import DecoderConfig


@dataclass(frozen=True)
class Join:
    join: Callable[[list[torch.Tensor]], torch.Tensor]  # official tensors -> minisail tensor
    split: Callable[[torch.Tensor], list[torch.Tensor]]  # minisail tensor -> official tensors
    is_identity: bool = False


IDENTITY = Join(lambda parts: parts[0], lambda whole: [whole], is_identity=True)


def stack_rows(sizes: list[int]) -> Join:
    """Official matrices with `sizes` rows each, stacked in order (q|k|v, gate|up)."""
    return Join(lambda parts: torch.cat(parts, dim=0), lambda whole: list(whole.split(sizes, dim=0)))


@dataclass(frozen=True)
class Rule:
    target: str  # minisail parameter name pattern
    sources: tuple[str, ...]  # official key patterns
    join: Join = IDENTITY
    tied_to: str | None = None  # an official key to use instead when every source is absent (tied lm_head)


def _regex(pattern: str) -> re.Pattern:
    escaped = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\*", r"(?P<rest>.+)")
    return re.compile(escaped)


def _fill(pattern: str, groups: dict[str, str]) -> str:
    return pattern.replace("{i}", groups.get("i") or "").replace("*", groups.get("rest") or "")


@dataclass
class KeyMap:
    rules: list[Rule]
    ignore: list[str] = field(default_factory=list)  # regexes of official keys that are deliberately unused

    def resolve(self, target: str) -> tuple[Rule, list[str], str | None]:
        """(rule, official source keys, tied fallback key) for one minisail parameter name."""
        for rule in self.rules:
            match = _regex(rule.target).fullmatch(target)
            if match:
                groups = match.groupdict()
                tied = _fill(rule.tied_to, groups) if rule.tied_to else None
                return rule, [_fill(s, groups) for s in rule.sources], tied
        raise KeyError(f"no weight-map rule produces {target!r}")

    def resolve_source(self, key: str) -> tuple[Rule, str, list[str]] | None:
        """The reverse lookup: (rule, target name, all its source keys) for the first rule that reads `key`,
        or None. Writing a map's targets from its sources without knowing the targets' names in advance."""
        for rule in self.rules:
            for source in rule.sources:
                match = _regex(source).fullmatch(key)
                if match:
                    groups = match.groupdict()
                    return rule, _fill(rule.target, groups), [_fill(s, groups) for s in rule.sources]
        return None

    def is_ignored(self, key: str) -> bool:
        return any(re.fullmatch(pattern, key) for pattern in self.ignore)

    def __add__(self, other: KeyMap) -> KeyMap:
        return KeyMap(self.rules + other.rules, self.ignore + other.ignore)


# Stale rotary buffers that some old checkpoints carry: never weights.
ROTARY_BUFFERS = [r".*rotary_emb\.(inv_freq|cos_cached|sin_cached)"]


def bnb_scale_key(weight_key: str) -> str:
    """bitsandbytes LLM.int8 checkpoints store a quantised Linear `X` as `X.weight` (int8 [out, in]) plus `X.SCB`
    (float32 [out], each row's absmax) and sometimes `X.weight_format` (uint8 scalar, 0 = row-major)."""
    return weight_key.removesuffix("weight") + "SCB"


def bnb_format_key(weight_key: str) -> str:
    return weight_key + "_format"


def passthrough(prefix: str) -> KeyMap:
    """Parameters named exactly as the checkpoint (InternViT under `vision_model.`)."""
    return KeyMap([Rule(prefix + "*", (prefix + "*",))])


def mlp1_projector(dst: str = "projector.", src: str = "mlp1.") -> KeyMap:
    """InternVL's mlp1 = Sequential(LayerNorm, Linear, GELU, Linear): indices 0, 1, 3."""
    rules = []
    for name, index in (("norm", 0), ("fc1", 1), ("fc2", 3)):
        for kind in ("weight", "bias"):
            rules.append(Rule(f"{dst}{name}.{kind}", (f"{src}{index}.{kind}",)))
    return KeyMap(rules)


def hf_decoder(config: DecoderConfig, *, src: str, head: str, dst: str) -> KeyMap:
    """transformers' Qwen2 / Qwen3 / Llama names (`src` = "...model.", `head` = the lm_head key)."""
    q, kv, inter = (
        config.num_heads * config.head_dim,
        config.num_kv_heads * config.head_dim,
        config.intermediate_size,
    )
    layer, official = f"{dst}layers.{{i}}.", f"{src}layers.{{i}}."
    attn = f"{official}self_attn."
    return KeyMap(
        [
            Rule(f"{dst}embed.weight", (f"{src}embed_tokens.weight",)),
            Rule(f"{layer}attn_norm.weight", (f"{official}input_layernorm.weight",)),
            Rule(f"{layer}mlp_norm.weight", (f"{official}post_attention_layernorm.weight",)),
            Rule(
                f"{layer}attn.qkv.weight",
                (f"{attn}q_proj.weight", f"{attn}k_proj.weight", f"{attn}v_proj.weight"),
                stack_rows([q, kv, kv]),
            ),
            Rule(
                f"{layer}attn.qkv.bias",
                (f"{attn}q_proj.bias", f"{attn}k_proj.bias", f"{attn}v_proj.bias"),
                stack_rows([q, kv, kv]),
            ),
            Rule(f"{layer}attn.o.weight", (f"{attn}o_proj.weight",)),
            Rule(f"{layer}attn.q_norm.weight", (f"{attn}q_norm.weight",)),
            Rule(f"{layer}attn.k_norm.weight", (f"{attn}k_norm.weight",)),
            Rule(
                f"{layer}mlp.gate_up.weight",
                (f"{official}mlp.gate_proj.weight", f"{official}mlp.up_proj.weight"),
                stack_rows([inter, inter]),
            ),
            Rule(f"{layer}mlp.down.weight", (f"{official}mlp.down_proj.weight",)),
            Rule(f"{dst}norm.weight", (f"{src}norm.weight",)),
            # The stored head is used whenever it exists (SAIL-VL2-2B stores one although its config says tied);
            # only a checkpoint without one falls back to the embedding, and only if its config says tied.
            Rule(
                f"{dst}lm_head.weight",
                (head,),
                tied_to=f"{src}embed_tokens.weight" if config.tie_word_embeddings else None,
            ),
        ],
        ignore=ROTARY_BUFFERS,
    )


def internlm2_wqkv(config: DecoderConfig) -> Join:
    """InternLM2's fused `attention.wqkv`, grouped per key/value head, <-> minisail's [q; k; v] rows.

    Official rows: for each kv head h, its g = heads/kv_heads query heads, then its key head, then its value
    head, each head_dim rows: W.view(kv, g + 2, head_dim, hidden). Query head h*g + j uses kv head h.
    Only rows move, so the same regroup applies to anything with one entry per row (int8 per-row scales).
    """
    kv, d = config.num_kv_heads, config.head_dim
    g = config.num_heads // kv

    def join(parts):
        (w,) = parts
        rest = w.shape[1:]  # [in] for a weight, [] for a per-row vector
        grouped = w.reshape(kv, g + 2, d, *rest)  # [kv, g+2, d, *rest]
        q = grouped[:, :g].reshape(kv * g * d, *rest)
        k = grouped[:, g].reshape(kv * d, *rest)
        v = grouped[:, g + 1].reshape(kv * d, *rest)
        return torch.cat([q, k, v], dim=0)

    def split(whole):
        rest = whole.shape[1:]
        q, k, v = whole.split([kv * g * d, kv * d, kv * d], dim=0)
        per_kv_head = [q.reshape(kv, g, d, *rest), k.reshape(kv, 1, d, *rest), v.reshape(kv, 1, d, *rest)]
        return [torch.cat(per_kv_head, dim=1).reshape(kv * (g + 2) * d, *rest)]

    return Join(join, split)


def internlm2_decoder(config: DecoderConfig, *, src: str, head: str, dst: str) -> KeyMap:
    """InternLM2 names (InternVL's modeling_internlm2.py): tok_embeddings, attention.wqkv/wo, feed_forward.w1/w3/w2."""
    inter = config.intermediate_size
    layer, official = f"{dst}layers.{{i}}.", f"{src}layers.{{i}}."
    return KeyMap(
        [
            Rule(f"{dst}embed.weight", (f"{src}tok_embeddings.weight",)),
            Rule(f"{layer}attn_norm.weight", (f"{official}attention_norm.weight",)),
            Rule(f"{layer}mlp_norm.weight", (f"{official}ffn_norm.weight",)),
            Rule(f"{layer}attn.qkv.weight", (f"{official}attention.wqkv.weight",), internlm2_wqkv(config)),
            Rule(f"{layer}attn.o.weight", (f"{official}attention.wo.weight",)),
            # w1 = gate, w3 = up, w2 = down
            Rule(
                f"{layer}mlp.gate_up.weight",
                (f"{official}feed_forward.w1.weight", f"{official}feed_forward.w3.weight"),
                stack_rows([inter, inter]),
            ),
            Rule(f"{layer}mlp.down.weight", (f"{official}feed_forward.w2.weight",)),
            Rule(f"{dst}norm.weight", (f"{src}norm.weight",)),
            Rule(
                f"{dst}lm_head.weight",
                (head,),
                tied_to=f"{src}tok_embeddings.weight" if config.tie_word_embeddings else None,
            ),
        ],
        ignore=ROTARY_BUFFERS,
    )


def internlm2_visual_experts(config: DecoderConfig, *, src: str, dst: str) -> KeyMap:
    """Mono-InternVL's two FFNs per layer: `feed_forward` (text) and `feed_forward_ve` (visual), each w1/w3/w2.

    Put these rules before `internlm2_decoder`'s: they fill `mlp.text.*` and `mlp.visual.*` of a
    `VisualExpertMLP`; the plain `mlp.*` rules then match nothing and every other name is shared.
    """
    inter = config.intermediate_size
    layer, official = f"{dst}layers.{{i}}.", f"{src}layers.{{i}}."
    rules = []
    for expert, module in (("text", "feed_forward"), ("visual", "feed_forward_ve")):
        rules.append(
            Rule(
                f"{layer}mlp.{expert}.gate_up.weight",
                (f"{official}{module}.w1.weight", f"{official}{module}.w3.weight"),
                stack_rows([inter, inter]),
            )
        )
        rules.append(Rule(f"{layer}mlp.{expert}.down.weight", (f"{official}{module}.w2.weight",)))
    return KeyMap(rules)


def sail_vit(src: str = "vision_model.", dst: str = "vision_model.") -> KeyMap:
    """SAIL-ViT (SAIL-VL2's `modeling_sailvit.py`): minisail keeps the official names, so every rule is a rename.

    The biases (`qkv_bias`, `use_bias`) exist only when the config asks for them (never in the releases).
    """
    block, official = f"{dst}trunk.blocks.{{i}}.", f"{src}trunk.blocks.{{i}}."
    names = [f"preprocessor.patchifier.proj.{kind}" for kind in ("weight", "bias")]
    names += ["preprocessor.patchifier.norm.weight", "preprocessor.pos_embed", "trunk.post_trunk_norm.weight"]
    rules = [Rule(dst + name, (src + name,)) for name in names]
    for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "mlp.fc3"):
        rules += [Rule(f"{block}{name}.{kind}", (f"{official}{name}.{kind}",)) for kind in ("weight", "bias")]
    rules += [Rule(f"{block}{name}.weight", (f"{official}{name}.weight",)) for name in ("norm_1", "norm_2")]
    return KeyMap(rules)


def renamed(dst: str, src: str) -> KeyMap:
    """Parameters named as the checkpoint under another prefix (the CLIP tower: `vit.vision_model.*`)."""
    return KeyMap([Rule(dst + "*", (src + "*",))])


def llava_norm_projector(depth: int, dst: str = "projector.", src: str = "model.mm_projector.") -> KeyMap:
    """LLaVA's mlp{depth}x_gelu_Norm = Sequential(Linear, LayerNorm, [GELU, Linear, LayerNorm] ...): the k-th
    Linear is index 3k, its LayerNorm 3k + 1 (Yi-VL: 0, 1, 3, 4)."""
    rules = []
    for k in range(depth):
        for kind in ("weight", "bias"):
            rules.append(Rule(f"{dst}fcs.{k}.{kind}", (f"{src}{3 * k}.{kind}",)))
            rules.append(Rule(f"{dst}norms.{k}.{kind}", (f"{src}{3 * k + 1}.{kind}",)))
    return KeyMap(rules)


def clip_vision_unused(src: str, *, num_layers: int, depth: int) -> KeyMap:
    """The official CLIP vision keys LLaVA never reads, so minisail does not build them:
    - `post_layernorm`: it only normalises the pooled CLS output, and LLaVA takes an inner hidden state;
    - blocks `depth` .. num_layers - 1: they come after the selected hidden state (Yi-VL: the last block);
    - `embeddings.position_ids`: an arange buffer that checkpoints of older transformers versions store."""
    prefix = re.escape(src)
    ignore = [prefix + r"post_layernorm\.(weight|bias)", prefix + r"embeddings\.position_ids"]
    ignore += [prefix + re.escape(f"encoder.layers.{i}.") + ".+" for i in range(depth, num_layers)]
    return KeyMap([], ignore)
