"""InternVL's dynamic tiling: which grid of square tiles an image is cut into.

Mirrors `find_closest_aspect_ratio` and `dynamic_preprocess` in OpenGVLab/InternVL
`internvl_chat/internvl/train/dataset.py` (the same functions are in the `load_image` recipe of the
SAIL-VL-2B, InternVL-Chat-V1-5 and Mono-InternVL-2B model cards). `best_grid` is the single place the grid is
decided; `image/preprocess.py` and the CLI only follow its answer.

The decision, reproduced exactly (checked against 59,056 upstream grids in tests/data/tiling/):
- candidates are all grids (cols, rows) with min_tiles <= cols*rows <= max_tiles;
- they are visited in ascending cols*rows; grids with the same count keep the order in which CPython iterates
  the `set` upstream builds them in (emulated below, so the answer does not depend on the interpreter);
- the grid whose aspect cols/rows is closest to width/height wins, distances compared as IEEE doubles;
- on an exact tie (`==`) a later candidate replaces the current best only if the image area is strictly
  larger than half the candidate's pixel area, 0.5 * S^2 * cols * rows (larger images prefer more tiles);
- min_tiles > max_tiles leaves no candidate and upstream falls back to 1x1 (and so to no thumbnail).

After the grid: the image is resized to (S*cols, S*rows) and cut into cols*rows tiles of S x S, row-major;
if there is more than one tile (and the thumbnail is on), the whole image resized to S x S is appended last.
"""

from __future__ import annotations

import functools

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
    _check_int("width", width, 1, MAX_SIDE)
    _check_int("height", height, 1, MAX_SIDE)
    _check_tile_bounds(min_tiles, max_tiles, image_size)
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
    """Every grid with min_tiles <= cols*rows <= max_tiles in upstream's visiting order.

    Upstream builds `{(i, j) for n in range(min, max+1) for i in 1..n for j in 1..n if min <= i*j <= max}`
    and stably sorts it by i*j, so grids with equal i*j keep the set's iteration order. That order decides
    the answer when two equal-count grids tie (with min 2, max 2 and w/h = 5/4, (1,2) is visited before
    (2,1)), so it is reproduced here rather than left to whatever `set` the running interpreter has.
    """
    # The set sees each grid first at n = max(min, i, j), and within one n in (i, j) order; later repeats
    # of a grid leave the table unchanged, so this is the insertion order that shapes the hash table.
    grids = [(i, j) for i in range(1, max_tiles + 1) for j in range(1, max_tiles // i + 1) if i * j >= min_tiles]
    grids.sort(key=lambda g: (max(min_tiles, *g), g))
    return tuple(sorted(_cpython_set_order(grids), key=lambda g: g[0] * g[1]))


# CPython (3.8+, 64-bit) hashes a tuple with an xxHash-like mix of its items' hashes; a small int hashes to
# itself. Constants from Objects/tupleobject.c.
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


def _cpython_set_order(keys: list[Grid]) -> list[Grid]:
    """Iteration order of a CPython set built by adding `keys` (distinct) one by one.

    Objects/setobject.c: open addressing over a power-of-two table (8 slots to start); a key goes to slot
    hash & mask, else the next 9 slots (linear probing, if they fit before the end), else the slot
    (i*5 + 1 + perturb) & mask with perturb = hash >> 5, >> 10, ...; once the fill reaches 3/5 of the mask the
    table grows to the smallest power of two above 4x the number of keys and the old slots are re-inserted
    in slot order. Iteration walks the slots in order.
    """
    table: list[Grid | None] = [None] * 8
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


def _insert(table: list[Grid | None], key: Grid, hash_: int) -> None:
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


# --------------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------------


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ImageError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ImageError(f"{name} must be between {low} and {high}, got {value}")


def _check_tile_bounds(min_tiles: int, max_tiles: int, image_size: int) -> None:
    _check_int("min_tiles", min_tiles, 1, MAX_TILES_LIMIT)
    _check_int("max_tiles", max_tiles, 1, MAX_TILES_LIMIT)
    _check_int("image_size", image_size, 1, MAX_TILE_SIZE)
