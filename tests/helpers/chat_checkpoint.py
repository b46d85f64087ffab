"""A tiny chat-ready InternVL checkpoint with the real Qwen2.5 tokenizer beside it, and the real photo it is asked
about: what the chat, CLI and hostile-input tests share."""

from __future__ import annotations

import copy
from pathlib import Path

from helpers import tokenizer_files
from helpers.checkpoints import golden_config, randomize_, write_checkpoint
from helpers.paths import DATA
from minisail.checkpoint.export import to_official_state_dict
from minisail.models.registry import detect_family

IMAGE = DATA / "internvl" / "images" / "red_panda.jpg"
CONTEXT = 4096


def build_chat_checkpoint(folder: Path) -> Path:
    """A ~10 MB InternVL-layout checkpoint (Qwen2.5 vocabulary, tied head) with the tokenizer files beside it."""
    config = copy.deepcopy(golden_config("internvl-qwen2-tiny"))  # template internvl2_5, ps v1, select_layer -4
    config.update(force_image_size=56, hidden_size=16)
    config["vision_config"].update(
        hidden_size=16, num_attention_heads=2, num_hidden_layers=4, intermediate_size=32, image_size=56
    )
    config["llm_config"].update(
        hidden_size=16,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        num_hidden_layers=2,
        vocab_size=151674,
        tie_word_embeddings=True,
        max_position_embeddings=CONTEXT,
    )
    family = detect_family(config)
    model = randomize_(family.build(family.parse(config)), seed=3)
    tensors = to_official_state_dict(model, family.weight_map(model.config))
    del tensors["language_model.lm_head.weight"]  # tied: the loader falls back to embed_tokens
    write_checkpoint(folder, config, tensors)
    tokenizer_files.build_tokenizer_dir("internvl-qwen2.5", folder)
    return folder
