"""The strict core of loading: fill a model built on the meta device from checkpoint tensors, through a `KeyMap`.

For each parameter of the model, in order:
1. resolve its rule: the official tensors it is made of (all must exist; a tied lm_head may read the embedding);
2. read them (zero-copy views unless a hook reads them otherwise) and check each part's own shape;
3. join them by the rule and check the result has the parameter's shape;
4. pass the value through the hooks (cast, move, give back pages: checkpoint/hooks.py), and collect it.
Then every checkpoint tensor must have been consumed or deliberately ignored by the key map, and only then is
anything assigned: an error leaves no half-loaded model behind.

What happens to the values on the way (dtype, device, int8, page release, read-ahead) lives in the hooks, so this
file is only the checking: which tensor goes where, and that it fits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from minisail.checkpoint.hooks import LoadHook, Parts
from minisail.checkpoint.keymaps import KeyMap, Rule, bnb_scale_key
from minisail.checkpoint.source import TensorSource
from minisail.errors import CheckpointError


def fill_from_checkpoint(model: nn.Module, tensors: TensorSource, keymap: KeyMap, hooks: Sequence[LoadHook]) -> None:
    """Assign every parameter of `model` (on the meta device) from `tensors`, each value through `hooks`.

    Two parameters made from the same official tensor by a plain rename (a tied lm_head reading the embedding)
    share one tensor, as a tied model does."""
    for hook in hooks:
        hook.prepare(model, tensors)
    ok = False
    try:
        state, tied = _collect(model, tensors, keymap, hooks)
        ok = True
    finally:
        for hook in hooks:
            hook.after(ok)
    model.load_state_dict(state, strict=True, assign=True)
    for name, shared in tied.items():  # one Parameter object, as a tied model has
        module, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(module), leaf, model.get_parameter(shared))
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def _collect(model: nn.Module, tensors: TensorSource, keymap: KeyMap, hooks: Sequence[LoadHook]):
    """({parameter: value} for every parameter, {tied parameter: the one it shares}), all checked."""
    where = tensors.description
    state: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    taken_as_is: dict[str, str] = {}  # official key -> the parameter a plain rename made of it
    tied: dict[str, str] = {}  # parameter -> the parameter it shares (a tied lm_head -> the embedding)
    for name, slot in model.state_dict(keep_vars=True).items():
        if name in state:
            continue  # made together with an earlier one (an Int8Linear's scale, with its weight)
        rule, sources = _sources(keymap, tensors, name, where)
        made = _hook_parts(hooks, name, slot, rule, sources, tensors)  # e.g. an int8 head made from the embedding
        if made is None and rule.join.is_identity and sources[0] in taken_as_is:  # tied: share, never copy
            tied[name] = taken_as_is[sources[0]]
            continue
        if made is None:  # the default: zero-copy views of the official tensors
            made = [Parts(name, sources, [tensors.view(s) for s in sources], tuple(slot.shape), slot.dtype)]
            if rule.join.is_identity:
                taken_as_is[sources[0]] = name
        for parts in made:
            _check_kinds(parts, where)
            value = _join(rule, parts.tensors, parts.keys, parts.shape, parts.name, where)
            for hook in hooks:
                value = hook.convert(parts, value)
            state[parts.name] = value
            consumed.update(parts.keys, parts.also_used)
    unused = [k for k in tensors.keys() if k not in consumed and not keymap.is_ignored(k)]
    if unused:
        shown = ", ".join(repr(k) for k in sorted(unused)[:5])
        raise CheckpointError(
            f"{where}: {len(unused)} checkpoint tensors are not used by the model built from config.json, "
            f"e.g. {shown}: the config does not match the weights"
        )
    for name, shared in tied.items():
        state[name] = state[shared]
    return state, tied


def _hook_parts(hooks, name: str, slot: torch.Tensor, rule: Rule, sources: list[str], tensors) -> list[Parts] | None:
    """The parts the first willing hook reads for `name` (an Int8Linear's weight and scale), or None."""
    for hook in hooks:
        parts = hook.parts(name, slot, rule, sources, tensors)
        if parts is not None:
            return parts
    return None


def _sources(keymap: KeyMap, tensors, name: str, where: str) -> tuple[Rule, list[str]]:
    """The rule for minisail parameter `name` and the official keys it reads, all present in `tensors`."""
    try:
        rule, sources, tied = keymap.resolve(name)
    except KeyError as error:
        raise CheckpointError(f"{where}: {error} (a minisail bug: please report it)") from None
    missing = [s for s in sources if s not in tensors]
    if missing and tied is not None and len(missing) == len(sources) and tied in tensors:
        return rule, [tied]  # a tied lm_head: the checkpoint stores only the embedding
    if missing:
        raise CheckpointError(
            f"{where}: the checkpoint has no tensor {missing[0]!r} (needed for {name}); "
            "the download is incomplete or the config describes another model"
        )
    return rule, sources


def _check_kinds(parts: Parts, where: str) -> None:
    """Float parameters from float tensors, integer ones from integers (an int8 weight needs its scale)."""
    for key, tensor in zip(parts.keys, parts.tensors, strict=True):
        if tensor.dtype.is_floating_point != parts.dtype.is_floating_point:
            hint = ""
            if tensor.dtype == torch.int8:
                hint = f" (an int8 weight needs its bitsandbytes scale {bnb_scale_key(key)!r}, which is missing)"
            raise CheckpointError(
                f"{where}: tensor {key!r} is {tensor.dtype}, expected a {parts.dtype}-like tensor{hint}"
            )


def _join(rule: Rule, parts, sources, shape: tuple, name: str, where: str) -> torch.Tensor:
    """rule.join(parts), each part first checked to have its own expected shape, the result to have `shape`.

    Checking only the joined total would accept a fused q/k/v whose q and k sizes are swapped (same rows in
    all): the expected part shapes are the rule's inverse applied to an empty tensor of the parameter's shape."""
    expected = [tuple(part.shape) for part in rule.join.split(torch.empty(shape, device="meta"))]
    for source, part, want in zip(sources, parts, expected, strict=True):
        if tuple(part.shape) != want:
            whole = f" (of {shape} in all)" if len(sources) > 1 else ""
            raise CheckpointError(
                f"{where}: {name} needs shape {want}{whole} from tensor {source!r}, which has shape "
                f"{tuple(part.shape)}: the config does not match the weights"
            )
    try:
        value = rule.join.join(parts)
    except RuntimeError as error:
        shapes = [tuple(part.shape) for part in parts]
        raise CheckpointError(f"{where}: cannot combine {sources} with shapes {shapes} into {name}: {error}") from None
    if tuple(value.shape) != shape:
        stored = ", ".join(f"{s!r} {tuple(part.shape)}" for s, part in zip(sources, parts, strict=True))
        raise CheckpointError(
            f"{where}: {name} needs shape {shape} from config.json, but the checkpoint has "
            f"{stored}: the config does not match the weights"
        )
    return value
