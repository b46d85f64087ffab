"""Image -> pixel_values: opening the file safely as RGB, then InternVL's dynamic tiling policy or Yi-VL's
pad-to-square policy.

Opening (`open_image`) mirrors the first step of every pipeline minisail reproduces: `Image.open(path)
.convert('RGB')` in the InternVL model cards' `load_image` (SAIL-VL-2B, InternVL-Chat-V1-5, Mono-InternVL-2B) and in
transformers' CLIPImageProcessor (Yi-VL). The format is sniffed from the content (a PNG named .jpg opens as a
PNG); alpha is dropped without compositing; the ICC profile and the EXIF orientation are ignored, as upstream.

What minisail adds is failing clearly: a missing, empty, non-image, truncated or oversized file (PIL's
decompression-bomb warning is turned into an error) and a 0-pixel image raise `ImageError`. A PIL image
passed in directly gets the same size check as a file: more than `PIL.Image.MAX_IMAGE_PIXELS` pixels
(89.5M by default, ~270 MB as RGB) is refused before it is converted.

One deliberate difference: 16-bit greyscale (modes I;16, I;16L, I;16B, I;16N) keeps its top 8 bits. Pillow's
own I;16 -> RGB conversion clips every value above 255 to white, which turns a normal 16-bit PNG into a
blank page; Pillow already reads 16-bit colour and grey+alpha PNGs by keeping the high byte, so this makes
16-bit grey agree with them. Every other mode (RGB, RGBA, LA, P, L, 1, CMYK, YCbCr, I, F, ...) goes through
`convert('RGB')` unchanged and matches upstream bit for bit.

InternVL policy (SAIL-VL-2B, SAIL-VL2, InternVL-Chat-V1-5, Mono-InternVL-2B) mirrors the model cards'
`load_image` = `dynamic_preprocess` (OpenGVLab/InternVL `internvl_chat/internvl/train/dataset.py`) +
`build_transform`:
    RGB image -> grid = tiling.best_grid -> resize to (S*cols, S*rows), PIL BICUBIC -> crop S x S tiles
    row-major -> + whole image resized to (S, S) last if more than one tile -> float32(u) / 255
    -> (x - ImageNet mean) / std in float32                               -> pixel_values [N, 3, S, S]
torchvision's per-tile `Resize((S, S))` is skipped: the tiles are already S x S and it returns them unchanged.

Yi-VL policy mirrors 01-ai/Yi `VL/single_inference.py` (`expand2square` from `VL/llava/mm_utils.py`, then
transformers' `CLIPImageProcessor`):
    pad to a square with the CLIP-mean colour (122, 116, 104), original centred (floor division) -> resize
    to (S, S), PIL BICUBIC (shortest edge S of a square; the centre crop is then a no-op) -> u * (1/255) in
    float64, then float32 -> (x - CLIP mean) / std in float32                -> pixel_values [1, 3, S, S]
Upstream pads the file in its own mode; minisail converts to RGB first (`open_image`). For RGB and RGBA files
the two are identical (an unmasked paste copies the channels, and RGBA -> RGB only drops alpha). Other modes
go wrong upstream and are not copied: L, LA and I;16 raise TypeError in Image.new, a P image's indices are
pasted into a canvas with another palette, and a CMYK canvas of (122, 116, 104) is black in RGB.

Memory is bounded before anything large is allocated (ImageError otherwise, saying what to lower): every
intermediate image (InternVL's resized S*cols x S*rows image, Yi-VL's padded square) has at most
`PIL.Image.MAX_IMAGE_PIXELS` pixels, as a file must (`open_image`), and pixel_values at most
MAX_PIXEL_VALUES_BYTES of float32. A 1 x 40000 strip would otherwise become a 40000 x 40000 Yi-VL canvas
(4.8 GB), and max_tiles=1024 at 448 px a 2.5 GB pixel_values.

Both reproduce tests/data/preprocess/preprocess_cases.json bit for bit (uint8 tiles and float32 values)
with Pillow 13.0.0; another Pillow or libjpeg-turbo may decode or resample differently.

"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from minisail import tiling
from minisail.errors import ImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Yi-VL pads with tuple(int(x * 255) for x in image_mean): truncation, not rounding.
YIVL_BACKGROUND = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104)

# float32 pixel_values of one image, at most: 1 GiB is ~1300 tiles of 448 px (upstream uses 6..40 tiles).
MAX_PIXEL_VALUES_BYTES = 1 << 30
BICUBIC = Image.Resampling.BICUBIC  # Pillow's default for resize(), named here so the choice is visible

ImageSource = str | os.PathLike | Image.Image
SIXTEEN_BIT_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def open_image(source: str | os.PathLike | Image.Image) -> Image.Image:
    """Return `source` (a path or a PIL image) as a fully loaded RGB `PIL.Image`.

    A path is decoded here; a PIL image is converted (never modified in place).
    Raises ImageError for anything that is not a readable, non-empty image.
    """
    if isinstance(source, Image.Image):
        check_pixels(source.size, "the image passed in")
        return to_rgb(source)
    if not isinstance(source, (str, os.PathLike)):
        raise ImageError(f"expected an image path or a PIL.Image, got {type(source).__name__}")
    path = os.fspath(source)
    if not os.path.exists(path):
        raise ImageError(f"image file not found: {path}")
    if os.path.isdir(path):
        raise ImageError(f"expected an image file, got a directory: {path}")
    if os.path.getsize(path) == 0:
        raise ImageError(f"image file is empty (0 bytes): {path}")
    try:
        with warnings.catch_warnings():
            # Between 1x and 2x Image.MAX_IMAGE_PIXELS PIL only warns; treat both levels as refusal.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()  # decode now, inside the try: truncation only shows up here
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(
            f"image is too large to open safely: {path} ({error}). Downscale it, or raise "
            "PIL.Image.MAX_IMAGE_PIXELS if you trust the file"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(f"not an image file Pillow can read: {path}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        # Pillow reports truncated and corrupt data as OSError ("image file is truncated"), SyntaxError
        # (broken PNG chunks) or ValueError/EOFError, depending on the decoder.
        raise ImageError(f"cannot decode image {path}: the file is truncated or corrupt ({error})") from None
    return to_rgb(image)


def max_pixels() -> int | None:
    """The most pixels any image minisail opens or builds may have: Pillow's decompression-bomb limit, read
    at call time so that raising `PIL.Image.MAX_IMAGE_PIXELS` (for a trusted file) raises it here too."""
    return Image.MAX_IMAGE_PIXELS


def check_pixels(size: tuple[int, int], what: str, advice: str = "crop or downscale it first") -> None:
    """Refuse a width x height image above `max_pixels()` before anything of that size is allocated."""
    width, height = size
    limit = max_pixels()
    if limit is not None and width * height > limit:
        raise ImageError(
            f"{what} would be {width}x{height} = {width * height} pixels, more than the {limit} an image may have "
            f"(PIL.Image.MAX_IMAGE_PIXELS): {advice}, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the input"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """`image.convert('RGB')`, except that 16-bit grey keeps its high byte (see the module docstring)."""
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if image.mode in SIXTEEN_BIT_GREY_MODES:
        values = np.asarray(image).astype(np.uint16)  # [H, W], native byte order whatever the mode's
        return Image.fromarray((values >> 8).astype(np.uint8)).convert("RGB")
    with warnings.catch_warnings():
        # Pillow suggests converting P images with byte transparency to RGBA; dropping it is what upstream does.
        warnings.filterwarnings("ignore", message="Palette images with Transparency", category=UserWarning)
        return image.convert("RGB")


@dataclass(frozen=True)
class Tiles:
    """What the vision tower sees for one picture, before normalisation."""

    images: list[Image.Image]  # N RGB images of S x S: grid tiles row-major, then the thumbnail if any
    grid: tuple[int, int]  # (cols, rows)
    thumbnail: bool  # whether images[-1] is the whole-image thumbnail
    original_size: tuple[int, int]  # (width, height) of the input
    image_size: int  # S, the tile side

    def uint8(self) -> torch.Tensor:
        """The tiles as one uint8 tensor [N, S, S, 3] (RGB, HWC), the layout the golden hashes use."""
        return torch.from_numpy(np.stack([np.asarray(tile) for tile in self.images]))


def internvl_tiles(
    image: ImageSource, *, min_tiles: int = 1, max_tiles: int = 12, image_size: int = 448, use_thumbnail: bool = True
) -> Tiles:
    """Cut an image into InternVL's dynamic tiles (+ thumbnail), as PIL images for inspection."""
    image = open_image(image)
    grid = tiling.best_grid(*image.size, min_tiles=min_tiles, max_tiles=max_tiles, image_size=image_size)
    target = tiling.resized_size(grid, image_size)  # (S*cols, S*rows)
    width, height = image.size
    what = f"tiling {width}x{height} into {grid[0]}x{grid[1]} tiles of {image_size}px needs an intermediate image that"
    check_pixels(target, what, "lower max_tiles or image_size")
    count = tiling.num_tiles(grid, use_thumbnail=use_thumbnail)
    check_pixel_values_bytes(count, image_size, "lower max_tiles or image_size")
    resized = image.resize(target, BICUBIC)
    tiles = [resized.crop(box) for box in tiling.tile_boxes(grid, image_size)]
    thumbnail = tiling.has_thumbnail(grid, use_thumbnail=use_thumbnail)
    if thumbnail:
        tiles.append(image.resize((image_size, image_size), BICUBIC))
    return Tiles(images=tiles, grid=grid, thumbnail=thumbnail, original_size=image.size, image_size=image_size)


def internvl_pixel_values(
    image: ImageSource, *, min_tiles: int = 1, max_tiles: int = 12, image_size: int = 448, use_thumbnail: bool = True
) -> torch.Tensor:
    """InternVL pixel_values, float32 [N, 3, S, S] with N = cols*rows (+1 thumbnail)."""
    tiles = internvl_tiles(
        image, min_tiles=min_tiles, max_tiles=max_tiles, image_size=image_size, use_thumbnail=use_thumbnail
    )
    x = tiles.uint8().permute(0, 3, 1, 2).to(torch.float32) / 255  # ToTensor: float32(u) / 255, [N, 3, S, S]
    return _normalize(x, IMAGENET_MEAN, IMAGENET_STD)


def yivl_padded(image: ImageSource) -> Image.Image:
    """Yi-VL's `expand2square`: the RGB image centred on a max(w, h) square of YIVL_BACKGROUND."""
    image = open_image(image)
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    check_pixels((side, side), f"Yi-VL's square padding of a {width}x{height} image", "crop it closer to a square")
    canvas = Image.new("RGB", (side, side), YIVL_BACKGROUND)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def yivl_tile(image: ImageSource, *, image_size: int = 448) -> Image.Image:
    """The single S x S RGB image Yi-VL's CLIP tower sees (padded, then resized with PIL bicubic)."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 1 <= image_size <= tiling.MAX_TILE_SIZE:
        raise ImageError(f"image_size must be an integer between 1 and {tiling.MAX_TILE_SIZE}, got {image_size!r}")
    check_pixel_values_bytes(1, image_size, "lower image_size")
    padded = yivl_padded(image)
    # CLIPImageProcessor: shortest edge -> S (the image is square, so (S, S)), then centre crop S: a no-op.
    return padded.resize((image_size, image_size), BICUBIC)


def yivl_pixel_values(image: ImageSource, *, image_size: int = 448) -> torch.Tensor:
    """Yi-VL pixel_values, float32 [1, 3, S, S]."""
    u = torch.from_numpy(np.asarray(yivl_tile(image, image_size=image_size)).copy())  # [S, S, 3] uint8
    # transformers' rescale multiplies by 1/255 in float64 and only then casts, unlike InternVL's float32(u)/255
    # (for uint8 input the two happen to round alike for all 256 values; tests/unit/test_preprocess.py checks it).
    x = (u.permute(2, 0, 1).to(torch.float64) * (1 / 255)).to(torch.float32)[None]  # [1, 3, S, S]
    return _normalize(x, CLIP_MEAN, CLIP_STD)


def check_pixel_values_bytes(count: int, image_size: int, advice: str) -> None:
    """Refuse pixel_values of `count` float32 images of S x S above MAX_PIXEL_VALUES_BYTES, before resizing."""
    size = count * 3 * image_size * image_size * 4  # [N, 3, S, S] float32
    if size > MAX_PIXEL_VALUES_BYTES:
        raise ImageError(
            f"{count} tiles of {image_size}px make {size / 2**30:.1f} GiB of float32 pixel_values, more than the "
            f"{MAX_PIXEL_VALUES_BYTES / 2**30:.0f} GiB minisail allows for one image: {advice}"
        )


def _normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(x - mean) / std per channel, all in float32 as torchvision and transformers do it. x: [N, 3, S, S]."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean_t) / std_t
