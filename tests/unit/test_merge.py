"""pixel_shuffle / pixel_unshuffle: InternVL's token merge, checked by filling tokens with their coordinates."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minisail.errors import ConfigError, MinisailError
from minisail.merge import pixel_shuffle, pixel_unshuffle, tokens_per_tile
from minisail.tiling import best_grid, num_tiles


def coordinate_tokens(n: int, side: int, c: int) -> torch.Tensor:
    """[n, side*side, c] where token t = r*side + q of image i holds channel k = i*1e6 + r*1e4 + q*1e2 + k."""
    i = torch.arange(n).view(n, 1, 1, 1)
    r = torch.arange(side).view(1, side, 1, 1)
    q = torch.arange(side).view(1, 1, side, 1)
    k = torch.arange(c).view(1, 1, 1, c)
    return (i * 10**6 + r * 10**4 + q * 10**2 + k).reshape(n, side * side, c).double()


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("side, c, k", [(32, 3, 2), (8, 2, 2), (8, 1, 4)])
def test_channel_and_token_order(version, side, c, k):
    x = coordinate_tokens(2, side, c)
    y = pixel_shuffle(x, version=version, scale=1 / k)
    blocks = side // k
    assert y.shape == (2, blocks * blocks, k * k * c)
    for i in range(2):
        for bi in range(blocks):
            for bj in range(blocks):
                token = bi * blocks + bj if version == "v2" else bj * blocks + bi
                for dy in range(k):
                    for dx in range(k):
                        for ch in range(c):
                            r, q = k * bi + dy, k * bj + dx
                            assert y[i, token, dy * k * c + dx * c + ch] == i * 10**6 + r * 10**4 + q * 10**2 + ch


def test_first_merged_token_at_448px():
    # [N, 1024, C] -> [N, 256, 4C]; token 0 = patches (0,0), (0,1), (1,0), (1,1); v2 token 1 is block (0,1)
    c = 5
    x = coordinate_tokens(1, 32, c)
    y = pixel_shuffle(x)
    patch = lambda r, q: x[0, r * 32 + q]  # noqa: E731
    assert torch.equal(y[0, 0], torch.cat([patch(0, 0), patch(0, 1), patch(1, 0), patch(1, 1)]))
    assert torch.equal(y[0, 1], torch.cat([patch(0, 2), patch(0, 3), patch(1, 2), patch(1, 3)]))
    v1 = pixel_shuffle(x, version="v1")
    assert torch.equal(v1[0, 1], torch.cat([patch(2, 0), patch(2, 1), patch(3, 0), patch(3, 1)]))


grids = st.tuples(st.integers(1, 3), st.integers(1, 12), st.integers(1, 6), st.sampled_from([2, 4]))


@given(grids, st.sampled_from(["v1", "v2"]))
def test_round_trip_and_shapes(grid, version):
    n, half, c, k = grid
    side = half * k
    x = torch.randn(n, side * side, c)
    y = pixel_shuffle(x, version=version, scale=1 / k)
    assert y.shape == (n, side * side // (k * k), c * k * k) and y.dtype == x.dtype
    assert torch.equal(pixel_unshuffle(y, version=version, scale=1 / k), x)


@given(grids)
def test_v1_is_v2_with_the_block_grid_transposed(grid):
    n, half, c, k = grid
    x = torch.randn(n, (half * k) ** 2, c)
    v1 = pixel_shuffle(x, version="v1", scale=1 / k).view(n, half, half, -1)
    v2 = pixel_shuffle(x, version="v2", scale=1 / k).view(n, half, half, -1)
    assert torch.equal(v1, v2.transpose(1, 2))


def test_scale_one_is_the_identity():
    x = torch.randn(2, 9, 4)
    assert torch.equal(pixel_shuffle(x, scale=1.0), x)


def test_keeps_dtype():
    x = torch.randn(1, 16, 8, dtype=torch.bfloat16)
    assert pixel_shuffle(x).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "args, expected",
    [((448, 14, 0.5), 256), ((224, 14, 0.5), 64), ((448, 14, 1.0), 1024), ((336, 14, 0.5), 144), ((448, 16, 0.5), 196)],
)
def test_tokens_per_tile(args, expected):
    assert tokens_per_tile(*args) == expected


@given(st.integers(1, 4000), st.integers(1, 4000), st.integers(1, 12))
def test_image_token_accounting(width, height, max_tiles):
    # the tokens an image costs = its tiles x tokens per tile = what pixel_shuffle hands the projector
    grid = best_grid(width, height, max_tiles=max_tiles)
    tiles = num_tiles(grid)
    vit_tokens = torch.zeros(tiles, (448 // 14) ** 2, 1)  # [tiles, 1024, C] after the CLS drop
    merged = pixel_shuffle(vit_tokens)
    assert merged.shape[0] * merged.shape[1] == tiles * tokens_per_tile(448, 14, 0.5)


@pytest.mark.parametrize(
    "shape, kwargs, message",
    [
        ((1, 27 * 27, 4), {}, "divisible by 2"),  # 378 px / 14: an odd grid
        ((1, 1000, 4), {}, "square"),
        ((1, 0, 4), {}, "square"),
        ((1024, 4), {}, r"\[N, L, C\]"),
        ((1, 64, 4), {"version": "v3"}, "version"),
        ((1, 64, 4), {"scale": 0.3}, "1/k"),
        ((1, 64, 4), {"scale": 0.0}, "1/k"),
        ((1, 64, 4), {"scale": 2.0}, "1/k"),
    ],
)
def test_bad_shapes_and_settings(shape, kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        pixel_shuffle(torch.zeros(shape), **kwargs)
    assert isinstance(info.value, MinisailError)


def test_bad_unshuffle_inputs():
    with pytest.raises(ConfigError, match="divisible by 4"):
        pixel_unshuffle(torch.zeros(1, 16, 6))
    with pytest.raises(ConfigError, match="square"):
        pixel_unshuffle(torch.zeros(1, 15, 8))
    with pytest.raises(ConfigError, match="version"):
        pixel_unshuffle(torch.zeros(1, 16, 8), version="v9")
    with pytest.raises(ConfigError):
        tokens_per_tile(0, 14, 0.5)
