"""best_grid and the tile / thumbnail helpers against InternVL's dynamic_preprocess.

The golden table (tests/data/tiling/grid_cases.csv, 59,056 grids from upstream run verbatim) is checked in
full; property tests cover what the table cannot: optimality, bounds, exact cover by the tiles.
"""

import csv
import platform
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minisail.errors import ImageError, MinisailError
from minisail.tiling import (
    _candidates,
    _tuple_hash,
    best_grid,
    has_thumbnail,
    num_tiles,
    resized_size,
    tile_boxes,
)

GRID_CSV = Path(__file__).parent / "data" / "tiling" / "grid_cases.csv"

sides = st.integers(1, 8192)
bounds = st.tuples(st.integers(1, 40), st.integers(1, 40))
tile_sizes = st.sampled_from([448, 224, 112, 336, 14])


def test_every_golden_grid():
    with GRID_CSV.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 59_056
    wrong = []
    for row in rows:
        w, h, lo, hi, size = (int(row[k]) for k in ("width", "height", "min_num", "max_num", "image_size"))
        grid = best_grid(w, h, min_tiles=lo, max_tiles=hi, image_size=size)
        expected = (int(row["cols"]), int(row["rows"]))
        thumb = has_thumbnail(grid)
        if grid != expected or grid[0] * grid[1] != int(row["blocks"]) or thumb != (row["thumbnail_appended"] == "1"):
            wrong.append((w, h, lo, hi, size, grid, expected))
    assert not wrong, f"{len(wrong)} grids differ, first: {wrong[:5]}"


def test_double_precision_not_rationals():
    # 7/12 is the exact midpoint of 1/2 and 2/3 in rationals, but in doubles it is closer to 2/3.
    assert best_grid(7, 12, max_tiles=6) == (2, 3)


def test_equal_count_order_follows_the_upstream_set():
    # min 2, max 2, w/h = 5/4: (1,2) and (2,1) tie; (1,2) comes first, (2,1) wins only above the area threshold.
    threshold = 0.5 * 448 * 448 * 2
    assert 5 * 4 < threshold and best_grid(5, 4, min_tiles=2, max_tiles=2) == (1, 2)
    assert 500 * 400 < threshold and best_grid(500, 400, min_tiles=2, max_tiles=2) == (1, 2)
    assert 505 * 404 > threshold and best_grid(505, 404, min_tiles=2, max_tiles=2) == (2, 1)


def test_tie_break_is_strict():
    # w/h = 1 ties 1x1 and 2x2; 2x2 takes over only when the area is above 0.5 * 448^2 * 4 = 401408.
    assert best_grid(633, 633, max_tiles=4) == (1, 1)  # 400689
    assert best_grid(634, 634, max_tiles=4) == (2, 2)  # 401956
    # 4x9 ties 1x2 and 2x4 (the same aspect); its area 36 equals 0.5 * 3^2 * 8 exactly: not enough.
    assert best_grid(4, 9, max_tiles=8, image_size=3) == (1, 2)
    assert best_grid(4, 9, max_tiles=8, image_size=2) == (2, 4)  # 36 > 0.5 * 2^2 * 8 = 16


def test_min_above_max_falls_back_to_one_tile_without_thumbnail():
    assert best_grid(4000, 100, min_tiles=2, max_tiles=1) == (1, 1)
    assert not has_thumbnail((1, 1))
    assert num_tiles((1, 1)) == 1


@pytest.mark.skipif(
    platform.python_implementation() != "CPython" or sys.maxsize != 2**63 - 1,
    reason="compares with this interpreter's own set order (CPython, 64-bit)",
)
def test_candidate_order_matches_this_interpreters_set():
    assert all(_tuple_hash((i, j)) == hash((i, j)) % 2**64 for i in range(60) for j in range(60))
    for lo in range(1, 25):
        for hi in range(1, 25):
            upstream = {
                (i, j) for n in range(lo, hi + 1) for i in range(1, n + 1) for j in range(1, n + 1) if lo <= i * j <= hi
            }
            assert list(_candidates(lo, hi)) == sorted(upstream, key=lambda g: g[0] * g[1]), (lo, hi)


@given(sides, sides, bounds, tile_sizes)
def test_grid_is_within_bounds_and_optimal(width, height, lohi, size):
    lo, hi = sorted(lohi)
    cols, rows = best_grid(width, height, min_tiles=lo, max_tiles=hi, image_size=size)
    assert lo <= cols * rows <= hi
    best = abs(width / height - cols / rows)
    candidates = [(i, j) for i in range(1, hi + 1) for j in range(1, hi + 1) if lo <= i * j <= hi]
    assert all(abs(width / height - i / j) >= best for i, j in candidates)  # none strictly closer


@given(sides, sides, bounds)
def test_tie_goes_to_more_tiles_only_for_large_images(width, height, lohi):
    lo, hi = sorted(lohi)
    cols, rows = best_grid(width, height, min_tiles=lo, max_tiles=hi)
    best = abs(width / height - cols / rows)
    tied = [(i, j) for i, j in _candidates(lo, hi) if abs(width / height - i / j) == best]
    # The winner is the first tied grid, or a later one whose area threshold the image exceeds.
    assert (cols, rows) == tied[0] or width * height > 0.5 * 448 * 448 * cols * rows


@given(st.integers(1, 12), st.integers(1, 12), st.sampled_from([448, 224, 14, 1]))
def test_tiles_cover_the_resized_image_exactly_once(cols, rows, size):
    boxes = tile_boxes((cols, rows), size)
    width, height = resized_size((cols, rows), size)
    assert len(boxes) == cols * rows and (width, height) == (size * cols, size * rows)
    assert sum((right - left) * (bottom - top) for left, top, right, bottom in boxes) == width * height
    for left, top, right, bottom in boxes:
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        assert right - left == bottom - top == size
    # disjoint: distinct top-left corners on the size-aligned lattice, in row-major order
    corners = [(top // size, left // size) for left, top, _, _ in boxes]
    assert corners == sorted(set(corners))


@given(st.integers(1, 12), st.integers(1, 12), st.booleans())
def test_thumbnail_rule(cols, rows, use_thumbnail):
    expected = use_thumbnail and cols * rows != 1
    assert has_thumbnail((cols, rows), use_thumbnail=use_thumbnail) == expected
    assert num_tiles((cols, rows), use_thumbnail=use_thumbnail) == cols * rows + expected


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(width=0, height=10),
        dict(width=10, height=-3),
        dict(width=10.0, height=10),
        dict(width=True, height=10),
        dict(width=10, height=10**9),
        dict(width=10, height=10, min_tiles=0),
        dict(width=10, height=10, max_tiles=0),
        dict(width=10, height=10, max_tiles=-12),
        dict(width=10, height=10, max_tiles=10**6),
        dict(width=10, height=10, image_size=0),
        dict(width=10, height=10, image_size=10**6),
        dict(width=10, height=10, max_tiles="12"),
    ],
)
def test_nonsensical_requests_raise_image_error(kwargs):
    with pytest.raises(ImageError) as info:
        best_grid(**kwargs)
    assert isinstance(info.value, MinisailError) and "must be" in str(info.value)
