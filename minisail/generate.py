"""Generation on the static KV cache: greedy or sampled, stop tokens, batches, streamed text.

Prefill runs the whole prompt once (image rows in place) and fills the cache; each decode step feeds one
new token per row. Positions continue from the mask-derived prompt positions, so left-padded rows decode as
if unpadded.

Choosing the next token (repetition penalty, temperature, top-k, top-p, a seeded draw or argmax) is
`minisail/sampling.py`, as transformers' `generate()` does it. A row stops after it emits one of the stop ids
(eos; the id itself is kept, as transformers keeps it) or a stop string; finished rows then emit the pad id,
and generation ends when every row has finished.

"Already seen" for the repetition penalty: transformers penalises every id in its `input_ids`, which is the
prompt for a model called with input_ids (`penalize_prompt=True`, the default here). Every upstream chat()
calls `language_model.generate(inputs_embeds=...)`, where input_ids starts empty, so there only the new
tokens count: `minisail.chat` passes `penalize_prompt=False` to match it.

Prefill and decode steps are the same `Decoder.forward` (its docstring states the cache contract); `decode_step`
feeds one token per row with the model's expert routing for it (`model.visual_mask`, None for most families).
The text of a reply is streamed by `minisail/text/streaming.py`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from minisail.errors import ConfigError, NumericsError, PromptError
from minisail.llm.decoder import check_cache_fits, positions_from_mask
from minisail.llm.decoder_config import DecoderConfig
from minisail.sampling import (  # noqa: F401  (re-exported: the loop's settings and sampling live there)
    GenerationConfig,
    apply_repetition_penalty,
    next_tokens,
    top_k_filter,
    top_p_filter,
)
from minisail.text.streaming import stream_text


def decode_step(model, cache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One new token per row through the cached decoder: tokens, positions [B, 1] -> float32 logits [B, V]."""
    decoder = model.language_model
    return decoder(decoder.embed(tokens), positions, cache, visual_mask=model.visual_mask(tokens))[:, -1]


def prefill(decoder, inputs, positions: torch.Tensor, cache) -> torch.Tensor:
    """The prompt through the cached decoder (prepared inputs, positions [B, T]) -> last-position logits [B, V]."""
    return decoder(
        inputs.embeds,
        positions,
        cache,
        attention_mask=inputs.attention_mask,
        visual_mask=inputs.visual_mask,
        last_only=True,
    )[:, -1]


def context_length(decoder_config: DecoderConfig) -> int:
    """The longest sequence a model is meant for: max_position_embeddings, times the dynamic-NTK factor if any."""
    return int(decoder_config.max_position_embeddings * (decoder_config.rope_dynamic_factor or 1))


def new_token_budget(prompt_tokens: int, max_new_tokens: int, context: int | None) -> int:
    """How many new tokens fit after the prompt in a context of `context` tokens (None: no limit)."""
    if context is None:
        return max_new_tokens
    if prompt_tokens >= context:
        raise PromptError(
            f"the prompt is {prompt_tokens} tokens long (image tokens included) but the model's context holds "
            f"{context}: shorten the question or the history, use fewer images or tiles (--max-tiles), or start "
            "a new conversation"
        )
    return min(max_new_tokens, context - prompt_tokens)


def _seen_mask(input_ids, vocab_size: int, penalize_prompt: bool) -> torch.Tensor:
    """[B, V] bool: the prompt's ids (pads included, as transformers' input_ids) or nothing yet."""
    seen = torch.zeros(input_ids.shape[0], vocab_size, dtype=torch.bool, device=input_ids.device)
    if penalize_prompt:
        rows, cols = ((input_ids >= 0) & (input_ids < vocab_size)).nonzero(as_tuple=True)  # not Yi-VL's -200
        seen[rows, input_ids[rows, cols]] = True
    return seen


@torch.inference_mode()
def generate_steps(
    model,
    input_ids: torch.Tensor,  # [B, T], left-padded
    attention_mask: torch.Tensor | None = None,  # [B, T]
    pixel_values: torch.Tensor | None = None,
    config: GenerationConfig | Mapping | None = None,
    *,
    generator: torch.Generator | None = None,
    penalize_prompt: bool = True,
    tokenizer=None,  # needed for stop_strings
    limit_context: bool = True,  # refuse prompts longer than the model's context, stop new tokens at its end
    image_embeds: torch.Tensor | None = None,  # already encoded images, instead of pixel_values (a chat session)
    on_context_end=None,  # called with the context length when a reply is cut at its end (else it looks finished)
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, [B], step by step, until every row has stopped."""
    config = GenerationConfig.from_dict(config)
    try:
        yield from _steps(model, input_ids, attention_mask, pixel_values, config, generator, penalize_prompt,
                          tokenizer, limit_context, image_embeds, on_context_end)  # fmt: skip
    finally:  # also when generation fails or stops early: a reader waiting on the streamer is not left hanging
        if config.streamer is not None:
            config.streamer.end()


def _steps(model, input_ids, attention_mask, pixel_values, config: GenerationConfig, generator, penalize_prompt,
           tokenizer, limit_context, image_embeds, on_context_end) -> Iterator[torch.Tensor]:  # fmt: skip
    """generate_steps' loop (it ends the streamer, whatever happens here)."""
    if config.stop_strings and tokenizer is None:
        raise ConfigError("generation config: stop_strings need a tokenizer to read the text")
    if attention_mask is not None and not bool(attention_mask[:, -1].all()):
        # A right-padded row would continue from its pads: every row's last token must be real.
        raise PromptError("batched prompts must be left-padded (attention_mask ends in 1 on every row)")
    inputs = model.prepare_inputs(input_ids, attention_mask, pixel_values, image_embeds)
    decoder = model.language_model
    B, T = inputs.attention_mask.shape
    context = context_length(decoder.config) if limit_context else None
    max_new = new_token_budget(T, config.max_new_tokens, context)
    check_cache_fits(decoder, B, T, max_new, available=_memory_for_the_cache(model, decoder))
    cache = decoder.new_cache(B, T + max_new)
    positions = positions_from_mask(inputs.attention_mask)
    logits = prefill(decoder, inputs, positions, cache)  # [B, V]
    if generator is None and config.do_sample and config.seed is not None:
        generator = torch.Generator(logits.device).manual_seed(config.seed)
    stop_ids = torch.tensor(config.stop_token_ids, dtype=torch.long, device=logits.device)
    held = stop_ids[(stop_ids >= 0) & (stop_ids < logits.shape[-1])]  # min_new_tokens: ids the model can emit
    pad = config.pad_token_id if config.pad_token_id is not None else (config.stop_token_ids or (0,))[0]
    seen = _seen_mask(input_ids, logits.shape[-1], penalize_prompt) if config.repetition_penalty != 1.0 else None
    finished = torch.zeros(B, dtype=torch.bool, device=logits.device)
    rows: list[list[int]] = [[] for _ in range(B)]  # new ids per row, kept only to look for stop strings
    next_position = positions[:, -1:] + 1  # [B, 1]
    streamer = config.streamer
    if streamer is not None:  # transformers' order: the prompt's ids first (none: the prompt is embeddings)
        streamer.put(torch.empty(B, 0, dtype=torch.long))
    for step in range(max_new):
        check_finite(logits, step)
        suppressed = held if step < config.min_new_tokens else None
        token = next_tokens(logits, config, seen, generator, suppressed).masked_fill(finished, pad)  # [B]
        if streamer is not None:
            streamer.put(token.cpu())
        yield token
        finished |= torch.isin(token, stop_ids)
        if config.stop_strings:
            finished |= _hits_stop_string(rows, token, finished, config.stop_strings, tokenizer)
        if bool(finished.all()) or step == max_new - 1:
            if on_context_end is not None and not bool(finished.all()) and max_new < config.max_new_tokens:
                on_context_end(context)  # stopped by the context, before max_new_tokens and any stop
            return
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        logits = decode_step(model, cache, token[:, None], next_position)
        next_position = next_position + 1


def _memory_for_the_cache(model, decoder) -> int | None:
    """None: check_cache_fits reads this machine's memory. Tensor parallel on the CPU: the smallest any rank has,
    so every rank refuses or runs the same turn (parallel/agree.py)."""
    tp = getattr(model, "tensor_parallel", None)
    if tp is None or decoder.embed.weight.device.type != "cpu":
        return None
    from minisail.parallel.agree import memory_every_rank_has

    return memory_every_rank_has(tp)


def check_finite(logits: torch.Tensor, step: int) -> None:
    """A NumericsError for NaN or infinite logits [B, V], instead of an argmax over NaN (token 0 forever) or a
    multinomial that fails obscurely. minisail does not scan the weights at load (a full read of the checkpoint);
    this is where NaN/Inf weights show.

    Every logit is finite exactly when the smallest and the largest are (aminmax propagates NaN): one reduction,
    about 0.04 ms for 151936 logits, where `torch.isfinite(logits).all()` took 0.4 ms a token (a bool tensor
    per pass)."""
    smallest, largest = torch.aminmax(logits)
    if not bool(torch.isfinite(smallest) & torch.isfinite(largest)):
        raise NumericsError(
            f"the model computed non-finite logits (NaN or Inf) for new token {step + 1}: the checkpoint holds NaN or "
            "Inf weights (a corrupt download or a broken conversion: download it again), or the dtype overflows "
            "(float16: load in bfloat16 or float32)"
        )


def _hits_stop_string(rows, token, finished, stop_strings, tokenizer) -> torch.Tensor:
    """Per row: does the text of its newest tokens contain a stop string (Yi-VL's KeywordsStoppingCriteria)?"""
    hits = torch.zeros_like(finished)
    for b, token_id in enumerate(token.tolist()):
        if finished[b]:
            continue
        rows[b].append(token_id)
        window = max(len(s) for s in stop_strings) + 4  # a stop string ends in the newest token, spans a few
        text = tokenizer.decode(rows[b][-window:], skip_special_tokens=True)
        hits[b] = any(s in text for s in stop_strings)
    return hits


def generate(model, input_ids, attention_mask=None, pixel_values=None, config=None, **options) -> torch.Tensor:
    """New tokens [B, n] (n <= max_new_tokens; finished rows padded), like transformers' generate() on embeds.

    `options` are generate_steps' keywords (generator, penalize_prompt, tokenizer, limit_context)."""
    steps = list(generate_steps(model, input_ids, attention_mask, pixel_values, config, **options))
    return torch.stack(steps, dim=1)


@torch.inference_mode()
def greedy_generate(model, input_ids, attention_mask=None, pixel_values=None, *, max_new_tokens: int):
    """[B, max_new_tokens] argmax continuation (no early stop, no context limit): the parity runner's path."""
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    return generate(model, input_ids, attention_mask, pixel_values, config, limit_context=False)


# --- text ---------------------------------------------------------------------------------------------------------


def generate_stream(
    model, tokenizer, input_ids, attention_mask=None, pixel_values=None, config=None, *, on_token=None, **options
) -> Iterator[str]:
    """The text of a one-row generation, piece by piece (stop tokens are not part of the text).

    `on_token(id)` sees every new id, the stop token included (to keep the ids, e.g. for history)."""
    if input_ids.shape[0] != 1:
        raise PromptError(f"streaming generates one row; got a batch of {input_ids.shape[0]} (use generate())")
    config = GenerationConfig.from_dict(config)
    options.setdefault("tokenizer", tokenizer)
    stop_ids = set(config.stop_token_ids)

    def text_ids():
        for token in generate_steps(model, input_ids, attention_mask, pixel_values, config, **options):
            token_id = int(token[0])
            if on_token is not None:
                on_token(token_id)
            if token_id not in stop_ids:
                yield token_id

    yield from stream_text(tokenizer, text_ids())
