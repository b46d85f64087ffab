"""Strict loading: fill a model built on the meta device from checkpoint tensors, through a `KeyMap`.

- every parameter of the model is produced by a rule, from tensors that exist, with the expected shape;
- every checkpoint tensor is consumed by some rule or deliberately ignored by the key map;
- a tensor taken as it is (same dtype, plain rename) stays a view into the memory-mapped file (no copy);
  one that is converted or joined is read into fresh memory one at a time, so a dtype change never holds
  a second copy of the whole model;
- nothing is assigned until everything checked out: an error leaves no half-loaded model behind.

An `Int8Linear` (minisail/quant.py) is filled as a unit: its int8 weight and float32 per-row scale come either
from a bitsandbytes LLM.int8 checkpoint (`X.weight` int8 + `X.SCB` row absmax, scale = SCB / 127, the int8 rows
never converted to float) or, from a float checkpoint, by quantising each official tensor as it is read. The
rows and their absmax go through the weight's `Join` together, so fused and regrouped layers stay exact.
"""

from __future__ import annotations

import torch
from torch import nn

from minisail.checkpoint.files import CheckpointTensors
from minisail.checkpoint.keymaps import KeyMap, Rule, bnb_format_key, bnb_scale_key
from minisail.checkpoint.readahead import ReadAhead
from minisail.errors import CheckpointError
from minisail.quant import Int8Linear, quantize_rows


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


def fill_from_checkpoint(
    model: nn.Module, tensors: CheckpointTensors, keymap: KeyMap, dtype: torch.dtype, device=None
) -> None:
    """Assign every parameter of `model` (on the meta device) from `tensors`; float tensors cast to `dtype`.

    With a `device` other than the CPU, each tensor moves there as soon as it is made, so a model converted on
    its way to a GPU never exists whole in host memory. Two parameters made from the same official tensor by a
    plain rename (a tied lm_head reading the embedding) share one tensor, as a tied model does.

    Meanwhile the files stream into the page cache (checkpoint/readahead.py). When the model keeps zero-copy
    views into them, the read-ahead goes on after the fill, so the views' pages are in memory when first used."""
    readahead = ReadAhead(tensors.paths()) if hasattr(tensors, "paths") else None
    try:
        views = _fill(model, tensors, keymap, dtype, device)
    except BaseException:
        if readahead is not None:
            readahead.stop()
        raise
    if readahead is not None and not views:
        readahead.stop()


def _fill(model: nn.Module, tensors: CheckpointTensors, keymap: KeyMap, dtype: torch.dtype, device) -> int:
    """fill_from_checkpoint's work; returns how many parameters are zero-copy views into the files."""
    where = tensors.description
    views = 0
    device = None if device is None or torch.device(device).type == "cpu" else torch.device(device)
    state: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    taken_as_is: dict[str, str] = {}  # official key -> the parameter a plain rename made of it
    tied: dict[str, str] = {}  # parameter -> the parameter it shares (a tied lm_head -> the embedding)
    int8_modules = {name for name, module in model.named_modules() if isinstance(module, Int8Linear)}
    for name, slot in model.state_dict(keep_vars=True).items():
        module, _, leaf = name.rpartition(".")
        if module in int8_modules and leaf == "scale":
            continue  # filled with the module's weight
        rule, sources = _sources(keymap, tensors, name, where)
        if module in int8_modules and leaf == "weight":
            weight, scale, used = _int8_weight(rule, sources, slot, tensors, name, where)
            state[name], state[f"{module}.scale"] = weight.to(device), scale.to(device)
            consumed.update(used)
            continue
        target_dtype = dtype if slot.dtype.is_floating_point else slot.dtype
        if rule.join.is_identity and sources[0] in taken_as_is:  # tied: share, never copy
            tied[name] = taken_as_is[sources[0]]
            continue
        zero_copy = rule.join.is_identity and tensors.dtype(sources[0]) == target_dtype
        parts = [tensors.view(s) for s in sources]  # converted or joined below unless zero_copy
        views += zero_copy and device is None
        for source, part in zip(sources, parts, strict=True):
            if part.dtype.is_floating_point != slot.dtype.is_floating_point:
                hint = ""
                if part.dtype == torch.int8:
                    hint = f" (an int8 weight needs its bitsandbytes scale {bnb_scale_key(source)!r}, which is missing)"
                raise CheckpointError(
                    f"{where}: tensor {source!r} is {part.dtype}, expected a {slot.dtype}-like tensor{hint}"
                )
        value = _join(rule, parts, sources, tuple(slot.shape), name, where)
        state[name] = value.to(device=device, dtype=target_dtype)  # a no-op when both already match
        if not zero_copy:  # the parameter is new memory: the mapped pages it was made from can go
            _release(tensors, sources, parts, state[name])
        if rule.join.is_identity:
            taken_as_is[sources[0]] = name
        consumed.update(sources)
    unused = [k for k in tensors.keys() if k not in consumed and not keymap.is_ignored(k)]
    if unused:
        shown = ", ".join(repr(k) for k in sorted(unused)[:5])
        raise CheckpointError(
            f"{where}: {len(unused)} checkpoint tensors are not used by the model built from config.json, "
            f"e.g. {shown}: the config does not match the weights"
        )
    for name, shared in tied.items():
        state[name] = state[shared]
    model.load_state_dict(state, strict=True, assign=True)
    for name, shared in tied.items():  # one Parameter object, as a tied model has
        module, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(module), leaf, model.get_parameter(shared))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return views


def _release(tensors, sources, parts, value: torch.Tensor) -> None:
    """Give back the mapped pages of `sources` (views read to make `value`), unless `value` still uses them."""
    if value.device.type == "cpu" and value.numel():
        own = value.untyped_storage().data_ptr()
        if any(part.numel() and part.untyped_storage().data_ptr() == own for part in parts):
            return
    for source in sources:
        tensors.release(source)


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


def _int8_weight(rule: Rule, sources, slot, tensors, name: str, where: str):
    """(int8 weight, float32 scale, checkpoint keys used) for the Int8Linear whose weight is `name`."""
    weights, absmaxes, used = [], [], []
    for source in sources:
        scb = bnb_scale_key(source)
        if scb in tensors:  # stored int8 by bitsandbytes
            weight, absmax = _stored_int8(source, scb, tensors, rule.join.is_identity, where)
            used += [source, scb]
            if bnb_format_key(source) in tensors:
                _check_row_major(bnb_format_key(source), tensors, where)
                used.append(bnb_format_key(source))
        elif tensors.dtype(source).is_floating_point:  # a float checkpoint, quantised as it is read
            weight, absmax = quantize_rows(tensors.view(source))
            tensors.release(source)
            used.append(source)
        else:
            raise CheckpointError(
                f"{where}: tensor {source!r} is {tensors.dtype(source)} without its bitsandbytes scale {scb!r}: "
                "the checkpoint is incomplete"
            )
        weights.append(weight)
        absmaxes.append(absmax)
    scales = [bnb_scale_key(s) for s in sources]
    weight = _join(rule, weights, sources, tuple(slot.shape), name, where)
    absmax = _join(rule, absmaxes, scales, tuple(slot.shape[:1]), name, where)
    if not bool(torch.isfinite(absmax).all()):
        raise CheckpointError(f"{where}: {sources} hold non-finite values (or scales): the checkpoint is corrupt")
    return weight, absmax / 127, used


def _stored_int8(source: str, scb: str, tensors, zero_copy: bool, where: str):
    """A bitsandbytes int8 weight and its row absmax (SCB), with their dtypes and shapes checked."""
    shape, scb_shape = list(tensors.shape(source)), list(tensors.shape(scb))
    if tensors.dtype(source) != torch.int8:
        raise CheckpointError(
            f"{where}: {scb!r} marks {source!r} as a bitsandbytes int8 weight, but it is stored as "
            f"{tensors.dtype(source)}: the checkpoint is inconsistent"
        )
    if len(shape) != 2 or scb_shape != shape[:1] or not tensors.dtype(scb).is_floating_point:
        raise CheckpointError(
            f"{where}: {scb!r} is {tensors.dtype(scb)} {scb_shape}, but the int8 weight {source!r} {shape} needs "
            f"one float scale per row ({shape[:1]}): the checkpoint is corrupt"
        )
    absmax = tensors.read(scb).float()
    if bool((absmax < 0).any()):
        raise CheckpointError(f"{where}: {scb!r} holds negative row maxima: the checkpoint is corrupt")
    return (tensors.view(source) if zero_copy else tensors.read(source)), absmax


def _check_row_major(key: str, tensors, where: str) -> None:
    """bitsandbytes' weight_format: 0 row-major; 1-3 (col32, col_turing, col_ampere) are old GPU tile layouts."""
    value = tensors.read(key).reshape(-1)
    if value.numel() != 1 or int(value[0]) != 0:
        raise CheckpointError(
            f"{where}: {key!r} = {value.tolist()}: the int8 weight is stored in a bitsandbytes GPU tile layout "
            "(col32 / col_turing / col_ampere), which minisail does not read; re-save the model with a recent "
            "bitsandbytes, which writes row-major weights"
        )


def to_official_state_dict(model: nn.Module, keymap: KeyMap) -> dict[str, torch.Tensor]:
    """The inverse of loading: the model's weights under the official key names (for writing checkpoints).

    An Int8Linear is written as bitsandbytes does: `X.weight` int8 and `X.SCB` = scale * 127 (float32).
    """
    int8_modules = {name for name, module in model.named_modules() if isinstance(module, Int8Linear)}
    official: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if module in int8_modules and leaf == "scale":
            rule, weights, _tied = keymap.resolve(f"{module}.weight")
            sources, value = [bnb_scale_key(w) for w in weights], value * 127
        else:
            rule, sources, _tied = keymap.resolve(name)
        for source, part in zip(sources, rule.join.split(value), strict=True):
            official[source] = part.contiguous()
    return official
