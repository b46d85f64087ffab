"""Tensor parallelism over torch.distributed: one model's heads and MLP columns split across ranks.

The idea of gpt-fast's `tp.py` (and Megatron-LM's), written for minisail's modules. In every sharded block:

    x [B, T, H] (the same on every rank)
      -> column-parallel Linear: this rank's output rows only     (q/k/v of its heads; gate/up of its columns)
      -> the per-head / per-column work, purely local             (RoPE, attention, SiLU * up, GELU)
      -> row-parallel Linear: this rank's input columns only      (o / proj; down / fc2)  = a partial sum [B, T, H]
      -> all-reduce (sum over ranks), then the bias once          = the full output, again the same on every rank

so a block costs one all-reduce and holds 1/N of its weights. What is split:
- the decoder (Qwen2, Qwen3, InternLM2, Llama; Mono's text and visual experts alike): query heads, key/value heads
  (replicated when there are fewer than ranks) and SwiGLU columns, evenly (`plan.DecoderShard` refuses what does
  not divide);
- InternViT (InternViT-6B: 25 heads): heads split *unevenly* when they must (13 + 12 over 2 ranks), MLP columns
  too. Its qk-norm is one RMSNorm over all heads' channels at once, so each rank sums the squares of its own
  channels and one extra all-reduce (q and k together) gives the full mean before the rank normalises its part.
- the vocabulary: rows of the token embedding (a rank looks up the ids it holds, an all-reduce adds zeros to the
  one real row) and of lm_head (each rank its vocabulary's logits, an all-gather), unevenly if need be.
Replicated: the norms, the projector and the other (small) vision towers.

`shard_model` swaps the sharded modules into a model built on the meta device from the rank's local config and
returns the slices of the official tensors the rank must read (plan.py); `minisail.load(..., tp=...)` then fills it
through the ordinary strict loader. The math is the one-process math summed in another order: float32 logits
agree with one process to ~1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from minisail.checkpoint.keymaps import KeyMap
from minisail.errors import ConfigError
from minisail.layers import Attention, RMSNorm, SwiGLU, vit_attention
from minisail.parallel.launch import collective
from minisail.parallel.plan import DecoderShard, ShardedTensors, Slice, split_range
from minisail.vision.intern_vit import InternAttention, InternMLP, InternViT, InternViTConfig


@dataclass(frozen=True)
class TensorParallel:
    """Where this process stands: `rank` of `size` in `group` (None: the default, whole-world group)."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = None

    @staticmethod
    def resolve(tp) -> TensorParallel:
        """`tp`: a number of ranks (the whole default process group, which must have that size) or a
        torch.distributed ProcessGroup."""
        if isinstance(tp, int) and not isinstance(tp, bool) and tp < 1:
            raise ConfigError(f"tp={tp}: give a number of ranks, at least 1")
        if not dist.is_available() or not dist.is_initialized():
            raise ConfigError(
                f"tp={tp!r} needs torch.distributed initialised: launch with `torchrun --nproc-per-node N` (the CLI "
                "initialises it; from Python, under torchrun, call minisail.parallel.launch.start(N) first)"
            )
        if isinstance(tp, int) and not isinstance(tp, bool):
            if tp != dist.get_world_size():
                raise ConfigError(f"tp={tp} but the process group has {dist.get_world_size()} ranks: they must match")
            return TensorParallel(dist.get_rank(), tp)
        if isinstance(tp, dist.ProcessGroup):
            return TensorParallel(dist.get_rank(tp), dist.get_world_size(tp), tp)
        raise ConfigError(f"tp={tp!r}: give a number of ranks or a torch.distributed ProcessGroup")

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of `tensor` over the ranks (every rank gets the same result). bf16/fp16 partial sums are added
        in float32 and rounded once, as one process's matmul accumulates, not rounded at every addition."""
        if tensor.dtype in (torch.bfloat16, torch.float16):
            wide = tensor.float()
            with collective():
                dist.all_reduce(wide, group=self.group)
            return wide.to(tensor.dtype)
        with collective():
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather_last(self, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Every rank's `tensor` [..., sizes[rank]] side by side along the last dim: [..., sum(sizes)]."""
        width = max(sizes)  # all_gather wants equal shapes: pad to the widest, then trim each
        padded = F.pad(tensor, (0, width - tensor.shape[-1])).contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        with collective():
            dist.all_gather(parts, padded, group=self.group)
        return torch.cat([part[..., :size] for part, size in zip(parts, sizes, strict=True)], dim=-1)


class RowParallelLinear(nn.Linear):
    """The second Linear of a sharded block: its input columns of this rank, partial sums all-reduced, then the
    bias (whole on every rank, added once, after the sum). Parameter names are nn.Linear's."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel):
        super().__init__(in_features, out_features, bias=bias, device="meta")
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(F.linear(x, self.weight))  # [..., out]: this rank's partial sum, then the whole
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """The token embedding's rows [v0, v1) of the vocabulary: a rank looks up the ids it holds, zeros for the
    others, and the all-reduce adds the one real row to zeros (exact, in any dtype)."""

    def __init__(self, rows: tuple[int, int], dim: int, tp: TensorParallel):
        super().__init__(rows[1] - rows[0], dim, _weight=torch.empty(rows[1] - rows[0], dim, device="meta"))
        self.first, self.tp = rows[0], tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.first  # [B, T]
        held = (local >= 0) & (local < self.num_embeddings)
        rows = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight)  # [B, T, H]
        return self.tp.all_reduce(rows.masked_fill(~held[..., None], 0))


class VocabParallelHead(nn.Linear):
    """lm_head's rows [v0, v1): a rank computes its vocabulary's logits, an all-gather puts them side by side."""

    def __init__(self, sizes: list[int], hidden: int, tp: TensorParallel):
        super().__init__(hidden, sizes[tp.rank], bias=False, device="meta")
        self.sizes, self.tp = sizes, tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_gather_last(F.linear(x, self.weight), self.sizes)  # [..., V]


class ShardedInternAttention(nn.Module):
    """InternAttention over heads [h0, h1) of this rank (vision/intern_vit.py; same parameter names)."""

    def __init__(self, config: InternViTConfig, heads: tuple[int, int], tp: TensorParallel):
        super().__init__()
        C, head_dim = config.hidden_size, config.hidden_size // config.num_heads
        self.num_heads, self.full_width, self.tp = heads[1] - heads[0], C, tp
        self.width = self.num_heads * head_dim  # c = this rank's channels of q, k and v
        self.qkv = nn.Linear(C, 3 * self.width, bias=config.qkv_bias)  # rows [q; k; v] of its heads
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:  # its c channels of the C-wide RMSNorms' weights
            self.q_norm, self.k_norm = RMSNorm(self.width, config.norm_eps), RMSNorm(self.width, config.norm_eps)
        self.proj = RowParallelLinear(self.width, C, True, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split(self.width, dim=-1)  # each [N, L, c]
        if self.qk_normalization:
            q, k = self.normalized(q, k)
        return self.proj(vit_attention(q, k, v, self.num_heads))  # [N, L, C], whole after the all-reduce

    def normalized(self, q: torch.Tensor, k: torch.Tensor):
        """RMSNorm over all C channels of q and of k, this rank holding c of them: the sums of squares are
        all-reduced (q and k in one call) so each rank divides by the whole RMS, as layers.RMSNorm does."""
        dtype, eps = q.dtype, self.q_norm.eps
        qf, kf = q.float(), k.float()
        squares = self.tp.all_reduce(torch.stack([qf.pow(2).sum(-1), kf.pow(2).sum(-1)]))  # [2, N, L] float32
        scale = torch.rsqrt(squares / self.full_width + eps)[..., None]  # [2, N, L, 1]
        return self.q_norm.weight * (qf * scale[0]).to(dtype), self.k_norm.weight * (kf * scale[1]).to(dtype)


class ShardedInternMLP(nn.Module):
    """InternMLP over MLP columns [i0, i1): fc1 rows, GELU, fc2 columns, all-reduce, fc2's bias."""

    def __init__(self, config: InternViTConfig, columns: tuple[int, int], tp: TensorParallel):
        super().__init__()
        width = columns[1] - columns[0]
        self.fc1 = nn.Linear(config.hidden_size, width)
        self.fc2 = RowParallelLinear(width, config.hidden_size, True, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def shard_model(model: nn.Module, decoder: DecoderShard, keymap: KeyMap, tensors, tp: TensorParallel):
    """Swap this rank's sharded modules into `model` (on the meta device, its decoder built from
    `decoder.local_config()`), and return `tensors` as a `ShardedTensors` reading only this rank's slices."""
    slices: dict[str, Slice] = {}

    def take(parameter: str, parts: list[Slice]) -> None:  # the official sources of a parameter, and their slices
        _rule, sources, _tied = keymap.resolve(parameter)
        if len(sources) != len(parts):
            raise ConfigError(f"{parameter}: {len(sources)} official tensors, but {len(parts)} slices planned")
        slices.update(zip(sources, parts, strict=True))

    with torch.device("meta"):  # the swapped-in modules are filled by the loader, like the rest
        _shard_modules(model, decoder, keymap, tensors, tp, take)
    return ShardedTensors(tensors, slices, tp.rank, tp.size)


def _shard_modules(model, decoder: DecoderShard, keymap: KeyMap, tensors, tp: TensorParallel, take) -> None:
    gate_up, down = decoder.mlp_slices()
    llm = model.language_model
    vocab, hidden = llm.config.vocab_size, llm.config.hidden_size
    sizes = [b - a for a, b in (split_range(vocab, tp.size, r) for r in range(tp.size))]
    rows = split_range(vocab, tp.size, tp.rank)
    llm.embed, llm.lm_head = VocabParallelEmbedding(rows, hidden, tp), VocabParallelHead(sizes, hidden, tp)
    take("language_model.embed.weight", [Slice.of(0, [rows], extent=vocab)])
    if keymap.resolve("language_model.lm_head.weight")[1][0] in tensors:  # else tied: it reads the embedding's
        take("language_model.lm_head.weight", [Slice.of(0, [rows], extent=vocab)])
    for name, module in model.language_model.named_modules():
        name = f"language_model.{name}"
        if isinstance(module, Attention):
            sources = len(keymap.resolve(f"{name}.qkv.weight")[1])
            take(f"{name}.qkv.weight", decoder.qkv_slices(sources))
            if module.qkv.bias is not None:
                take(f"{name}.qkv.bias", decoder.qkv_slices(sources))
            module.o = RowParallelLinear(module.o.in_features, module.o.out_features, False, tp)
            take(f"{name}.o.weight", [decoder.o_slice()])
        elif isinstance(module, SwiGLU):
            take(f"{name}.gate_up.weight", [gate_up, gate_up])
            module.down = RowParallelLinear(module.down.in_features, module.down.out_features, False, tp)
            take(f"{name}.down.weight", [down])
    vision = getattr(model, "vision_model", None)
    if isinstance(vision, InternViT):
        shard_intern_vit(vision, "vision_model.", tp, take)


def shard_intern_vit(vit: InternViT, prefix: str, tp: TensorParallel, take) -> None:
    """InternViT's attention (heads, unevenly if need be) and MLP (columns) in every layer; `take(parameter,
    slices)` records the slices of the official tensors (InternViT keeps the official names)."""
    config = vit.config
    if config.num_heads < tp.size:
        raise ConfigError(f"tensor parallel over {tp.size} ranks: InternViT has only {config.num_heads} heads")
    H, d = config.num_heads, config.hidden_size // config.num_heads
    h0, h1 = heads = split_range(H, tp.size, tp.rank)
    columns = split_range(config.intermediate_size, tp.size, tp.rank)
    own = Slice.of(0, [heads], d, H)
    qkv = Slice.of(0, [(h0, h1), (H + h0, H + h1), (2 * H + h0, 2 * H + h1)], d, 3 * H)  # its heads of q, k, v
    width = config.intermediate_size
    for index, layer in enumerate(vit.encoder.layers):
        if not isinstance(layer.attn, InternAttention) or not isinstance(layer.mlp, InternMLP):
            raise ConfigError(f"InternViT layer {index}: already sharded")
        name = f"{prefix}encoder.layers.{index}."
        layer.attn = ShardedInternAttention(config, heads, tp)
        layer.mlp = ShardedInternMLP(config, columns, tp)
        take(f"{name}attn.qkv.weight", [qkv])
        if config.qkv_bias:
            take(f"{name}attn.qkv.bias", [qkv])
        if config.qk_normalization:
            take(f"{name}attn.q_norm.weight", [own])
            take(f"{name}attn.k_norm.weight", [own])
        take(f"{name}attn.proj.weight", [Slice.of(1, [heads], d, H)])
        take(f"{name}mlp.fc1.weight", [Slice.of(0, [columns], extent=width)])
        take(f"{name}mlp.fc1.bias", [Slice.of(0, [columns], extent=width)])
        take(f"{name}mlp.fc2.weight", [Slice.of(1, [columns], extent=width)])
