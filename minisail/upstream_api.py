"""The attributes and the `generate()` of upstream's model classes that code written for them uses, beside chat().

Upstream's `InternVLChatModel` (InternVL `modeling_internvl_chat.py` @ 2410d1d; SAIL-VL2's `modeling_sailvl.py` and
Mono-InternVL's are the same here) is a transformers `PreTrainedModel`, and scripts written for it read a few of
its attributes and call its `generate`. `UpstreamAttributes` (a mixin of every minisail model, through
chat.ChatMixin) gives them:

- `system_message`: upstream copies it into the template on every chat() call, so assigning it changes the
  prompt (evaluation wrappers and thinking prompts do). Reading it gives the one chat() uses;
- `device`, `dtype`: where the weights are and their dtype (`inputs.to(model.device)`);
- `generate(pixel_values, input_ids, attention_mask, visual_features, generation_config, **kwargs)`: new token ids
  [B, n] for a prompt whose images are already `<IMG_CONTEXT>` runs, as upstream's does (transformers'
  `generate` on the merged embeddings returns the new tokens only). Generation is minisail's (sampling.py: the
  same options, refused by name where minisail has no such option). Without an `eos_token_id` it stops where
  upstream's language model stops: at the eos id of the checkpoint's language-model config (`llm_config`, or the
  top level for Yi-VL), as transformers builds that model's generation config from it. Without `max_new_tokens`
  it generates up to minisail's 512 (transformers' default max_length is 20; the model cards pass it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields

import torch

from minisail.errors import ConfigError


class UpstreamAttributes:
    @property
    def system_message(self) -> str:
        """The system message chat() puts in the prompt (the config's or the template's, unless assigned)."""
        from minisail.chat import chat_template

        return chat_template(self).system_message

    @system_message.setter
    def system_message(self, message: str) -> None:
        if not isinstance(message, str):
            raise ConfigError(f"system_message must be a string, not {type(message).__name__}")
        self.__dict__["assigned_system_message"] = message

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, visual_features=None,
                 generation_config=None, output_hidden_states=None, **generate_kwargs) -> torch.Tensor:  # fmt: skip
        """Upstream `model.generate(...)`: new ids [B, n] (see the module docstring)."""
        from minisail.generate import generate

        if input_ids is None:
            raise ConfigError("generate() needs input_ids (the prompt, its images as <IMG_CONTEXT> runs)")
        if output_hidden_states:
            raise ConfigError("generate(output_hidden_states=True) is not supported: run the model's forward instead")
        options = {**_as_options(generation_config), **generate_kwargs}
        if options.get("eos_token_id") is None:
            options["eos_token_id"] = _language_model_eos(self)
        pixels = pixel_values if visual_features is None else None  # visual_features: the images already encoded
        return generate(
            self, input_ids, attention_mask, pixels, options, image_embeds=visual_features, penalize_prompt=False
        )  # fmt: skip  (upstream generates from embeddings: new tokens only)


def _language_model_eos(model) -> int | list[int] | None:
    """eos_token_id of the checkpoint's language-model config (None when the model was not loaded from a folder)."""
    from minisail.config import read_config

    folder = getattr(model, "checkpoint_folder", None)
    if folder is None:
        return None
    config = read_config(folder)
    eos = (config.get("llm_config") or config).get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos]
    if eos is None or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        return None  # absent or not ids: no default stop, as a config without one gives transformers none
    return eos


def _as_options(generation_config) -> dict:
    """A generation config as a dict of options: None, a dict, minisail's GenerationConfig, or a transformers
    GenerationConfig (its non-default values: an option minisail lacks is then refused by name)."""
    if generation_config is None:
        return {}
    if isinstance(generation_config, Mapping):
        return dict(generation_config)
    if callable(getattr(generation_config, "to_diff_dict", None)):  # transformers' GenerationConfig
        options = generation_config.to_diff_dict()
        options.pop("transformers_version", None)
        return options
    names = getattr(type(generation_config), "__dataclass_fields__", None)
    if names is not None:  # minisail's GenerationConfig (its streamer is passed on, not copied)
        return {f.name: getattr(generation_config, f.name) for f in fields(generation_config)}
    kind = type(generation_config).__name__
    raise ConfigError(f"generation_config must be a dict or minisail.generate.GenerationConfig, not {kind}")
