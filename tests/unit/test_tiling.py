"""best_grid and the tile / thumbnail helpers against InternVL's dynamic_preprocess.

The golden table (tests/data/tiling/grid_cases.csv, 59,056 grids from upstream run verbatim) is checked in
full; property tests cover what the table cannot: optimality, bounds, exact cover by the tiles. An emulation of
CPython's set (below) is the oracle for the candidate order: it shows the order best_grid relies on is CPython's
hash-table layout, the same on every supported interpreter, not an accident of the one running the tests.
"""

import csv
import platform
import sys

import numpy as np
import pytest
from helpers import paths
from hypothesis import given
from hypothesis import strategies as st

from minisail.errors import ImageError, MinisailError
from minisail.tiling import (
    _candidates,
    best_grid,
    has_thumbnail,
    num_tiles,
    resized_size,
    tile_boxes,
)

GRID_CSV = paths.DATA / "tiling" / "grid_cases.csv"

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


cpython_64 = pytest.mark.skipif(
    platform.python_implementation() != "CPython" or sys.maxsize != 2**63 - 1,
    reason="compares with this interpreter's own set order (CPython, 64-bit)",
)


@cpython_64
def test_candidate_order_matches_this_interpreters_set():
    assert all(_tuple_hash((i, j)) == hash((i, j)) % 2**64 for i in range(60) for j in range(60))
    for lo in range(1, 25):
        for hi in range(1, 25):
            upstream = {
                (i, j) for n in range(lo, hi + 1) for i in range(1, n + 1) for j in range(1, n + 1) if lo <= i * j <= hi
            }
            assert list(_candidates(lo, hi)) == sorted(upstream, key=lambda g: g[0] * g[1]), (lo, hi)


@cpython_64
@pytest.mark.parametrize("lo, hi", [(lo, hi) for lo in range(1, 13) for hi in range(lo, 41)] + [(1, 128), (7, 1024)])
def test_candidate_order_is_the_emulated_cpython_set_order(lo, hi):
    # The grids in the order upstream's loops first meet them (a repeat leaves a set unchanged), fed to the emulation.
    first_seen = dict.fromkeys(
        (i, j) for n in range(lo, hi + 1) for i in range(1, n + 1) for j in range(1, min(n, hi // i) + 1) if lo <= i * j
    )
    assert _candidates(lo, hi) == tuple(sorted(_cpython_set_order(list(first_seen)), key=lambda g: g[0] * g[1]))


# --- CPython's set, emulated: the oracle for the candidate order ---------------------------------------------------
# CPython (3.8+, 64-bit) hashes a tuple with an xxHash-like mix of its items' hashes; a small int hashes to itself.
# Constants from Objects/tupleobject.c.
_XXPRIME_1 = 11400714785074694791
_XXPRIME_2 = 14029467366897019727
_XXPRIME_5 = 2870177450012600261
_U64 = (1 << 64) - 1


def _tuple_hash(items: tuple[int, ...]) -> int:
    """hash(items) for a tuple of small non-negative ints, as unsigned 64-bit (what the set table uses)."""
    acc = _XXPRIME_5
    for lane in items:
        acc = (acc + lane * _XXPRIME_2) & _U64
        acc = ((acc << 31) | (acc >> 33)) & _U64  # rotate left by 31
        acc = (acc * _XXPRIME_1) & _U64
    acc = (acc + (len(items) ^ (_XXPRIME_5 ^ 3527539))) & _U64
    return 1546275796 if acc == _U64 else acc  # -1 is reserved for errors in C


def _cpython_set_order(keys: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Iteration order of a CPython set built by adding `keys` (distinct) one by one.

    Objects/setobject.c: open addressing over a power-of-two table (8 slots to start); a key goes to slot
    hash & mask, else the next 9 slots (linear probing, if they fit before the end), else the slot
    (i*5 + 1 + perturb) & mask with perturb = hash >> 5, >> 10, ...; once the fill reaches 3/5 of the mask the
    table grows to the smallest power of two above 4x the number of keys and the old slots are re-inserted
    in slot order. Iteration walks the slots in order.
    """
    table: list[tuple[int, int] | None] = [None] * 8
    used = 0
    for key in keys:
        _insert(table, key, _tuple_hash(key))
        used += 1
        mask = len(table) - 1
        if used * 5 >= mask * 3:  # no deletions, so fill == used
            size = 8
            while size <= used * 4:
                size <<= 1
            old, table = table, [None] * size
            for entry in old:
                if entry is not None:
                    _insert(table, entry, _tuple_hash(entry))
    return [key for key in table if key is not None]


def _insert(table: list, key: tuple[int, int], hash_: int) -> None:
    mask = len(table) - 1
    i, perturb = hash_ & mask, hash_
    while True:
        probes = 9 if i + 9 <= mask else 0  # LINEAR_PROBES
        for k in range(i, i + probes + 1):
            if table[k] is None:
                table[k] = key
                return
        perturb >>= 5  # PERTURB_SHIFT
        i = (i * 5 + 1 + perturb) & mask


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
        dict(width=np.bool_(True), height=10),
        dict(width=np.float64(10), height=10),
    ],
)
def test_nonsensical_requests_raise_image_error(kwargs):
    with pytest.raises(ImageError) as info:
        best_grid(**kwargs)
    assert isinstance(info.value, MinisailError) and "must be" in str(info.value)


def test_numpy_integers_are_integers():
    # sizes often come from arrays (image.shape, np.array(image).shape): NumPy's integer types are accepted
    grid = best_grid(np.int64(1000), np.int32(747), min_tiles=np.int64(1), max_tiles=np.uint8(6), image_size=448)
    assert grid == best_grid(1000, 747, max_tiles=6) and all(type(n) is int for n in grid)
