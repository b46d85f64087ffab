"""Writing small official-layout checkpoints for tests (config.json + safetensors, official key names)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from helpers.paths import GOLDEN


def golden_config(case: str) -> dict:
    return json.loads((GOLDEN / case / "checkpoint" / "config.json").read_text())


def golden_tensors(case: str) -> dict[str, torch.Tensor]:
    from minisail.checkpoint.files import open_safetensors_folder

    tensors = open_safetensors_folder(GOLDEN / case / "checkpoint")
    return {name: tensors.read(name) for name in tensors.keys()}


def write_checkpoint(folder: Path, config: dict, tensors: dict[str, torch.Tensor], shards: int = 1) -> Path:
    """Write config.json and the tensors as one model.safetensors or `shards` shards with an index."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {name: t.contiguous() for name, t in tensors.items()}
    if shards == 1:
        save_file(tensors, folder / "model.safetensors")
        return folder
    names = sorted(tensors)
    weight_map = {}
    for k in range(shards):
        shard = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = names[k::shards]
        save_file({n: tensors[n] for n in part}, folder / shard)
        weight_map.update({n: shard for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Redraw every parameter (norm weights around 1, everything else small), so no tensor keeps its init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            if "norm" in name.lower() and name.endswith("weight") and p.ndim == 1:
                p.copy_(1 + 0.1 * noise)
            elif p.ndim >= 2:
                p.copy_(noise / p.shape[-1] ** 0.5)
            else:
                p.copy_(0.1 * noise)
    return module
