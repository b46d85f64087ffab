"""Chatting as the official models do: upstream-compatible `chat()` / `batch_chat()`.

`chat(model, tokenizer, pixel_values, question, generation_config, history=None, return_history=False, ...)` and
`batch_chat(...)` reproduce `InternVLChatModel.chat()` / `batch_chat()` of InternVL `modeling_internvl_chat.py`
(@ 2410d1d) and SAIL-VL2's `modeling_sailvl.py`, so code written for the official models runs unchanged
(every model class inherits them as methods from `ChatMixin`: `model.chat(tokenizer, pixel_values, question,
generation_config)`):
- the prompt: minisail.text.prompt (the `<image>\\n` rule, image expansion, history, left-padded batches);
- eos: the template's `sep.strip()` id, written into the caller's `generation_config` dict as upstream does;
  generation as transformers does it on `inputs_embeds` (repetition penalty over the new tokens only; the
  generation_config keys transformers' generate() takes that change the tokens, min_new_tokens and a `streamer`
  such as TextIteratorStreamer included: minisail/sampling.py);
- the context: a prompt longer than the model's context (max_position_embeddings, times the dynamic-NTK factor) is
  refused, and a reply that reaches it stops there with a MinisailWarning (upstream would go on past it);
- the reply: decoded without special tokens, cut at the sep, stripped; the history gets (question as used, reply);
- the system message: `config.system_message` when set, except SAIL-VL2, whose code always uses the template's;
- Yi-VL, which has no chat() upstream, follows Yi's `single_inference.py` instead: `<image_placeholder>` spliced
  in as id -200, stop on eos or the text `###`, strip and drop the trailing `###`.
What differs per family (the template, the prompt's image tokens) comes from the model's family module
(models/registry.py: `family_of(model)`); this module has no per-family branch.

The idiomatic API (multi-turn sessions, images as paths, streaming, thinking replies) is in minisail/session.py.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from minisail.errors import MinisailWarning, PromptError
from minisail.generate import GenerationConfig, generate
from minisail.text.image_tokens import IMAGE_PLACEHOLDER, IMG_CONTEXT, IMG_END, IMG_START
from minisail.text.prompt import (
    Query,
    append_history,
    chat_eos_token_id,
    decode_reply,
)
from minisail.text.replies import ReplyStream
from minisail.text.templates import SINGLE, Template
from minisail.upstream_api import UpstreamAttributes


def family_of(model) -> ModuleType:
    """The model's family module (models/registry.py)."""
    # Imported here, not at the top: every family module imports ChatMixin from this module.
    from minisail.models.registry import family_of as registry_family_of

    return registry_family_of(model)


def chat_template(model) -> Template:
    """The conversation template upstream chat() uses for this model (name and system message from its config,
    or the system message assigned to `model.system_message`, as upstream copies it in at every call)."""
    template = family_of(model).chat_template(model.config)
    assigned = getattr(model, "assigned_system_message", None)  # getattr: a torch.compile wrapper forwards it
    return template if assigned is None else template.with_system_message(assigned)


# --- from a question to generate()'s inputs ------------------------------------------------------------------


@dataclass
class ChatPrompt:
    """Everything a chat() or batch_chat() call hands to generation."""

    queries: list[Query]
    input_ids: torch.Tensor  # [B, T] left-padded
    attention_mask: torch.Tensor  # [B, T]
    pixel_values: torch.Tensor | None  # in the model's dtype and device
    template: Template
    eos_token_id: int

    def generation_config(self, options, also_stop_on=()) -> GenerationConfig:
        """`options` with chat()'s eos (first: finished rows emit it), plus `also_stop_on` ids."""
        stops = list(dict.fromkeys([self.eos_token_id, *(i for i in also_stop_on if i is not None)]))
        config = GenerationConfig.from_dict(options).with_options(eos_token_id=stops)
        if self.template.sep_style == SINGLE and not config.stop_strings:
            config = config.with_options(stop_strings=[self.template.stop_str])  # Yi-VL stops on "###"
        return config

    def reply_stream(self, *, think: bool = False) -> ReplyStream:
        """A streamed reply that ends as postprocess_reply ends the whole one: chatml cuts at `sep.strip()`
        (<|im_end|>), Yi-VL drops a trailing `###` (text after an inner one stays, as upstream keeps it)."""
        if self.template.sep_style == SINGLE:
            return ReplyStream(think=think, trailing=self.template.sep)
        return ReplyStream([self.template.sep.strip()], think=think)

    def generate(self, model, tokenizer, config: GenerationConfig, image_embeds=None, **options) -> torch.Tensor:
        """New ids [B, n] as the upstream generate() on embeddings makes them (penalty over new tokens only).
        `image_embeds`: the images already encoded (a session), used instead of encoding pixel_values again.
        `options`: more of generate_steps' keywords (on_context_end)."""
        pixel_values = self.pixel_values if image_embeds is None else None
        return generate(model, self.input_ids, self.attention_mask, pixel_values, config, image_embeds=image_embeds,
                        penalize_prompt=False, tokenizer=tokenizer, **options)  # fmt: skip


def prepare_chat(model, tokenizer, pixel_values, questions, *, history=None, num_patches_list=None, template=None,
                 batch=False) -> ChatPrompt:  # fmt: skip
    """chat()'s prompt for one question (`batch=False`), or batch_chat()'s for a list of single-turn questions."""
    if not callable(getattr(tokenizer, "token_to_id", None)):
        raise PromptError(
            f"chat() takes minisail's tokenizer, minisail.load_tokenizer(folder), not a {type(tokenizer).__name__} "
            "(a model card's AutoTokenizer line: replace it, the files are the same)"
        )
    family = family_of(model)
    template = template or chat_template(model)
    check_chat_inputs(model, pixel_values, history)
    questions = list(questions) if batch else [questions]
    queries, input_ids, attention_mask = family.encode_prompt(
        model,
        tokenizer,
        pixel_values,
        questions,
        history=history,
        num_patches_list=num_patches_list,
        template=template,
        batch=batch,
    )
    weight = next(model.parameters())
    if pixel_values is not None:
        pixel_values = pixel_values.to(device=weight.device, dtype=weight.dtype)
    eos = chat_eos_token_id(tokenizer, template)
    return ChatPrompt(queries, input_ids.to(weight.device), attention_mask.to(weight.device), pixel_values, template,
                      eos)  # fmt: skip


def check_chat_inputs(model, pixel_values, history) -> None:
    """Refuse, in words, what chat() / batch_chat() callers can get wrong before it reaches a layer: pixel_values
    that are not [tiles, 3, S, S] float tiles of this model's size S, or not finite; a history that is not
    (question, answer) pairs of strings."""
    if pixel_values is not None:
        size = model.config.image_size
        expected = f"a float tensor [tiles, 3, {size}, {size}] (the images' tiles, concatenated)"
        if not isinstance(pixel_values, torch.Tensor):
            raise PromptError(f"pixel_values must be {expected}, not a {type(pixel_values).__name__}")
        if pixel_values.dim() != 4 or pixel_values.shape[0] < 1 or pixel_values.shape[1] != 3:
            raise PromptError(f"pixel_values must be {expected}, not of shape {list(pixel_values.shape)}")
        if tuple(pixel_values.shape[2:]) != (size, size):
            raise PromptError(
                f"pixel_values hold {pixel_values.shape[2]}x{pixel_values.shape[3]} tiles but this model takes "
                f"{size}x{size}: preprocess the images with its image size ({size})"
            )
        if not pixel_values.is_floating_point() or not bool(torch.isfinite(pixel_values).all()):
            raise PromptError("pixel_values must be finite floats: the image preprocessing produced NaN, Inf or ints")
    for i, turn in enumerate(history or ()):
        if not (isinstance(turn, (tuple, list)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise PromptError(f"history[{i}] must be a (question, answer) pair of strings, not {str(turn)[:80]!r}")


def _check_image_tokens(start: str, end: str, context: str) -> None:
    if (start, end, context) != (IMG_START, IMG_END, IMG_CONTEXT):
        raise PromptError(f"minisail builds prompts with the standard {IMG_START} {IMG_END} {IMG_CONTEXT} tokens only")


def _warn_context_end(context: int) -> None:
    """chat() and batch_chat() return plain strings (upstream's API), so a reply cut at the context end says so
    as a warning; the reply would otherwise look finished."""
    warnings.warn(
        f"the reply was cut at the model's context end ({context} tokens, prompt included) before a stop token or "
        "max_new_tokens: shorten the question or the history, or use fewer images or tiles",
        MinisailWarning,
        stacklevel=_caller_level(),
    )


def _caller_level() -> int:
    """warnings.warn's stacklevel for the first frame outside minisail (the caller of chat(), model.chat(), ...);
    torch's frames between them (inference_mode's generator wrapper) are skipped too."""
    packages = tuple(str(Path(module.__file__).parent) + os.sep for module in (sys.modules[__package__], torch))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(packages):
        frame, level = frame.f_back, level + 1
    return level


@contextlib.contextmanager
def _streamer_ended_on_error(generation_config):
    """A caller's streamer (transformers' protocol) is ended when chat() fails before generation starts, as
    generation ends it when it fails: a thread iterating over a TextIteratorStreamer is not left waiting."""
    try:
        yield
    except BaseException:
        if isinstance(generation_config, dict):
            streamer = generation_config.get("streamer")
        else:
            streamer = getattr(generation_config, "streamer", None)
        end = getattr(streamer, "end", None)
        if callable(end):
            end()
        raise


def _write_eos(generation_config: dict | GenerationConfig, eos: int) -> None:
    """Upstream chat() writes eos_token_id into the caller's dict; callers rely on seeing it there."""
    if isinstance(generation_config, dict):
        generation_config["eos_token_id"] = eos
    elif isinstance(generation_config, GenerationConfig):
        generation_config.eos_token_id = eos


# --- the upstream API -------------------------------------------------------------------------------------------


def chat(model, tokenizer, pixel_values, question, generation_config: dict | GenerationConfig, history=None,
         return_history=False, num_patches_list=None, IMG_START_TOKEN=IMG_START, IMG_END_TOKEN=IMG_END,
         IMG_CONTEXT_TOKEN=IMG_CONTEXT, verbose=False):  # fmt: skip
    """Upstream `model.chat(...)`: the reply (and the history if return_history)."""
    with _streamer_ended_on_error(generation_config):  # generation itself ends it, whatever happens there
        _check_image_tokens(IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)
        prompt = prepare_chat(model, tokenizer, pixel_values, question, history=history,
                              num_patches_list=num_patches_list)  # fmt: skip
        _write_eos(generation_config, prompt.eos_token_id)
        config = prompt.generation_config(generation_config)
    if verbose and pixel_values is not None:
        print(f"dynamic ViT batch size: {pixel_values.shape[0]}")
    ids = prompt.generate(model, tokenizer, config, on_context_end=_warn_context_end)
    response = decode_reply(tokenizer, ids[0].tolist(), prompt.template)
    history = append_history(history, prompt.queries[0].question, response)
    if return_history:
        return response, history
    if verbose:
        shown = prompt.queries[0].text.replace(IMG_CONTEXT, "").replace(IMG_START + IMG_END, IMAGE_PLACEHOLDER)
        print(shown, response)
    return response


def batch_chat(model, tokenizer, pixel_values, questions, generation_config: dict | GenerationConfig,
               num_patches_list=None, history=None, return_history=False, IMG_START_TOKEN=IMG_START,
               IMG_END_TOKEN=IMG_END, IMG_CONTEXT_TOKEN=IMG_CONTEXT, verbose=False, image_counts=None):  # fmt: skip
    """Upstream `model.batch_chat(...)`: one reply per question (question i gets num_patches_list[i] tiles)."""
    with _streamer_ended_on_error(generation_config):
        if history is not None or return_history:
            raise PromptError("batch_chat does not support history (upstream neither): use chat() for multi-turn")
        if isinstance(questions, str):  # a list is iterated: a string would be one question per character
            raise PromptError("batch_chat takes a list of questions; for one question use chat() or pass [question]")
        _check_image_tokens(IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)
        num_patches_list = image_counts if image_counts is not None else num_patches_list  # the deprecated name
        prompt = prepare_chat(model, tokenizer, pixel_values, questions, num_patches_list=num_patches_list,
                              batch=True)  # fmt: skip
        _write_eos(generation_config, prompt.eos_token_id)
        config = prompt.generation_config(generation_config)
    if verbose and pixel_values is not None:
        print(f"dynamic ViT batch size: {pixel_values.shape[0]}")
    ids = prompt.generate(model, tokenizer, config, on_context_end=_warn_context_end)
    return [decode_reply(tokenizer, row.tolist(), prompt.template) for row in ids]


class ChatMixin(UpstreamAttributes):
    """Upstream's chat methods on every model class: `model.chat(tokenizer, pixel_values, question,
    generation_config, ...)` and `model.batch_chat(...)`, the functions above with the model first; with the
    attributes and generate() of upstream_api.py."""

    family: str  # the NAME of the model's family module (models/registry.py): set by each model class
    checkpoint_folder: Path | None = None  # set by minisail.load: where preprocessor_config.json is read

    @property
    def conv_template(self) -> Template:
        """Upstream's `model.conv_template` (the model cards' streaming loop compares pieces with its `sep`)."""
        return chat_template(self)

    def chat(self, tokenizer, pixel_values, question, generation_config: dict | GenerationConfig, *args, **kwargs):
        # `chat` here is this module's function: a method's body does not see its class's names
        return chat(self, tokenizer, pixel_values, question, generation_config, *args, **kwargs)

    def batch_chat(self, tokenizer, pixel_values, questions, generation_config: dict | GenerationConfig, *args,
                   **kwargs):  # fmt: skip
        return batch_chat(self, tokenizer, pixel_values, questions, generation_config, *args, **kwargs)
