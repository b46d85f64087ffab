"""Opening an image file safely, as RGB.

Mirrors the first step of every pipeline minisail reproduces: `Image.open(path).convert('RGB')` in the
InternVL model cards' `load_image` (SAIL-VL-2B, InternVL-Chat-V1-5, Mono-InternVL-2B) and in
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
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from minisail.errors import ImageError

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
