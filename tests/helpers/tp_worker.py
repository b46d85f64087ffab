"""Run under `torchrun --nproc-per-node N tests/helpers/tp_worker.py OUT.json CHECKPOINT ...` by
tests/parallel/test_tensor_parallel.py: every rank loads each checkpoint twice, whole (one process's model) and
tensor parallel over the N ranks, and runs both on the same inputs. Rank 0 writes what it saw to OUT.json:
{"cases": [{"checkpoint", "logits_diff", "vision_diff", "tokens_equal", "bytes": {...}}]}.

Inputs: a golden case's own inputs.safetensors when the checkpoint sits in a case folder, else a text-only prompt
of random ids (and, for the vision tower, random pixels through encode_images).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import minisail
from minisail.generate import greedy_generate
from minisail.parallel import launch
from minisail.parallel.tensor import ShardedInternAttention, ShardedInternMLP
from minisail.parity import image_token_id, read_meta, read_tensors


def inputs_for(checkpoint: Path, model) -> dict:
    case = checkpoint.parent
    if (case / "inputs.safetensors").is_file():
        return read_tensors(case / "inputs.safetensors")
    generator = torch.Generator().manual_seed(0)
    vocab = model.language_model.config.vocab_size
    ids = torch.randint(3, min(vocab, 300), (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    return {"input_ids": ids, "attention_mask": mask}


def sharded_bytes(model) -> dict:
    """Bytes of every parameter, and of those in the decoder layers / ViT layers (the sharded part)."""

    def total(module) -> int:
        return sum(p.numel() * p.element_size() for p in module.parameters())

    vision = getattr(model, "vision_model", None)
    layers = getattr(getattr(vision, "encoder", None), "layers", [])
    return {
        "all": total(model),
        "decoder_layers": total(model.language_model.layers),
        "vit_layers": sum(total(layer) for layer in layers),
    }


def run(checkpoint: Path, tp: int) -> dict:
    whole = minisail.load(checkpoint, dtype=torch.float32)
    split = minisail.load(checkpoint, dtype=torch.float32, tp=tp)
    inputs = inputs_for(checkpoint, whole)
    token_id = image_token_id(read_meta(checkpoint.parent))  # as the parity runner takes it from meta.json
    for model in (whole, split):
        if token_id is not None and model.image_token_id is None:
            model.image_token_id = token_id
    ids, mask, pixels = inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values")
    with torch.inference_mode():
        a, b = whole(ids, mask, pixels), split(ids, mask, pixels)
        real = mask.bool() if mask.shape == a.shape[:2] else torch.ones(a.shape[:2], dtype=torch.bool)
        result = {"checkpoint": str(checkpoint), "logits_diff": (a - b).abs()[real].max().item()}
        vision = getattr(split, "vision_model", None)
        if pixels is None and vision is not None and hasattr(whole.config, "vision"):
            size = whole.config.vision.image_size
            pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        if pixels is not None:
            diff = (whole.encode_images(pixels) - split.encode_images(pixels)).abs().max().item()
            result["vision_diff"] = diff
        new = 6
        result["tokens_equal"] = bool(
            torch.equal(greedy_generate(whole, ids, mask, inputs.get("pixel_values"), max_new_tokens=new),
                        greedy_generate(split, ids, mask, inputs.get("pixel_values"), max_new_tokens=new))
        )  # fmt: skip
    result["bytes"] = {"whole": sharded_bytes(whole), "split": sharded_bytes(split)}
    result["vit_sharded"] = any(isinstance(m, (ShardedInternAttention, ShardedInternMLP)) for m in split.modules())
    return result


def main(out: str, checkpoints: list[str]) -> None:
    launch.start(None)
    tp, me = launch.world_size(), launch.rank()
    try:
        results = [run(Path(c), tp) for c in checkpoints]
        mine = [results]
        everyone = [None] * tp
        torch.distributed.all_gather_object(everyone, mine)  # rank 1's own view: its bytes are checked too
        launch.finish()
    finally:
        launch.stop()
    if me == 0:
        Path(out).write_text(json.dumps({"ranks": [part[0] for part in everyone]}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
