"""What a Linear prepared for this CPU refuses, with a minisail error instead of a wrong result or a raw one.

`speed_up_on_cpu` (fast/cpu.py) swaps Linears for twins whose weight is held in a kernel's own form: oneDNN's
blocked bf16 layout (`PackedLinear`, fast/packing.py), oneDNN's or fbgemm's packed int8 (`DotInt8Linear`,
fast/int8_dot.py). Their `state_dict()` still writes the plain weight, so saving works; but they have no plain
weight to load into, and an opaque packed weight cannot change dtype or device. Without these checks, loading a
state dict left the packed weight as it was (silently, with strict=False) and `model.float()` or `.to("cuda")`
failed inside oneDNN. Both are done on the plain model: before `speed_up_on_cpu`, or after undoing it
(fast/packing.py `unpack_linears`, fast/int8_dot.py `undot_int8_linears`).

Each such module has `check_conversion(fn)` (raises where `fn`, what .to()/.float() apply, cannot apply to it) and
`check_state_dict_load(state_dict, prefix)`, and refuses by itself; minisail's model classes ask all of them first
(minisail/whole_model.py), so that a refused conversion or load changes nothing anywhere.
"""

from __future__ import annotations

import torch
from torch import nn

from minisail.errors import MinisailError

UNDO = (
    "do it on the plain model: before speed_up_on_cpu, or after minisail.fast.packing.unpack_linears(model) / "
    "minisail.fast.int8_dot.undot_int8_linears(model)"
)


def refuse_state_dict_load(module: nn.Module, state_dict: dict, prefix: str) -> None:
    """For `_load_from_state_dict`: a state dict holding this module's own entries is refused, naming one."""
    own = [key for key in state_dict if key.startswith(prefix) and "." not in key[len(prefix) :]]
    if own:
        raise MinisailError(
            f"{prefix.rstrip('.') or 'this module'} is a {type(module).__name__}, its weight prepared for this CPU, "
            f"and cannot load {own[0]!r}: load the weights into the plain model; {UNDO}"
        )


def apply_or_refuse(module: nn.Module, apply) -> nn.Module:
    """Run `apply()` (a trial of what .to(), .float(), .cuda() do, on a packed weight), turning its refusal into a
    minisail error."""
    try:
        return apply()
    except (RuntimeError, NotImplementedError) as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise MinisailError(
            f"a {type(module).__name__} holds its weight packed for this CPU, which cannot change dtype or device "
            f"({reason}); {UNDO}"
        ) from error


def refuse_move(module: nn.Module, device: torch.device) -> None:
    """For an `_apply` that would leave a weight packed outside torch (fbgemm's) behind: refused before any change."""
    raise MinisailError(
        f"a {type(module).__name__} holds its weight packed for this CPU and cannot move to {device}; {UNDO}"
    )


def check_activation_dtype(module: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> None:
    """A packed product takes activations of its weight's dtype only; another dtype is refused in words."""
    if x.dtype != dtype:
        raise MinisailError(
            f"a {type(module).__name__} packed for {dtype} was given {x.dtype} activations: run the model in the "
            f"dtype it was loaded in (or convert the plain model before speed_up_on_cpu)"
        )
