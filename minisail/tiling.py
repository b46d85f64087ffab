"""InternVL's dynamic tiling: which grid of square tiles an image is cut into.

Mirrors `find_closest_aspect_ratio` and `dynamic_preprocess` in OpenGVLab/InternVL
`internvl_chat/internvl/train/dataset.py` (the same functions are in the `load_image` recipe of the
SAIL-VL-2B, InternVL-Chat-V1-5 and Mono-InternVL-2B model cards). `best_grid` is the single place the grid is
decided; `image/preprocess.py` and the CLI only follow its answer.

The decision, reproduced exactly (checked against 59,056 upstream grids in tests/data/tiling/):
- candidates are all grids (cols, rows) with min_tiles <= cols*rows <= max_tiles;
- they are visited in ascending cols*rows; grids with the same count keep the order in which CPython iterates
  the `set` upstream builds them in (minisail builds the same set, see `_candidates`);
- the grid whose aspect cols/rows is closest to width/height wins, distances compared as IEEE doubles;
- on an exact tie (`==`) a later candidate replaces the current best only if the image area is strictly
  larger than half the candidate's pixel area, 0.5 * S^2 * cols * rows (larger images prefer more tiles);
- min_tiles > max_tiles leaves no candidate and upstream falls back to 1x1 (and so to no thumbnail).

After the grid: the image is resized to (S*cols, S*rows) and cut into cols*rows tiles of S x S, row-major;
if there is more than one tile (and the thumbnail is on), the whole image resized to S x S is appended last.
"""

from __future__ import annotations

import functools
import numbers

from minisail.errors import ImageError

# Sanity bounds: anything beyond them is a mistake, not a request (upstream uses max 6..40 tiles of 448 px).
MAX_TILES_LIMIT = 1024
MAX_SIDE = 1 << 20  # pixels per side of the input; PIL's decompression-bomb limit stops real files far earlier
MAX_TILE_SIZE = 8192

Grid = tuple[int, int]  # (cols, rows): cols tiles across, rows tiles down
Box = tuple[int, int, int, int]  # (left, top, right, bottom) in the resized image, PIL crop convention


def best_grid(width: int, height: int, *, min_tiles: int = 1, max_tiles: int = 12, image_size: int = 448) -> Grid:
    """The (cols, rows) grid InternVL's `dynamic_preprocess` picks for a width x height image.

    Raises ImageError for sizes or bounds that are not positive integers or are absurdly large.
    min_tiles > max_tiles is allowed and gives (1, 1), as upstream.
    """
    width, height = _check_int("width", width, 1, MAX_SIDE), _check_int("height", height, 1, MAX_SIDE)
    min_tiles, max_tiles, image_size = _check_tile_bounds(min_tiles, max_tiles, image_size)
    aspect = width / height  # a Python float, as upstream: the comparisons below are in IEEE doubles
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in _candidates(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)  # a tie goes to the later (more tiles) grid only for a large enough image
    return best


def has_thumbnail(grid: Grid, *, use_thumbnail: bool = True) -> bool:
    """Whether a whole-image thumbnail is appended after the tiles (upstream: more than one tile)."""
    return bool(use_thumbnail) and grid[0] * grid[1] != 1


def num_tiles(grid: Grid, *, use_thumbnail: bool = True) -> int:
    """Images the vision tower sees for one picture: the grid tiles plus the thumbnail if any."""
    return grid[0] * grid[1] + has_thumbnail(grid, use_thumbnail=use_thumbnail)


def resized_size(grid: Grid, image_size: int = 448) -> tuple[int, int]:
    """(width, height) the image is resized to before cutting: exactly cols x rows tiles."""
    return image_size * grid[0], image_size * grid[1]


def tile_boxes(grid: Grid, image_size: int = 448) -> list[Box]:
    """Crop boxes of the tiles in the resized image, row-major (left to right, then top to bottom)."""
    cols, rows = grid
    s = image_size
    return [(c * s, r * s, (c + 1) * s, (r + 1) * s) for r in range(rows) for c in range(cols)]


# --------------------------------------------------------------------------------------------------------
# Candidate order
# --------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _candidates(min_tiles: int, max_tiles: int) -> tuple[Grid, ...]:
    """Every grid with min_tiles <= cols*rows <= max_tiles in upstream's visiting order: upstream's own `set`.

    Upstream builds `{(i, j) for n in range(min, max+1) for i in 1..n for j in 1..n if min <= i*j <= max}` and
    stably sorts it by i*j, so grids with equal i*j keep the set's iteration order. That order decides the answer
    when two equal-count grids tie (with min 2, max 2 and w/h = 5/4, (1,2) is visited before (2,1)), so minisail
    builds the same set. Its order comes from CPython's hash table: small ints hash to themselves, and tuple
    hashing and the set's layout are the same on every supported CPython (64-bit, 3.8 and later), so the order is
    too. tests/unit/test_tiling.py pins it twice: 59,056 golden grids recorded from upstream, and an emulation of
    CPython's set (tuple hash, probing, resizes) compared with this set for a range of bounds.
    """
    # Upstream's loops meet grid (i, j) first at n = max(min, i, j), within one n in (i, j) order, and adding a
    # grid the set already holds changes nothing. So adding the distinct grids in that order builds the very same
    # set (same table, same iteration order) without upstream's ~max^3 / 3 steps (10^8 at MAX_TILES_LIMIT).
    first_seen = [(i, j) for i in range(1, max_tiles + 1) for j in range(1, max_tiles // i + 1) if i * j >= min_tiles]
    first_seen.sort(key=lambda g: (max(min_tiles, *g), g))
    grids = set(first_seen)  # a set, as upstream's: its iteration order is the point
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))  # sorted() is stable: equal counts keep the set order


# --------------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------------


def _check_int(name: str, value: object, low: int, high: int) -> int:
    """`value` as a Python int: any integer type (NumPy's too), not a bool, between low and high."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ImageError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ImageError(f"{name} must be between {low} and {high}, got {value}")
    return int(value)


def _check_tile_bounds(min_tiles: int, max_tiles: int, image_size: int) -> tuple[int, int, int]:
    return (
        _check_int("min_tiles", min_tiles, 1, MAX_TILES_LIMIT),
        _check_int("max_tiles", max_tiles, 1, MAX_TILES_LIMIT),
        _check_int("image_size", image_size, 1, MAX_TILE_SIZE),
    )
