"""Generation on the static KV cache.

Prefill runs the whole prompt once (image rows in place) and fills the cache; each decode step feeds one
new token per row. Positions continue from the mask-derived prompt positions, so left-padded rows decode as
if unpadded.
"""

from __future__ import annotations

import torch

from minisail.llm.decoder import positions_from_mask


@torch.inference_mode()
def greedy_generate(model, input_ids, attention_mask=None, pixel_values=None, *, max_new_tokens: int):
    """[B, max_new_tokens] argmax continuation (no early stop): the reference path of the parity runner."""
    inputs = model.prepare_inputs(input_ids, attention_mask, pixel_values)
    decoder = model.language_model
    B, T = inputs.attention_mask.shape
    cache = decoder.new_cache(B, T + max_new_tokens)
    positions = positions_from_mask(inputs.attention_mask)
    logits = decoder(inputs.embeds, inputs.attention_mask, positions, cache, last_only=True, **inputs.layer_kwargs)
    new_tokens = []
    next_position = positions[:, -1:] + 1
    ones = torch.ones(B, 1, dtype=inputs.attention_mask.dtype, device=input_ids.device)
    for step in range(max_new_tokens):
        token = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        new_tokens.append(token)
        if step == max_new_tokens - 1:
            break
        embeds = decoder.embed(token)
        logits = decoder(embeds, ones, next_position, cache, last_only=True, **model.layer_kwargs(token))
        next_position = next_position + 1
    return torch.cat(new_tokens, dim=1)
