"""`python -m minisail chat` end to end for the families beyond SAIL-VL-2B, each with its real tokenizer.

For InternVL-Chat-V1-5 (InternLM2, SentencePiece tokenizer, English system message, BOS), Mono-InternVL
(InternLM2 with visual experts) and SAIL-VL2 (Qwen3, univl-chat, no BOS): a random-weight checkpoint in the
official layout of the family's golden case, with vocab_size = len(real tokenizer) so the real tokenizer,
template and image tokens drive it, and the tokenizer files beside it. The CLI's streamed reply must equal
the reply computed without minisail.chat / session: template from config.json, query, ids, greedy decoding,
cut at the first stop id, decoded as chat() decodes.
"""

from __future__ import annotations

import copy
import json

import pytest
from helpers import tokenizer_files
from helpers.chat_checkpoint import IMAGE
from helpers.checkpoints import golden_config, randomize_, write_checkpoint

import minisail
from minisail.checkpoint.export import to_official_state_dict
from minisail.cli import main
from minisail.generate import greedy_generate
from minisail.image.preprocess import internvl_pixel_values
from minisail.models.registry import detect_family
from minisail.text.prompt import build_query, chat_eos_token_id, decode_reply, encode_queries
from minisail.text.templates import template_for_config

FAMILIES = {
    # case: (tokenizer folder, template the config must resolve to, whether the tokenizer adds BOS)
    "internvl-internlm2-tiny": ("internvl-internlm2", "internlm2-chat-v1-5", True),
    "mono-internvl-tiny": ("internvl-internlm2", "internlm2-chat", True),
    "sail-vl2-tiny": ("sail-vl2", "univl-chat", False),
}


def build(case: str, folder):
    config = copy.deepcopy(golden_config(case))
    tokenizer_dir = tokenizer_files.build_tokenizer_dir(FAMILIES[case][0], folder)
    vocab = len(minisail.load_tokenizer(tokenizer_dir))
    config["llm_config"].update(vocab_size=vocab, hidden_size=32, intermediate_size=48, max_position_embeddings=8192)
    if "head_dim" in config["llm_config"]:
        config["llm_config"]["head_dim"] = 16
    config["max_dynamic_patch"] = 4  # a few 112 px tiles of the real photo
    family = detect_family(config)
    hidden = config["llm_config"]["hidden_size"]
    model = family.build(family.parse(config))
    randomize_(model, seed=11)
    tensors = to_official_state_dict(model, family.weight_map(model.config))
    assert any(t.shape[0] == vocab for t in tensors.values())
    write_checkpoint(folder, config, tensors)
    assert model.config.llm.hidden_size == hidden
    return folder


@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_cli_chat_streams_the_reply_computed_without_the_chat_code(case, tmp_path, capsys):
    folder = build(case, tmp_path / case)
    question = "What animal is this?"
    code = main(["chat", "--model", str(folder), "--image", str(IMAGE), "--max-new-tokens", "6", question])
    out, err = capsys.readouterr()
    assert code == 0, err

    model, tokenizer = minisail.load(folder), minisail.load_tokenizer(folder)
    template = template_for_config(json.loads((folder / "config.json").read_text()))
    assert template.name == FAMILIES[case][1]
    pixel_values = internvl_pixel_values(IMAGE, max_tiles=4, image_size=model.config.image_size)
    query = build_query(
        template, question, num_patches_list=[len(pixel_values)], tokens_per_tile=model.config.tokens_per_tile
    )
    encoded = encode_queries(tokenizer, query.text)
    assert (encoded.input_ids[0, 0].item() == tokenizer.bos_token_id) == FAMILIES[case][2]
    assert model.image_token_id == tokenizer.token_to_id("<IMG_CONTEXT>")
    ids = greedy_generate(model, encoded.input_ids, encoded.attention_mask, pixel_values, max_new_tokens=6)[0].tolist()
    stops = {chat_eos_token_id(tokenizer, template), tokenizer.eos_token_id}
    cut = next((i for i, t in enumerate(ids) if t in stops), None)
    ids = ids if cut is None else ids[: cut + 1]
    assert len(ids) > 1 and out.strip()  # a real reply, not an immediate stop
    assert out == decode_reply(tokenizer, ids, template) + "\n"
