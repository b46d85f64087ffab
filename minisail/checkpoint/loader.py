"""Strict loading: fill a model built on the meta device from checkpoint tensors, through a `KeyMap`.

- every parameter of the model is produced by a rule, from tensors that exist, with the expected shape;
- every checkpoint tensor is consumed by some rule or deliberately ignored by the key map;
- a tensor taken as it is (same dtype, plain rename) stays a view into the memory-mapped file (no copy);
  one that is converted or joined is read into fresh memory one at a time, so a dtype change never holds
  a second copy of the whole model;
- nothing is assigned until everything checked out: an error leaves no half-loaded model behind.
"""

from __future__ import annotations

import torch
from torch import nn

from minisail.checkpoint.files import CheckpointTensors
from minisail.checkpoint.keymaps import KeyMap
from minisail.errors import CheckpointError


def checkpoint_dtype(tensors: CheckpointTensors) -> torch.dtype:
    """The floating dtype holding most of the checkpoint's bytes (bf16 for the official releases)."""
    totals: dict[torch.dtype, int] = {}
    for name in tensors.keys():
        dtype = tensors.dtype(name)
        if dtype.is_floating_point:
            numel = 1
            for d in tensors.shape(name):
                numel *= d
            totals[dtype] = totals.get(dtype, 0) + numel * dtype.itemsize
    return max(totals, key=totals.get) if totals else torch.float32


def fill_from_checkpoint(model: nn.Module, tensors: CheckpointTensors, keymap: KeyMap, dtype: torch.dtype) -> None:
    """Assign every parameter of `model` (on the meta device) from `tensors`; float tensors cast to `dtype`."""
    where = tensors.description
    state: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    for name, slot in model.state_dict(keep_vars=True).items():
        try:
            rule, sources, tied = keymap.resolve(name)
        except KeyError as error:
            raise CheckpointError(f"{where}: {error} (a minisail bug: please report it)") from None
        missing = [s for s in sources if s not in tensors]
        if missing and tied is not None and len(missing) == len(sources) and tied in tensors:
            sources = [tied]  # a tied lm_head: the checkpoint stores only the embedding
        elif missing:
            raise CheckpointError(
                f"{where}: the checkpoint has no tensor {missing[0]!r} (needed for {name}); "
                "the download is incomplete or the config describes another model"
            )
        target_dtype = dtype if slot.dtype.is_floating_point else slot.dtype
        zero_copy = rule.join.is_identity and tensors.dtype(sources[0]) == target_dtype
        parts = [tensors.view(s) if zero_copy else tensors.read(s) for s in sources]
        for source, part in zip(sources, parts, strict=True):
            if part.dtype.is_floating_point != slot.dtype.is_floating_point:
                raise CheckpointError(
                    f"{where}: tensor {source!r} is {part.dtype}, expected a {slot.dtype}-like tensor"
                )
        try:
            value = rule.join.join(parts)
        except RuntimeError as error:
            shapes = [tuple(tensors.shape(s)) for s in sources]
            raise CheckpointError(
                f"{where}: cannot combine {sources} with shapes {shapes} into {name}: {error}"
            ) from None
        if tuple(value.shape) != tuple(slot.shape):
            stored = ", ".join(f"{s!r} {tuple(tensors.shape(s))}" for s in sources)
            raise CheckpointError(
                f"{where}: {name} needs shape {tuple(slot.shape)} from config.json, but the checkpoint has "
                f"{stored}: the config does not match the weights"
            )
        state[name] = value if value.dtype == target_dtype else value.to(target_dtype)
        consumed.update(sources)
    unused = [k for k in tensors.keys() if k not in consumed and not keymap.is_ignored(k)]
    if unused:
        shown = ", ".join(repr(k) for k in sorted(unused)[:5])
        raise CheckpointError(
            f"{where}: {len(unused)} checkpoint tensors are not used by the model built from config.json, "
            f"e.g. {shown}: the config does not match the weights"
        )
    model.load_state_dict(state, strict=True, assign=True)
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def to_official_state_dict(model: nn.Module, keymap: KeyMap) -> dict[str, torch.Tensor]:
    """The inverse of loading: the model's weights under the official key names (for writing checkpoints)."""
    official: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        rule, sources, _tied = keymap.resolve(name)
        for source, part in zip(sources, rule.join.split(value), strict=True):
            official[source] = part.contiguous()
    return official
