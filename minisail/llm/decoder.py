"""One decoder core for every language model minisail runs: Qwen2 (SAIL-VL-2B, InternVL2), Qwen3 (SAIL-VL2),
InternLM2 (InternVL-Chat-V1-5, Mono-InternVL) and Llama (Yi-VL).

They are the same pre-norm transformer: token embedding -> L x [RMSNorm -> GQA attention with RoPE -> residual,
RMSNorm -> SwiGLU MLP (or Mono's visual experts) -> residual] -> RMSNorm -> lm_head. The differences are fields
of `DecoderConfig` (llm/decoder_config.py, with its reader of the official LLM configs) and the weight maps in
`minisail/checkpoint/keymaps.py`.
Its blocks (RMSNorm, Attention, Rotary, SwiGLU) are in `minisail/layers.py`; the static KV cache (`KVCache`)
and `check_cache_fits` (a cache larger than the memory available is refused before allocating) are here.

Mirrors transformers' Qwen2ForCausalLM / Qwen3ForCausalLM / LlamaForCausalLM and InternVL's InternLM2ForCausalLM.

The contract, stated here once:

- `Decoder.forward(embeds [B, T, H], positions [B, T], cache=None, *, attention_mask=None, visual_mask=None,
  last_only=False) -> float32 logits [B, T, V]` is the one entry point: a full forward (no cache), a prefill
  or a chunk of one (a cache, T tokens) and a decode step (a cache, T = 1) are the same call.
- `Decoder.begin_step` does a step's Python bookkeeping, and is the only code that does: it reserves the
  step's cache slots (the only caller of `KVCache.begin_step`), builds the attention mask, and asks the
  `Rotary` for cos/sin at the step's positions for the key/value length it attends over (the cache's length,
  which is what InternLM2's dynamic NTK depends on). `forward` calls it, then `run`, the tensor work.
- A decode step's tensor work goes through `decode_step`, the same `run` under a name of its own: fixed shapes,
  no Python number that changes between steps, so `torch.compile` captures it once, with no graph break, for a
  whole generation (tests/generation/test_compile.py; `bench --compile` swaps in the compiled one), and prefills of any
  length stay eager. Traced, attention reads every cache slot (the mask hides those not written yet); eager, it
  reads only the slots written so far (`KVCache.update`): the same arithmetic without the masked slots (equal
  within float rounding: the attention kernel may block the sums differently).
- `visual_mask` [B, T] bool (True at <IMG_CONTEXT>) routes Mono-InternVL's FFN experts (minisail/llm/moe.py);
  the model computes it from the token ids (`visual_mask(input_ids)` of every family, None where there are no
  experts) and the decoder hands it to each layer. A decoder without experts refuses one.

Positions come from the attention mask (`positions_from_mask`, pads at 1), as transformers' generate() makes
them, so left-padded batches see the same positions as unpadded rows; a decode step continues from the last
one. Logits are returned in float32 (InternLM2's head upcasts them; Qwen3's and Yi's return the head's dtype: the
cast is exact, the numbers are the same).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from minisail.errors import PromptError
from minisail.layers import Attention, RMSNorm, Rotary, SwiGLU
from minisail.llm.decoder_config import DecoderConfig
from minisail.llm.moe import VisualExpertMLP


class KVCache:
    """A static, preallocated key/value cache, sized once for a whole generation (prompt + new tokens).

    Every layer's keys and values live in two tensors [layers, B, kv_heads, capacity, head_dim]; each step writes
    its tokens into the next free slots and attends over all `capacity` slots, with a mask that hides the slots not
    written yet and the left padding, so decoding never reallocates and a decode step has fixed shapes. Slots are
    shared by the batch: slot s holds the s-th token fed to the model, pad or not; `valid[b, s]` says whether row
    b's token in slot s is real."""

    def __init__(self, *, num_layers, batch_size, num_kv_heads, head_dim, capacity, dtype, device=None):
        shape = (num_layers, batch_size, num_kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)  # [B, capacity]
        self.capacity = capacity
        self.length = 0  # slots written so far (a Python int: the readable path; see `slots`)
        self.slots = torch.arange(0, device=device)  # the slots of the current step, [T]

    def begin_step(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Reserve slots for a step of T tokens (attention_mask [B, T], 1 = real token); returns the slots [T].

        Called only by `Decoder.begin_step`, once per step (the contract: minisail/llm/decoder.py)."""
        T = attention_mask.shape[1]
        if self.length + T > self.capacity:
            raise PromptError(
                f"the KV cache holds {self.capacity} tokens and this step needs {self.length + T}: "
                "allocate a larger cache (a shorter prompt or fewer new tokens)"
            )
        self.slots = torch.arange(self.length, self.length + T, device=self.valid.device)
        self.valid[:, self.slots] = attention_mask.to(torch.bool)
        self.length += T
        return self.slots

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, kv_heads, T, D] into this step's slots; return the layer's keys and values to attend over:
        the slots written so far [B, kv_heads, length, D] when running eagerly (a step attends over what it needs,
        not over a capacity sized for the longest reply), all of them when torch.compile traces (fixed shapes)."""
        keys, values = self.keys[layer], self.values[layer]  # [B, kv_heads, capacity, D]
        keys.index_copy_(2, self.slots, k)
        values.index_copy_(2, self.slots, v)
        if torch.compiler.is_compiling():
            return keys, values
        return keys[:, :, : self.length], values[:, :, : self.length]


class Step(NamedTuple):
    """What `Decoder.begin_step` prepares for the layers of one step of T tokens over S key slots."""

    mask: torch.Tensor  # [B, 1, T, S] additive, activation dtype: 0 where a query may see a key, -inf where not
    cos: torch.Tensor  # [B, 1, T, head_dim] rotary tables at the step's positions (1: shared by the heads)
    sin: torch.Tensor  # [B, 1, T, head_dim]


class DecoderLayer(nn.Module):
    def __init__(self, config: DecoderConfig, layer_index: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer_index)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.visual_experts = config.visual_experts
        if config.visual_experts:  # text and visual FFN, routed per token by the visual mask
            self.mlp = VisualExpertMLP(config.hidden_size, config.intermediate_size)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, step: Step, cache: KVCache | None, visual_mask=None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), step.cos, step.sin, step.mask, cache)
        if self.visual_experts:
            return x + self.mlp(self.mlp_norm(x), visual_mask)  # visual_mask [B, T] bool or None (all text)
        return x + self.mlp(self.mlp_norm(x))


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] positions: 0, 1, 2, ... over the real tokens of each row; left pads get 1 (transformers' rule)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def attention_mask_4d(key_valid: torch.Tensor, query_slots: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, T, S] mask: query t (in slot query_slots[t]) may see key slot s if s <= its own slot and
    the key is a real token. A query always sees itself, so pad rows stay finite (never an all-masked row)."""
    S = key_valid.shape[1]
    key_slots = torch.arange(S, device=key_valid.device)
    causal = key_slots[None, :] <= query_slots[:, None]  # [T, S]
    itself = key_slots[None, :] == query_slots[:, None]  # [T, S]
    return (causal[None] & (key_valid[:, None, :] | itself[None]))[:, None]  # [B, 1, T, S]


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as SDPA adds it to the scores: 0 where visible, -inf where not, in the query's dtype.

    SDPA turns a boolean mask into exactly this tensor at every call; built once per step, the layers share it
    instead of converting it once each (the same numbers)."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))


class Decoder(nn.Module):
    """A causal language model: `forward(embeds, positions, cache) -> float32 logits` (the contract: above)."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        # `_weight` given: no random init (the model is built on the meta device and filled from the checkpoint)
        self.embed = nn.Embedding(
            config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size)
        )
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = Rotary(
            config.head_dim, config.rope_theta, config.max_position_embeddings, config.rope_dynamic_factor
        )

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        c = self.config
        return KVCache(
            num_layers=c.num_layers,
            batch_size=batch_size,
            num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim,
            capacity=capacity,
            dtype=self.embed.weight.dtype,
            device=self.embed.weight.device,
        )

    def forward(
        self,
        embeds: torch.Tensor,  # [B, T, H] token embeddings (image rows already placed)
        positions: torch.Tensor,  # [B, T] rotary positions
        cache: KVCache | None = None,  # None: a full forward; else this step's keys/values are appended
        *,
        attention_mask: torch.Tensor | None = None,  # [B, T] 1 = real token, 0 = left pad; None: all real
        visual_mask: torch.Tensor | None = None,  # [B, T] bool, True = visual token (Mono-InternVL only)
        last_only: bool = False,  # return logits of the last position only (generation)
    ) -> torch.Tensor:
        if visual_mask is not None and not self.config.visual_experts:
            raise ValueError(
                f"a visual_mask was given but {self.config.architecture or 'this decoder'} has no visual experts"
            )
        step = self.begin_step(positions, cache, attention_mask, embeds.dtype)
        if cache is not None and embeds.shape[1] == 1:  # a decode step: the fixed-shape graph
            return self.decode_step(embeds, step, cache, visual_mask)  # [B, 1, V]
        return self.run(embeds, step, cache, visual_mask, last_only)  # [B, T, V]

    def begin_step(self, positions, cache: KVCache | None = None, attention_mask=None, dtype=None) -> Step:
        """The step's Python bookkeeping: cache slots, attention mask [B, 1, T, S], rotary tables [B, 1, T, D],
        both in `dtype` (the activations', by default the embedding's)."""
        dtype = dtype or self.embed.weight.dtype
        if attention_mask is None:
            attention_mask = torch.ones(positions.shape, dtype=torch.bool, device=positions.device)
        if cache is None:  # a plain full forward: the keys are this call's tokens
            slots = torch.arange(positions.shape[1], device=positions.device)
            mask = attention_mask_4d(attention_mask.bool(), slots)
            kv_length = positions.shape[1]
        else:
            slots = cache.begin_step(attention_mask)
            # A decode step (T = 1) may be the compiled one, which attends every slot; a prefill (always eager)
            # attends the slots written so far, so its [T, S] mask is not sized by the capacity (which can be
            # far larger than the prompt: T x capacity masks once took more memory than the cache)
            key_valid = cache.valid if positions.shape[1] == 1 else cache.valid[:, : cache.length]
            mask = attention_mask_4d(key_valid, slots)
            kv_length = cache.length  # keys cached so far, this step's included
        cos, sin = self.rotary.tables(positions, kv_length, dtype)  # [B, T, D]
        return Step(additive_mask(mask, dtype), cos[:, None], sin[:, None])

    def run(self, embeds, step: Step, cache: KVCache | None = None, visual_mask=None, last_only=False):
        """The tensor work of a step: layers, final norm, head -> float32 logits [B, T, V] (or [B, 1, V])."""
        x = embeds
        for layer in self.layers:
            x = layer(x, step, cache, visual_mask)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x)).float()

    def decode_step(self, embeds, step: Step, cache: KVCache, visual_mask=None) -> torch.Tensor:
        """`run` for one new token per row, embeds [B, 1, H] -> logits [B, 1, V], at shapes fixed for a whole
        generation: a name of its own so that torch.compile can capture decoding alone (see the contract)."""
        return self.run(embeds, step, cache, visual_mask)


def check_cache_fits(decoder, batch: int, prompt_tokens: int, max_new: int, available: int | None = None) -> None:
    """Refuse a KV cache that would not fit in the available memory, before allocating it.

    The static cache holds keys and values for every layer, row and slot: 2 * layers * batch * kv_heads *
    capacity * head_dim elements. On the CPU it is compared with MemAvailable (/proc/meminfo; not checked where
    that is unknown), so `max_new_tokens=10**7` fails here, saying how many tokens would fit, instead of in
    the allocator.
    """
    weight = decoder.embed.weight
    if weight.device.type != "cpu":
        return
    c = decoder.config
    per_token = 2 * c.num_layers * batch * c.num_kv_heads * c.head_dim * weight.element_size()
    need = per_token * (prompt_tokens + max_new)
    if available is None:
        from minisail.system import available_memory_bytes

        available = available_memory_bytes()
    if available is not None and need > available:
        fits = available // max(per_token, 1) - prompt_tokens
        raise PromptError(
            f"the KV cache for {prompt_tokens} prompt + {max_new} new tokens x {batch} row(s) needs "
            f"{need / 2**30:.1f} GiB but {available / 2**30:.1f} GiB of memory is available: lower max_new_tokens "
            f"(about {max(fits, 0)} new tokens fit), or use a shorter prompt or a smaller batch"
        )
