"""tests/tools/record_golden.py writes case folders that `minisail parity` reads.

The official-model half of the script needs a real checkpoint with its remote code and cannot run here; this
checks the half that decides the format: a case written by `write_case` (outputs from minisail itself on a
golden checkpoint) passes the parity runner, and a tampered one fails.
"""

from __future__ import annotations

import sys

import torch
from helpers import paths
from helpers.checkpoints import GOLDEN
from safetensors.torch import load_file

from minisail.cli import main

sys.path.insert(0, str(paths.TOOLS))
from record_golden import write_case  # noqa: E402

import minisail  # noqa: E402
from minisail.generate import greedy_generate  # noqa: E402


def test_written_case_passes_parity_and_a_tampered_one_fails(tmp_path, capsys):
    source = GOLDEN / "internvl-qwen2-tiny"
    inputs = load_file(source / "inputs.safetensors")
    model = minisail.load(source / "checkpoint")
    model.image_token_id = 384
    with torch.inference_mode():
        logits = model(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
        vision = model.encode_images(inputs["pixel_values"])
    tokens = greedy_generate(
        model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], max_new_tokens=5
    )
    meta = {"image_tokens": {"IMG_CONTEXT_id": 384}, "dtype": "float32"}
    expected = {"logits": logits, "generated_ids": tokens, "vision_embeds": vision}
    case = write_case(tmp_path / "mine", source / "checkpoint", inputs, expected, meta)
    assert (case / "checkpoint").is_symlink()
    assert main(["parity", str(case)]) == 0
    expected["generated_ids"] = tokens.flip(-1)
    write_case(case, source / "checkpoint", inputs, expected, meta)
    assert main(["parity", str(case)]) == 1
    assert "DIFFER" in capsys.readouterr().out
