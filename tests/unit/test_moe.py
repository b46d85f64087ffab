"""The visual-expert FFN (minisail/llm/moe.py) against upstream's dense blend, on random inputs.

Upstream (Mono-InternVL, no KV cache) computes `feed_forward(x) * (1 - m) + feed_forward_ve(x) * m` with the
0/1 mask m; minisail gathers each expert's rows instead. The two must agree for every mask: all text, all
visual, mixed, none at all, empty sequences, batches.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minisail.llm.moe import VisualExpertMLP

HIDDEN, INTER = 16, 24


def make_mlp(seed: int) -> VisualExpertMLP:
    torch.manual_seed(seed)
    mlp = VisualExpertMLP(HIDDEN, INTER)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return mlp


def dense_blend(mlp: VisualExpertMLP, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Upstream's no-cache formula: both experts on every token, blended by the 0/1 mask."""
    m = mask.to(x.dtype)[..., None]  # [B, T, 1]
    return mlp.text(x) * (1.0 - m) + mlp.visual(x) * m


masks = st.sampled_from(["random", "all_text", "all_visual"])


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 4),
    length=st.integers(0, 12),
    kind=masks,
    seed=st.integers(0, 2**16),
)
def test_routing_matches_the_dense_blend(batch, length, kind, seed):
    mlp = make_mlp(seed % 7)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, HIDDEN, generator=g)
    if kind == "random":
        mask = torch.rand(batch, length, generator=g) < 0.5
    else:
        mask = torch.full((batch, length), kind == "all_visual")
    with torch.no_grad():
        got = mlp(x, mask)
        want = dense_blend(mlp, x, mask)
    assert got.shape == x.shape
    # Not bit-exact: a GEMM over a subset of rows may block its sums differently (float32 ulps; outputs reach ~20).
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_no_mask_means_every_token_is_text():
    mlp = make_mlp(1)
    x = torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x, None), mlp.text(x), atol=0, rtol=0)
        torch.testing.assert_close(mlp(x, torch.zeros(2, 5, dtype=torch.bool)), mlp.text(x), atol=0, rtol=0)


def test_each_token_goes_through_one_expert_only():
    """The gather form runs each expert on its own rows: never both experts on every token."""
    mlp = make_mlp(2)
    seen = {"text": 0, "visual": 0}
    mlp.text.register_forward_hook(lambda m, inp, out: seen.__setitem__("text", seen["text"] + inp[0].shape[0]))
    mlp.visual.register_forward_hook(lambda m, inp, out: seen.__setitem__("visual", seen["visual"] + inp[0].shape[0]))
    mask = torch.tensor([[True, False, False, True, True], [False, False, True, False, False]])
    with torch.no_grad():
        mlp(torch.randn(2, 5, HIDDEN), mask)
    assert seen == {"text": 6, "visual": 4}


def test_the_other_expert_cannot_leak_non_finite_values():
    """Where the blend multiplies an overflowing expert by 0 (inf * 0 = NaN), routing never computes it."""
    mlp = make_mlp(3)
    with torch.no_grad():
        mlp.visual.down.weight.fill_(float("inf"))
        x = torch.randn(1, 4, HIDDEN)
        mask = torch.tensor([[False, True, False, False]])
        routed = mlp(x, mask)
        blended = dense_blend(mlp, x, mask)
    text_rows = ~mask[0]
    assert torch.isfinite(routed[0, text_rows]).all()
    assert torch.isnan(blended[0, text_rows]).any()  # the multiply form is poisoned there


def test_bfloat16_rows_match_their_own_expert():
    mlp = make_mlp(4).to(torch.bfloat16)
    x = torch.randn(3, 7, HIDDEN, dtype=torch.bfloat16)
    mask = torch.rand(3, 7) < 0.4
    with torch.no_grad():
        got = mlp(x, mask)
        torch.testing.assert_close(got[mask], mlp.visual(x[mask]), atol=0, rtol=0)
        torch.testing.assert_close(got[~mask], mlp.text(x[~mask]), atol=0, rtol=0)


def test_a_mask_of_the_wrong_shape_is_refused():
    mlp = make_mlp(5)
    with pytest.raises(ValueError, match="visual_mask"):
        mlp(torch.randn(2, 5, HIDDEN), torch.zeros(2, 4, dtype=torch.bool))
