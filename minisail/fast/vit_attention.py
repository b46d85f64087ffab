"""CPU fast path for the vision towers' bf16 attention: its three products on oneDNN's bf16 matrix kernels.

A vision tower attends over every patch of a tile (1025 tokens for a 448px InternViT tile), so attention is about
half of its time on the CPU: `F.scaled_dot_product_attention` (SDPA) runs its flash kernel, which runs bf16 no
faster than float32 on a CPU without AMX (measured on a 2-core Zen 5 with AVX-512 BF16, one layer of 7 tiles x 16
heads x 1025 tokens x 64: 179 ms in bf16, 181 ms in float32, ~90 GFLOP/s, while oneDNN's bf16 products run
600-800 GFLOP/s on the same cores: its blocks are small and it works in float32 between its products). Here the
per-head products run in bf16 instead: softmax(q k^T * scale) v as bmm, softmax, bmm, a few heads at a time.

What a bf16 product costs is its output's rounding: q k^T rounded to bf16 is off by up to 2^-9 of each score, and
the softmax turns an absolute error in a score into a relative error in its weight, so a score of 30 rounded by
0.06 moves its weight by 6% (what a naive bf16 attention does: ~6x SDPA's error, measured). Softmax does not care
about a shift of a row, so each row is shifted by its maximum m *inside* the product, before the rounding: an extra
channel holds -m on the query side and 1 on the key side,

    s_ij = [q_i, -m_i] . [k_j, 1] = q_i . k_j - m_i     (float32 sums, then one rounding to bf16)

and a score is rounded relative to its distance from the row's maximum, which is small exactly for the keys that
carry the weight. m_i is the maximum of a first, plain bf16 q k^T (a bf16 number, so -m_i is exact in the extra
channel; within 2^-9 of the true maximum, which is all the shift needs). Then softmax in float32 (rounded to bf16
for the last product) and p v, summed in float32 and rounded once. A scale that is a power of two is folded into q
exactly; any other multiplies the shifted scores (small where it matters, so its rounding is too).

The numbers: not SDPA's bits. Against a float64 attention, over 800 random cases (flat to peaky scores, head
sizes 16-128, every kind of scale), its error was 1.1-2.0x SDPA's in root mean square (median 1.3x) and up to
2.3x at the worst element (median 1.5x); a naive bf16 attention is 5-6x in root mean square. The tests and the
probe hold it to RMS_BOUND and WORST_BOUND below (tests/unit/test_vit_attention.py). float32 never takes this path.

When: bf16 inputs on the CPU, where oneDNN runs bf16 natively (`packing_support()`, decided by trying), the CPU
has no AMX (there oneDNN, which SDPA's kernel may call for its products, has AMX tiles: not measured here, so left
to SDPA) and a probe attention comes out within those bounds, once per process. Swapped per module, like the Linears:
`use_fast_vit_attention(model)` sets the `attend` of every vision attention module (InternViT, SAIL-ViT, CLIP);
anything else (a float32 or non-CPU tensor) still goes to `vit_attention`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from minisail.fast.packing import amx_usable, packing_support
from minisail.layers import vit_attention

MAX_GROUP = 16  # heads per product at most: 3 x 16 x L x L bf16 temporaries (100 MB at L = 1025)


def max_shifted_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, scale: float | None = None
) -> torch.Tensor:
    """`vit_attention`'s contract (q, k, v [N, L, C] -> [N, L, C], heads the head_dim-wide slices of C), computed
    as the module docstring says for bf16 CPU tensors; anything else goes to `vit_attention` itself, and so does a
    call that autograd records (a gradient through the pixels, say): the products here write into buffers."""
    recorded = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    plain = q.dtype != torch.bfloat16 or q.device.type != "cpu" or q.numel() == 0
    if plain or recorded or torch.compiler.is_compiling():
        return vit_attention(q, k, v, num_heads, scale)
    N, L, C = q.shape
    D = C // num_heads
    scale = D**-0.5 if scale is None else scale
    q, k, v = (t.view(N, L, num_heads, D).transpose(1, 2).reshape(N * num_heads, L, D) for t in (q, k, v))
    if scale < 0:  # the shift needs the row's maximum of the scaled scores: negate q instead (exact)
        q, scale = -q, -scale
    folded = math.frexp(scale)[0] == 0.5  # a power of two: q * scale is exact in bf16
    if folded:
        q = q * scale
    heads = N * num_heads
    group = max(1, min(torch.get_num_threads(), heads, MAX_GROUP))  # heads per product: one per thread
    out = torch.empty(heads, L, D, dtype=q.dtype)  # [N * heads, L, D]
    q_shifted = torch.zeros(group, L, D + 1, dtype=q.dtype)  # [q, -m]
    k_shifted = torch.zeros(group, L, D + 1, dtype=q.dtype)  # [k, 1]
    k_shifted[..., D] = 1
    for first in range(0, heads, group):
        h = slice(first, min(first + group, heads))
        n = h.stop - h.start
        row_max = torch.bmm(q[h], k[h].transpose(1, 2)).amax(-1)  # [n, L] bf16: each row's maximum score
        q_shifted[:n, :, :D], q_shifted[:n, :, D] = q[h], -row_max
        k_shifted[:n, :, :D] = k[h]
        scores = torch.bmm(q_shifted[:n], k_shifted[:n].transpose(1, 2))  # [n, L, L]: q k^T - m, rounded once
        if not folded:
            scores.mul_(scale)
        torch.bmm(torch.softmax(scores, dim=-1), v[h], out=out[h])  # softmax in float32, rounded to bf16
    return out.view(N, num_heads, L, D).transpose(1, 2).reshape(N, L, C)  # heads back side by side


@dataclass(frozen=True)
class AttentionSupport:
    available: bool
    reason: str


RMS_BOUND, WORST_BOUND = 2.5, 3.0  # error at most these multiples of SDPA's own (measured: 2.0, 2.3; docstring)


def attention_errors(attend, q, k, v, num_heads: int, scale: float | None = None) -> tuple[float, float]:
    """(root mean square, worst) error of `attend` on bf16 q, k, v against vit_attention in float64."""
    exact = vit_attention(q.double(), k.double(), v.double(), num_heads, scale)
    error = attend(q, k, v, num_heads, scale).double() - exact
    return error.pow(2).mean().sqrt().item(), error.abs().max().item()


@functools.cache
def fast_attention_support() -> AttentionSupport:
    """Decided by trying (module docstring): native bf16 products, no AMX, and a probe within the error bounds."""
    packing = packing_support()
    if not packing.available:
        return AttentionSupport(False, "vision attention stays on SDPA: no native bf16 products (above)")
    if amx_usable():
        return AttentionSupport(False, "vision attention stays on SDPA: AMX here, which SDPA may use (unmeasured)")
    generator = torch.Generator().manual_seed(0)
    for head_dim in (64, 128):  # a scale folded into q (1/8), and one multiplied after the shift (128^-0.5)
        q, k, v = (torch.randn(2, 130, 4 * head_dim, generator=generator).mul(2).bfloat16() for _ in range(3))
        ours = attention_errors(max_shifted_attention, q, k, v, 4)
        sdpa = attention_errors(vit_attention, q, k, v, 4)
        if not (ours[0] <= RMS_BOUND * sdpa[0] and ours[1] <= WORST_BOUND * sdpa[1]):
            why = f"error {ours[0]:.2e} rms, {ours[1]:.2e} worst against SDPA's {sdpa[0]:.2e}, {sdpa[1]:.2e}"
            return AttentionSupport(False, f"vision attention stays on SDPA: bf16 products too far off here ({why})")
    return AttentionSupport(True, "vision attention in bf16 products, scores shifted by their row maximum")


def vision_attentions(model: nn.Module) -> list[nn.Module]:
    """The vision attention modules under `model`: those whose class has an `attend` (the towers' attention)."""
    return [module for module in model.modules() if getattr(type(module), "attend", None) is not None]


def use_fast_vit_attention(model: nn.Module) -> int:
    """Point the `attend` of every vision attention module under `model` to `max_shifted_attention`; return how
    many. Undone by `use_sdpa_vit_attention`."""
    modules = vision_attentions(model)
    for module in modules:
        module.attend = max_shifted_attention
    return len(modules)


def use_sdpa_vit_attention(model: nn.Module) -> None:
    for module in model.modules():
        if "attend" in vars(module):
            del module.attend  # the class's vit_attention again
