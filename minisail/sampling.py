"""Choosing the next token, as transformers' `generate()` does (the `chat()` of every family calls it).

    float32 logits [B, V]
      -> repetition penalty on tokens already seen (RepetitionPenaltyLogitsProcessor: positive / p, negative * p)
      -> the stop ids at -inf while fewer than min_new_tokens are made (MinNewTokensLengthLogitsProcessor)
      -> if do_sample: / temperature -> top-k -> top-p (TemperatureLogitsWarper, TopK..., TopP...) -> softmax
         -> one multinomial draw from a torch.Generator (a seed makes it reproducible); else argmax

`GenerationConfig` holds the settings under transformers' names and defaults; `minisail.generate` runs the loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace

import torch

from minisail.errors import ConfigError

# Keys of transformers' GenerationConfig that chat() users pass and that change nothing here, with the only
# value minisail supports (None: any value).
INERT_KEYS = {"num_beams": 1, "num_return_sequences": 1, "use_cache": None}


@dataclass
class GenerationConfig:
    """Sampling settings with transformers' names and defaults (top_k 50 applies only when sampling)."""

    max_new_tokens: int = 512
    min_new_tokens: int = 0  # the stop ids cannot be chosen before this many new tokens (MinNewTokensLength...)
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    eos_token_id: int | list[int] | None = None  # stop ids; chat() sets the template's
    pad_token_id: int | None = None  # what finished rows emit (default: the first stop id, as transformers)
    stop_strings: list[str] = field(default_factory=list)  # stop once the new text contains one (needs a tokenizer)
    seed: int | None = None  # minisail's addition: seeds the sampling generator
    # transformers' streamer protocol: put(ids) with the prompt's (none: generation starts from embeddings, as
    # every upstream chat() does), then each step's new ids [B]; end() when generation stops (e.g. its
    # TextIteratorStreamer, which the model cards pass to chat() in generation_config)
    streamer: object | None = field(default=None, compare=False)

    def __post_init__(self):
        def bad(key, value, rule):
            raise ConfigError(f"generation config: {key} = {value!r} {rule}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad("max_new_tokens", self.max_new_tokens, "must be a whole number >= 1")
        if self.do_sample and not self.temperature > 0:
            bad("temperature", self.temperature, "must be > 0 when sampling (use do_sample=False for greedy)")
        if isinstance(self.min_new_tokens, bool) or not isinstance(self.min_new_tokens, int) or self.min_new_tokens < 0:
            bad("min_new_tokens", self.min_new_tokens, "must be a whole number >= 0")
        if not 0 <= self.top_p <= 1:  # 0 keeps only the most likely token, as transformers' TopPLogitsWarper
            bad("top_p", self.top_p, "must be in [0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", self.top_k, "must be a whole number >= 0 (0 = no top-k)")
        if not self.repetition_penalty > 0:
            bad("repetition_penalty", self.repetition_penalty, "must be > 0 (1.0 = no penalty)")
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]
        if self.streamer is not None and not (
            callable(getattr(self.streamer, "put", None)) and callable(getattr(self.streamer, "end", None))
        ):
            bad(
                "streamer",
                type(self.streamer).__name__,
                "must have put(ids) and end() (transformers' streamer protocol)",
            )

    @classmethod
    def from_dict(cls, options: Mapping | GenerationConfig | None) -> GenerationConfig:
        """The dict users pass to upstream `chat()`, e.g. `dict(max_new_tokens=1024, do_sample=True)`."""
        if isinstance(options, GenerationConfig):
            return options
        options = dict(options or {})
        if "top_k" in options and options["top_k"] is None:  # transformers: an explicit None turns top-k off
            options["top_k"] = 0
        options = {key: value for key, value in options.items() if value is not None}  # None: unset
        known = {f.name for f in fields(cls)}
        for key, required in INERT_KEYS.items():
            if key in options and required is not None and options[key] != required:
                raise ConfigError(f"generation config: {key} = {options[key]!r} is not supported (only {required})")
            options.pop(key, None)
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"generation config: unsupported option(s) {', '.join(unknown)}; minisail supports "
                f"{', '.join(sorted(known))} (and {', '.join(INERT_KEYS)} at their defaults)"
            )
        return cls(**options)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        eos = self.eos_token_id
        return () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)

    def with_options(self, **options) -> GenerationConfig:
        return replace(self, **options)


# --- choosing the next token --------------------------------------------------------------------------------------


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [B, V], seen [B, V] bool: seen tokens' positive logits / penalty, negative ones * penalty."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the logits >= the k-th largest (ties at the boundary survive, as in transformers)."""
    kth = torch.topk(logits, min(k, logits.shape[-1])).values[..., -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: drop the least likely tokens whose total probability is <= 1 - p; the most likely always stays."""
    sorted_logits, order = torch.sort(logits, descending=False)  # ascending, [B, V]
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    remove = cumulative <= (1 - p)
    remove[..., -1:] = False
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def suppress_tokens(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """logits [B, V] with the columns `ids` set to -inf (MinNewTokensLengthLogitsProcessor on the stop ids)."""
    return logits.index_fill(-1, ids, float("-inf"))


def next_tokens(logits, config: GenerationConfig, seen=None, generator=None, suppressed=None) -> torch.Tensor:
    """logits [B, V] float32 -> token ids [B]; `suppressed`: ids that cannot be chosen at this step."""
    if seen is not None and config.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    if suppressed is not None and suppressed.numel():
        logits = suppress_tokens(logits, suppressed)
    if not config.do_sample:
        return logits.argmax(-1)
    logits = logits / config.temperature
    if config.top_k:
        logits = top_k_filter(logits, config.top_k)
    if config.top_p < 1.0:
        logits = top_p_filter(logits, config.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


# --- the loop ---------------------------------------------------------------------------------------------------
