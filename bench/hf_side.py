"""The transformers side of the benchmark: the same weights in transformers' native InternVL classes.

Used only when the benchmark is asked to compare (the `parity` extra installed; the worker and the machine
report also import transformers, to load it before the clock starts and to print its version). The benchmark
lives outside minisail/ for this reason: the library never imports transformers.

- `write_transformers_checkpoint`: the official-layout benchmark checkpoint renamed for transformers'
  `InternVLForConditionalGeneration` (InternVLVisionModel + multi_modal_projector + Qwen2Model + lm_head)
  through hf_names.py's table, the one the parity tests use the other way round (InternViT's fused qkv split
  into q/k/v, `ls1` -> `lambda_1`, `mlp1.{0,1,3}` -> the projector's `layer_norm` / `linear_1` / `linear_2`).
  The vision-only preset gets an `InternVLModel` whose language model has no layers (transformers'
  image-feature path needs one; it is never run).
- `TransformersRunner`: loads it with `from_pretrained(dtype=...)` (default attention: SDPA) and runs
  `get_image_features`, a cached forward with `logits_to_keep=1` and `generate()` (greedy, default cache).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from bench.hf_names import internvl, to_transformers
from bench.models import DTYPES
from bench.presets import Preset
from bench.shard_writer import write_shards
from minisail.checkpoint.files import open_safetensors_folder
from minisail.errors import CheckpointError


def hf_config(preset: Preset):
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

    vision = preset.config["vision_config"]
    six_b = vision["norm_type"] == "rms_norm"
    vision_config = InternVLVisionConfig(
        hidden_size=vision["hidden_size"],
        num_hidden_layers=vision["num_hidden_layers"],
        num_attention_heads=vision["num_attention_heads"],
        intermediate_size=vision["intermediate_size"],
        image_size=[vision["image_size"]] * 2,
        patch_size=[vision["patch_size"]] * 2,
        norm_type=vision["norm_type"],
        use_qk_norm=vision["qk_normalization"],
        attention_bias=vision["qkv_bias"],
        layer_norm_eps=vision["layer_norm_eps"],
        hidden_act="gelu",
        layer_scale_init_value=0.1 if six_b else 1.0,
    )
    llm = preset.config["llm_config"]
    if preset.has_llm:
        keys = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"]
        keys += ["intermediate_size", "rms_norm_eps", "rope_theta", "max_position_embeddings"]
        text_config = Qwen2Config(**{k: llm[k] for k in keys}, tie_word_embeddings=False)
    else:  # a language model with no layers: only the projector's output width matters
        width = llm["hidden_size"]
        text_config = Qwen2Config(vocab_size=8, hidden_size=width, num_hidden_layers=0, intermediate_size=16)
    config = InternVLConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=preset.image_token_id,
        downsample_ratio=preset.config["downsample_ratio"],
        vision_feature_layer=preset.config["select_layer"],
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    config.architectures = ["InternVLForConditionalGeneration" if preset.has_llm else "InternVLModel"]
    return config


def hf_model_class(preset: Preset):
    from transformers import InternVLForConditionalGeneration, InternVLModel

    return InternVLForConditionalGeneration if preset.has_llm else InternVLModel


def write_transformers_checkpoint(preset: Preset, official: Path, folder: Path) -> None:
    """The official checkpoint in `official`, renamed for transformers, written to `folder` (config.json + shards)."""
    config = hf_config(preset)
    prefix = "model." if preset.has_llm else ""
    tensors = open_safetensors_folder(official)
    converted = to_transformers(internvl(prefix), {name: tensors.view(name) for name in tensors.keys()})
    with torch.device("meta"):
        expected = hf_model_class(preset)(config).state_dict()
    generator = torch.Generator().manual_seed(1)
    for name, slot in expected.items():  # the layer-less language model of the vision-only preset
        if name not in converted and name.startswith("language_model."):
            converted[name] = (1 + 0.1 * torch.randn(slot.shape, generator=generator)).to(torch.bfloat16)
    if set(converted) != set(expected):
        extra, missing = sorted(set(converted) - set(expected)), sorted(set(expected) - set(converted))
        raise CheckpointError(f"transformers conversion mismatch: extra {extra[:3]}, missing {missing[:3]}")
    write_shards(folder, converted)
    config.save_pretrained(folder)


class _TokenTimes:
    """A generate() streamer that records when each new token arrives (the first put is the prompt)."""

    def __init__(self):
        self.start, self.times, self.prompt_seen = time.perf_counter(), [], False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter() - self.start)

    def end(self):
        pass


class TransformersRunner:
    def __init__(self, preset: Preset, folder: Path, dtype: str):
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        self.preset = preset
        self.model = hf_model_class(preset).from_pretrained(folder, dtype=DTYPES[dtype]).eval()

    def weights(self) -> torch.nn.Module:
        return self.model

    def setup(self, pixels, ids):
        self.pixels, self.ids, self.mask = pixels, ids, torch.ones_like(ids)
        if self.preset.has_llm:
            embeds = self.model.get_input_embeddings()(ids)
            image = self._image_features(pixels[:1]).to(embeds.dtype)
            slots = (ids == self.preset.image_token_id)[..., None].expand_as(embeds)
            self.embeds = embeds.masked_scatter(slots, image)

    def _image_features(self, pixels):
        out = self.model.get_image_features(pixel_values=pixels.to(self.model.dtype))
        return out.pooler_output if hasattr(out, "pooler_output") else out

    def vision(self, tiles: int):
        return self._image_features(self.pixels[:tiles])

    def prefill(self):
        out = self.model(inputs_embeds=self.embeds, attention_mask=self.mask, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1)

    def generate(self, tokens: int) -> list[float]:
        streamer = _TokenTimes()
        self.model.generate(
            input_ids=self.ids,
            attention_mask=self.mask,
            pixel_values=self.pixels[:1].to(self.model.dtype),
            max_new_tokens=tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            streamer=streamer,
        )
        return streamer.times
