"""The CPU fast paths chosen for a loaded model, in one place (what `Session` and the benchmark both run).

Every path here keeps the numbers (or states its bound) and is chosen by what the running CPU proves it can do:

- bf16 where oneDNN runs bf16 natively (`packing_support()`, decided by trying):
  - on AMX, the language model's Linears run one-row products as `torch.mv` (fast/matvec.py: decode streams its
    weights faster there; each shape checked to give F.linear's bits), and stay plain for prefill;
  - every other bf16 Linear (vision tower, projector; the language model's too without AMX) is packed for oneDNN
    (fast/packing.py);
  - without AMX, the vision towers' attention runs its products as oneDNN's bf16 matrix products instead of SDPA's
    flash kernel (bf16 no faster than float32 there) (fast/vit_attention.py: not SDPA's bits; its error about 1.3x
    SDPA's, at most 2.5x).
- bf16 where it is not (e.g. AVX2): products of 8 rows or more in float32 from the bf16 weights (fast/upcast.py).
- the language model's int8 weights (Int8Linear, int4 models' int8 head included) on the CPU's integer dot
  products, the activations split exactly into digits (fast/int8_dot.py): oneDNN where the CPU has VNNI (3 bytes,
  float32's precision), fbgemm where it has not (AVX2: 3 digits of 7 bits); faster than int8pack at decode.
- int4 (Int4Linear) is torch's int4 kernel, chosen at load (fast/int4_checkpoint.py); that kernel has no AVX2 loop,
  which the reasons say where it matters (fast/int4.py `kernel_note`: int8 is the faster format there).
- any dtype, int8 and int4 included: the language model's weights move into transparent huge pages
  (fast/huge_pages.py), which a decode step streams faster.

`speed_up_on_cpu(model)` applies them to a model on the CPU and returns what it did, with each reason in words.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from minisail.fast import huge_pages
from minisail.fast.int4 import Int4Linear, kernel_note
from minisail.fast.int8 import Int8Linear
from minisail.fast.int8_dot import dot_int8_linears, dot_support
from minisail.fast.matvec import matvec_linears
from minisail.fast.packing import pack_linears, packing_support
from minisail.fast.upcast import upcast_linears
from minisail.fast.vit_attention import fast_attention_support, use_fast_vit_attention, vision_attentions


@dataclass
class CpuSpeedUps:
    """What `speed_up_on_cpu` did: counts of swapped Linears, bytes moved to huge pages, and why, in words."""

    packed: int = 0  # bf16 Linears packed for oneDNN (fast/packing.py)
    matvec: int = 0  # language-model Linears whose one-row products run torch.mv (fast/matvec.py)
    upcast: int = 0  # bf16 Linears computing 8+ rows in float32 (fast/upcast.py)
    vit_attention: int = 0  # vision attention modules on bf16 products (fast/vit_attention.py)
    int8_dot: int = 0  # Int8Linears on integer dot-product kernels, oneDNN or fbgemm (fast/int8_dot.py)
    huge_page_bytes: int = 0  # language-model weight bytes moved into huge-page memory (fast/huge_pages.py)
    reasons: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [
            f"{self.packed} Linears packed for oneDNN" if self.packed else "",
            f"{self.matvec} decode Linears on torch.mv" if self.matvec else "",
            f"{self.upcast} Linears computing prefill in float32" if self.upcast else "",
            f"{self.vit_attention} vision attentions on bf16 products" if self.vit_attention else "",
            f"{self.int8_dot} int8 Linears on int8 dot products" if self.int8_dot else "",
            f"{self.huge_page_bytes / 1e9:.2f} GB of weights in huge pages" if self.huge_page_bytes else "",
        ]
        return "; ".join(filter(None, parts)) or "no CPU fast path applies"


def has_bf16_linears(module: nn.Module) -> bool:
    return any(type(m) is nn.Linear and m.weight.dtype == torch.bfloat16 for m in module.modules())


def speed_up_on_cpu(model: nn.Module, *, move_to_huge_pages: bool = True) -> CpuSpeedUps:
    """Apply the CPU fast paths (module docstring) to `model`, a loaded minisail model on the CPU."""
    done = CpuSpeedUps()
    language_model = getattr(model, "language_model", None)
    # int8 first: each weight is briefly held twice while it is packed (the head: 0.23 GB for SAIL-VL-2B), so that
    # happens before the bf16 packing below makes the vision tower resident, not on top of it (a lower peak)
    decoding = language_model if language_model is not None else model  # the vision tower never decodes
    if any(type(m) is Int8Linear and m.weight.device.type == "cpu" for m in decoding.modules()):
        support = dot_support()
        done.reasons.append(support.reason)
        if support.available:
            done.int8_dot = dot_int8_linears(decoding)  # before huge pages: the packed copies replace the plain ones
    if any(type(m) is Int4Linear and m.kernel_layout for m in decoding.modules()):
        done.reasons.append(kernel_note())  # nothing to swap: the load hook chose the layout; how fast it is, said
    if has_bf16_linears(model):
        support = packing_support()
        done.reasons.append(support.reason)
        if support.available:
            if language_model is not None:
                done.matvec = matvec_linears(language_model)  # before packing: pack_linears skips what it swapped
            done.packed = pack_linears(model)
        else:
            done.upcast = upcast_linears(model)
    if vision_attentions(model) and any(p.dtype == torch.bfloat16 for p in model.parameters()):  # bf16 towers
        attention = fast_attention_support()
        done.reasons.append(attention.reason)
        if attention.available:
            done.vit_attention = use_fast_vit_attention(model)
    if move_to_huge_pages and language_model is not None:
        possible, why = huge_pages.huge_pages_support()
        done.reasons.append(why)
        if possible:
            done.huge_page_bytes = huge_pages.to_huge_pages(language_model)
    return done
