"""A static, preallocated key/value cache.

Sized once for the whole generation (prompt + new tokens), so decoding never reallocates or concatenates.
Every layer's keys and values live in two tensors [layers, B, kv_heads, capacity, head_dim]; each step writes
its tokens into the next free slots and attends over all `capacity` slots, with a mask that hides the slots
not written yet and the left padding. Fixed shapes also let `torch.compile` capture a decode step once.

`check_cache_fits` refuses, before allocating, a cache larger than the memory available.

Slots are shared by the whole batch (left padding keeps rows aligned): slot s holds the s-th token fed to
the model, pad or not; `valid[b, s]` says whether row b's token in slot s is a real token.
"""

from __future__ import annotations

import torch

from minisail.errors import PromptError


class KVCache:
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
        """Write k, v [B, kv_heads, T, D] into this step's slots; return the whole cache of the layer."""
        self.keys[layer].index_copy_(2, self.slots, k)
        self.values[layer].index_copy_(2, self.slots, v)
        return self.keys[layer], self.values[layer]  # [B, kv_heads, capacity, D]


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
