"""Filling `Int8Linear`s (fast/int8.py) from a checkpoint: which Linears are int8, and the loader hook that reads them.

An Int8Linear is filled as a unit: its int8 weight and float32 per-row scale come either from a bitsandbytes
LLM.int8 checkpoint (`X.weight` int8 + `X.SCB` row absmax, scale = SCB / 127, the int8 rows never converted to
float) or, from a float checkpoint, by quantising each official tensor as it is read (`quantize_rows`), its mapped
pages given back at once. The rows and their absmax go through the weight's `Join` as two `Parts`, so the loader
core checks both shapes, and fused and regrouped layers stay exact.
"""

from __future__ import annotations

import torch
from torch import nn

from minisail.checkpoint.hooks import LoadHook, Parts
from minisail.checkpoint.keymaps import KeyMap, Rule, bnb_format_key, bnb_scale_key
from minisail.checkpoint.source import TensorSource
from minisail.errors import CheckpointError
from minisail.fast.int8 import Int8Linear, quantize_rows


def int8_linear_names(model: nn.Module, keymap: KeyMap, tensors: TensorSource, quantize, *, bnb: bool) -> list[str]:
    """The nn.Linear modules to build as Int8Linear: those whose official weights are all stored as bitsandbytes
    int8 (`.SCB` present); with quantize="int8" every Linear inside the decoder layers, and with quantize="int8" or
    "int4" the output head (`head_quantized`).

    `bnb`: config.json has a quantization_config, so the checkpoint must hold int8 weights."""
    to_quantize = set()
    if quantize == "int8":
        to_quantize = {id(m) for m in model.language_model.layers.modules() if isinstance(m, nn.Linear)}
    if head_quantized(quantize):
        to_quantize.add(id(model.language_model.lm_head))
    names, any_stored = [], False
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        try:
            _rule, sources, _tied = keymap.resolve(f"{name}.weight")
        except KeyError:
            continue  # the loader reports it
        stored = [bnb_scale_key(source) in tensors for source in sources]
        any_stored = any_stored or any(stored)
        if all(stored) or id(module) in to_quantize:
            names.append(name)
        elif any(stored):
            kinds = ", ".join(f"{s!r} {'int8' if k else 'float'}" for s, k in zip(sources, stored, strict=True))
            raise CheckpointError(
                f"{tensors.description}: {name} fuses official weights stored partly as bitsandbytes int8 and partly "
                f"as float ({kinds}); load with quantize='int8' to quantise the float ones as well"
            )
    if bnb and not any_stored:
        raise CheckpointError(
            f"{tensors.description}: config.json has a bitsandbytes quantization_config, but no weight has the "
            "`.SCB` scale an int8 weight needs: the files are not the quantised checkpoint the config describes"
        )
    return names


def head_quantized(quantize) -> bool:
    """Is the output head int8 for this `quantize`? Yes for "int8" and for "int4".

    The head is streamed whole at every decode step like a decoder Linear (SAIL-VL-2B: 151936 x 1536, 15% of the
    bf16 bytes a step reads, 39% once the layers are int4), so leaving it float would cap what quantising buys.
    Row-wise int8 keeps each logit's own row to 8 bits: with int4 layers it stays int8, the precision rule llama.cpp's
    own quantizer follows for a Q4_0 model (a 6-bit head). The embedding stays float: a step reads only its row."""
    return quantize in ("int8", "int4")


class Int8Weights(LoadHook):
    """Loader hook: reads each Int8Linear's weight and scale together (stored int8, or quantised as read)."""

    def prepare(self, model: nn.Module, tensors: TensorSource) -> None:
        self.modules = {name for name, module in model.named_modules() if isinstance(module, Int8Linear)}
        self.tensors, self.where = tensors, tensors.description
        self.scales: dict[str, list[str]] = {}  # scale parameter -> the weights it was read with

    def parts(self, name: str, slot: torch.Tensor, rule: Rule, sources: list[str], tensors: TensorSource):
        module, _, leaf = name.rpartition(".")
        if module not in self.modules or leaf != "weight":
            return None
        weights, absmaxes, used, views = [], [], [], rule.join.is_identity
        for source in sources:
            scb = bnb_scale_key(source)
            if scb in tensors:  # stored int8 by bitsandbytes
                weight, absmax = self._stored_int8(source, scb, zero_copy=rule.join.is_identity)
                used.append(scb)
                if bnb_format_key(source) in tensors:
                    self._check_row_major(bnb_format_key(source))
                    used.append(bnb_format_key(source))
            elif tensors.dtype(source).is_floating_point:  # a float checkpoint, quantised as it is read
                weight, absmax = quantize_rows(tensors.view(source))
                tensors.release(source)
                views = False
            else:
                raise CheckpointError(
                    f"{self.where}: tensor {source!r} is {tensors.dtype(source)} without its bitsandbytes scale "
                    f"{scb!r}: the checkpoint is incomplete"
                )
            weights.append(weight)
            absmaxes.append(absmax)
        scale = f"{module}.scale"
        self.scales[scale] = sources
        shape = tuple(slot.shape)
        return [
            Parts(name, sources, weights, shape, torch.int8, views=views, cast=False, also_used=used),
            Parts(scale, [bnb_scale_key(s) for s in sources], absmaxes, shape[:1], torch.float32, False, False),
        ]

    def convert(self, parts: Parts, value: torch.Tensor) -> torch.Tensor:
        if parts.name not in self.scales:
            return value
        if not bool(torch.isfinite(value).all()):
            raise CheckpointError(
                f"{self.where}: {self.scales[parts.name]} hold non-finite values (or scales): the checkpoint is corrupt"
            )
        return value / 127  # the joined row absmax -> the scale

    def _stored_int8(self, source: str, scb: str, zero_copy: bool):
        """A bitsandbytes int8 weight and its row absmax (SCB), with their dtypes and shapes checked."""
        tensors, where = self.tensors, self.where
        shape, scb_shape = list(tensors.shape(source)), list(tensors.shape(scb))
        if tensors.dtype(source) != torch.int8:
            raise CheckpointError(
                f"{where}: {scb!r} marks {source!r} as a bitsandbytes int8 weight, but it is stored as "
                f"{tensors.dtype(source)}: the checkpoint is inconsistent"
            )
        if len(shape) != 2 or scb_shape != shape[:1] or not tensors.dtype(scb).is_floating_point:
            raise CheckpointError(
                f"{where}: {scb!r} is {tensors.dtype(scb)} {scb_shape}, but the int8 weight {source!r} {shape} "
                f"needs one float scale per row ({shape[:1]}): the checkpoint is corrupt"
            )
        absmax = tensors.read(scb).float()
        if bool((absmax < 0).any()):
            raise CheckpointError(f"{where}: {scb!r} holds negative row maxima: the checkpoint is corrupt")
        return (tensors.view(source) if zero_copy else tensors.read(source)), absmax

    def _check_row_major(self, key: str) -> None:
        """bitsandbytes' weight_format: 0 row-major; 1-3 (col32, col_turing, col_ampere) are old GPU tile layouts."""
        value = self.tensors.read(key).reshape(-1)
        if value.numel() != 1 or int(value[0]) != 0:
            raise CheckpointError(
                f"{self.where}: {key!r} = {value.tolist()}: the int8 weight is stored in a bitsandbytes GPU tile "
                "layout (col32 / col_turing / col_ampere), which minisail does not read; re-save the model with a "
                "recent bitsandbytes, which writes row-major weights"
            )
