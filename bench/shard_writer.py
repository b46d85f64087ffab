"""Writing the benchmark's checkpoints as safetensors shards: random weights made one shard at a time.

    model-00001-of-0000n.safetensors ... + model.safetensors.index.json (weight_map, metadata.total_size)

`write_official` writes a preset's seeded random bf16 weights in the official layout without ever building the
model: the shapes come from the model built on the meta device, the official names and shapes from the family's
weight map (each rule's `split`, run on meta tensors), and each shard's tensors are made, written and dropped
before the next shard's are made. So writing peaks near one shard (SHARD_BYTES, 2 GiB) plus the fixed pool of
samples, whatever the model's size: an 8B model (17.8 GB in bf16) is written on a machine with 24 GB of RAM,
where building it whole would not fit beside anything else.

The values are those of building the model in bf16 and filling it parameter by parameter in `state_dict` order
(issue 9's rule, FORMAT 2): each parameter is cut from one pool of 2^24 normal samples at seeded random offsets
(one per 2^24 elements, drawn in that order), then scaled: norm weights near 1, matrices ~ N(0, 1/fan_in), the
rest small. Speed does not depend on the values, only on their being ordinary numbers (no NaN, inf or denormals),
and drawing billions of fresh samples would take longer than writing. The offsets are drawn up front (a few
integers per parameter), so any parameter's values can be made alone, in any order, bit for bit the same;
tests/speed/test_shard_writer.py checks the files against building the whole model.

`write_shards` is the other way in, for tensors that exist already (the transformers copy: zero-copy views of the
official files), with the same shard rule and index.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.models import build_on_meta
from bench.presets import Preset

SHARD_BYTES = 2 * 1024**3  # the releases use 2-5 GB shards
POOL = 1 << 24  # normal samples every tensor is cut from


def shard_names(sizes: dict[str, int], shard_bytes: int = SHARD_BYTES) -> list[list[str]]:
    """The names in order, cut into shards of at most `shard_bytes` (a larger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes.items():
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def shard_file(k: int, count: int) -> str:
    return f"model-{k + 1:05d}-of-{count:05d}.safetensors"


def write_index(folder: Path, shards: list[list[str]], total_bytes: int) -> None:
    weight_map = {name: shard_file(k, len(shards)) for k, names in enumerate(shards) for name in names}
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_shards(folder: Path, tensors: dict[str, torch.Tensor], shard_bytes: int = SHARD_BYTES) -> None:
    """`tensors` as model-0000k-of-0000n.safetensors shards of about `shard_bytes` and their index."""
    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    shards = shard_names(sizes, shard_bytes)
    for k, names in enumerate(shards):
        save_file({n: tensors[n].contiguous() for n in names}, folder / shard_file(k, len(shards)), {"format": "pt"})
    write_index(folder, shards, sum(sizes.values()))


class RandomValues:
    """The seeded values of a model's parameters ({name: meta tensor}, in state_dict order), one at a time."""

    def __init__(self, slots: dict[str, torch.Tensor], seed: int):
        generator = torch.Generator().manual_seed(seed)
        pool = torch.randn(POOL, generator=generator)
        self.pool = torch.cat([pool, pool])  # [2^25] float32: a slice may wrap around
        self.slots = slots
        self.offsets = {  # drawn in the order the whole-model fill draws them: one per 2^24 elements
            name: [int(torch.randint(0, POOL, (1,), generator=generator)) for _ in range(0, slot.numel(), POOL)]
            for name, slot in slots.items()
        }

    def make(self, name: str) -> torch.Tensor:
        """Parameter `name`'s values: the pool's slices cast to its dtype, then scaled in that dtype."""
        slot = self.slots[name]
        value = torch.empty(slot.shape, dtype=slot.dtype)
        flat = value.view(-1)
        for k, offset in enumerate(self.offsets[name]):
            chunk = flat[k * POOL : (k + 1) * POOL]
            chunk.copy_(self.pool[offset : offset + chunk.numel()])
        if value.ndim == 1 and "norm" in name and name.endswith("weight"):
            value.mul_(0.1).add_(1.0)
        elif value.ndim >= 2:
            value.mul_(value.shape[-1] ** -0.5)
        else:
            value.mul_(0.1)
        return value


def official_layout(preset: Preset) -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
    """The bf16 model's parameters on meta ({minisail name: slot}) and, for every official tensor, in the order
    `to_official_state_dict` lists them: (minisail parameter, its Join, part index, meta part)."""
    model, keymap = build_on_meta(preset)
    params = model.to(torch.bfloat16).state_dict(keep_vars=True)
    # tied parameters (one tensor, two names): filling them in order leaves the last name's values in both
    last_name = {id(p): name for name, p in params.items()}
    slots = {name: p.detach() for name, p in params.items()}
    layout: dict[str, tuple] = {}
    for name, slot in slots.items():
        rule, sources, _tied = keymap.resolve(name)
        for i, (source, part) in enumerate(zip(sources, rule.join.split(slot), strict=True)):
            layout[source] = (last_name[id(params[name])], rule.join, i, part)
    return slots, layout


def _shard_values(names: list[str], layout: dict[str, tuple], values: RandomValues) -> dict[str, torch.Tensor]:
    """The official tensors `names`, each cut from its parameter's values (made once for consecutive names: q, k and
    v of one qkv). A part of a fused parameter is copied out, so no view keeps the rest of the parameter alive."""
    out: dict[str, torch.Tensor] = {}
    param, whole = None, None
    for name in names:
        source, join, i, _part = layout[name]
        if source != param:
            param, whole = source, None  # the previous parameter's values go before the next one's are made
            whole = values.make(param)
        part = join.split(whole)[i].contiguous()
        out[name] = part.clone() if part.numel() < whole.numel() else part
    return out


def write_official(
    preset: Preset,
    folder: Path,
    seed: int = 0,
    shard_bytes: int = SHARD_BYTES,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Random bf16 weights at the preset's shapes as an official-layout checkpoint in `folder`, shard by shard:
    at most one shard's tensors exist at a time (a tensor larger than `shard_bytes` is a shard of its own)."""
    slots, layout = official_layout(preset)
    values = RandomValues(slots, seed)
    sizes = {name: part.numel() * part.element_size() for name, (_p, _j, _i, part) in layout.items()}
    shards = shard_names(sizes, shard_bytes)
    folder.mkdir(parents=True, exist_ok=True)
    for k, names in enumerate(shards):
        file = shard_file(k, len(shards))
        save_file(_shard_values(names, layout, values), folder / file, metadata={"format": "pt"})
        if progress:
            progress(f"{file}: {sum(sizes[n] for n in names) / 1e9:.2f} GB")
    write_index(folder, shards, sum(sizes.values()))
    (folder / "config.json").write_text(json.dumps(preset.config, indent=2))
