"""Inspecting the tiling: a picture of the tiles and a summary of what each model family receives.

Backs `python -m minisail tiles`. The picture shows the exact uint8 tiles the vision tower gets (from
`preprocess.internvl_tiles`), laid out in their grid with a gap between tiles, numbered in the order the
model sees them (row-major), with the thumbnail to the right; a caption line states the grid.

Token counts use the published configs, since no checkpoint is at hand here: the tiling families
have a patch-14 ViT and a 0.5 pixel shuffle, so one S px tile becomes tokens_per_tile(S, 14, 0.5) tokens
(256 at 448 px); Yi-VL pads to a square and always feeds one 448 px image, 32 x 32 = 1024 tokens, no tiling.
"""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from minisail.image.preprocess import Tiles
from minisail.merge import tokens_per_tile

TILED_FAMILIES = ("SAIL-VL-2B", "SAIL-VL2", "InternVL-Chat-V1-5", "Mono-InternVL-2B")
PATCH_SIZE = 14
DOWNSAMPLE_RATIO = 0.5
YIVL_IMAGE_SIZE = 448  # Yi-VL's CLIP position table is fixed at 448 px: 32 x 32 patches, not merged
YIVL_TOKENS = tokens_per_tile(YIVL_IMAGE_SIZE, PATCH_SIZE, 1.0)

BACKGROUND = (255, 255, 255)
LABEL_FILL = (0, 0, 0)
LABEL_TEXT = (255, 255, 255)


def summarize(tiles: Tiles) -> dict:
    """The tiling and the image tokens per family, as a JSON-ready dict."""
    cols, rows = tiles.grid
    image_size = tiles.image_size
    per_tile = tokens_per_tile(image_size, PATCH_SIZE, DOWNSAMPLE_RATIO)
    tokens = {family: per_tile * len(tiles.images) for family in TILED_FAMILIES}
    tokens["Yi-VL"] = YIVL_TOKENS
    return {
        "width": tiles.original_size[0],
        "height": tiles.original_size[1],
        "image_size": image_size,
        "cols": cols,
        "rows": rows,
        "blocks": cols * rows,
        "thumbnail": tiles.thumbnail,
        "num_tiles": len(tiles.images),
        "tokens_per_tile": per_tile,
        "image_tokens": tokens,
    }


def render_tiles(tiles: Tiles, *, gap: int | None = None) -> Image.Image:
    """A picture of the tiles in their grid, numbered row-major, with the thumbnail (if any) to the right."""
    cols, rows = tiles.grid
    size = tiles.image_size
    gap = max(4, size // 28) if gap is None else gap
    font = _font(max(10, size // 14))
    caption = _caption(tiles)
    caption_height = _text_size(font, caption)[1] + 2 * gap

    grid_width = cols * size + (cols - 1) * gap
    width = gap + grid_width + gap + ((3 * gap + size) if tiles.thumbnail else 0)
    width = max(width, _text_size(font, caption)[0] + 2 * gap)  # a 1 x 1 grid is narrower than its caption
    height = caption_height + rows * size + (rows - 1) * gap + gap
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, gap), caption, fill=LABEL_FILL, font=font)

    top = caption_height
    for index in range(cols * rows):
        row, col = divmod(index, cols)
        x, y = gap + col * (size + gap), top + row * (size + gap)
        canvas.paste(tiles.images[index], (x, y))
        _label(draw, (x, y), f"{index + 1}", font, gap)
    if tiles.thumbnail:
        x = gap + grid_width + 3 * gap
        canvas.paste(tiles.images[-1], (x, top))
        _label(draw, (x, top), f"{len(tiles.images)}: thumbnail", font, gap)
    return canvas


def _caption(tiles: Tiles) -> str:
    cols, rows = tiles.grid
    width, height = tiles.original_size
    size = tiles.image_size
    thumb = " + thumbnail" if tiles.thumbnail else ""
    count = len(tiles.images)
    return f"{width}x{height} -> {cols} x {rows} tiles of {size}px{thumb} = {count} image{'s' * (count != 1)}"


def _label(draw: ImageDraw.ImageDraw, corner: tuple[int, int], text: str, font, pad: int) -> None:
    """Text on a dark box in a tile's top-left corner, readable on any content."""
    x, y = corner
    w, h = _text_size(font, text)
    draw.rectangle((x, y, x + w + 2 * pad, y + h + 2 * pad), fill=LABEL_FILL)
    draw.text((x + pad, y + pad), text, fill=LABEL_TEXT, font=font)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _text_size(font, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom
