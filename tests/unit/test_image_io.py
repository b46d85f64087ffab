"""open_image: every mode to RGB as upstream's convert('RGB'), and a clear ImageError for every bad file."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from minisail.errors import ImageError, MinisailError
from minisail.image import open_image

rng = np.random.default_rng(0)
RGBA = Image.fromarray(rng.integers(0, 256, (12, 17, 4), dtype=np.uint8))


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, raw: bytes) -> bytes:
    """A minimal PNG written by hand (to get 16-bit and oversized headers Pillow will not write)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def png16(values: np.ndarray, colour_type: int) -> bytes:
    """values [H, W] (grey) or [H, W, 3] (RGB) as a 16-bit PNG."""
    big_endian = values.astype(">u2")
    height, width = big_endian.shape[:2]
    raw = b"".join(b"\x00" + row.tobytes() for row in big_endian)  # filter type 0 per row
    return png_bytes(width, height, 16, colour_type, raw)


@pytest.mark.filterwarnings("ignore:Palette images with Transparency")  # from the reference convert below
@pytest.mark.parametrize(
    "mode, fmt",
    [("RGB", "PNG"), ("RGBA", "PNG"), ("LA", "PNG"), ("L", "PNG"), ("1", "PNG"), ("P", "PNG"), ("P", "GIF"),
     ("CMYK", "JPEG"), ("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "TIFF"), ("RGBA", "WEBP")],
)  # fmt: skip
def test_modes_convert_like_upstream(tmp_path, mode, fmt):
    path = tmp_path / f"image.{fmt.lower()}"
    RGBA.convert(mode).save(path, format=fmt)
    with Image.open(path) as reference:
        expected = np.asarray(reference.convert("RGB"))  # upstream: Image.open(path).convert('RGB')
    image = open_image(path)
    assert image.mode == "RGB" and image.size == (17, 12)
    assert np.array_equal(np.asarray(image), expected)


def test_alpha_is_dropped_without_compositing(tmp_path):
    path = tmp_path / "transparent.png"
    Image.new("RGBA", (3, 3), (10, 20, 30, 0)).save(path)
    assert np.all(np.asarray(open_image(path)) == (10, 20, 30))
    palette = Image.new("P", (3, 3), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50])
    palette.info["transparency"] = 1
    assert np.all(np.asarray(open_image(palette)) == (200, 100, 50))


def test_format_is_sniffed_not_taken_from_the_name(tmp_path):
    path = tmp_path / "really_a_png.jpg"
    RGBA.save(path, format="PNG")
    assert np.array_equal(np.asarray(open_image(path)), np.asarray(RGBA.convert("RGB")))


def test_sixteen_bit_grey_keeps_the_high_byte(tmp_path):
    values = np.array([[0, 255, 256, 4095, 32768, 65535]], dtype=np.uint16)
    grey = tmp_path / "grey16.png"
    grey.write_bytes(png16(values, colour_type=0))
    with Image.open(grey) as raw:
        assert raw.mode == "I;16"
        clipped = np.asarray(raw.convert("RGB"))[0, :, 0]
    assert clipped.tolist() == [0, 255, 255, 255, 255, 255]  # Pillow's own conversion: everything >255 is white
    image = open_image(grey)
    assert np.asarray(image)[0, :, 0].tolist() == [0, 0, 1, 15, 128, 255]
    # ... which is exactly what Pillow makes of the same values stored as 16-bit colour
    colour = tmp_path / "rgb16.png"
    colour.write_bytes(png16(np.repeat(values[..., None], 3, axis=2), colour_type=2))
    assert np.array_equal(np.asarray(open_image(colour)), np.asarray(image))
    # and the in-memory I;16 variants (little/big endian) agree
    for mode_array in (values, values.astype(">u2")):
        assert np.array_equal(np.asarray(open_image(Image.fromarray(mode_array))), np.asarray(image))


def test_pil_input_is_converted_not_modified():
    source = RGBA.copy()
    image = open_image(source)
    assert source.mode == "RGBA" and image is not source
    assert np.array_equal(np.asarray(image), np.asarray(RGBA)[..., :3])


def bad_files(tmp_path):
    jpeg, png = io.BytesIO(), io.BytesIO()
    big = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    big.save(jpeg, format="JPEG")
    big.save(png, format="PNG")
    files = {
        "empty.jpg": b"",
        "text.png": b"this is not an image\n" * 10,
        "truncated.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
        "truncated.png": png.getvalue()[: len(png.getvalue()) // 2],
        "bomb.png": png_bytes(100_000, 100_000, 1, 0, b""),  # 10 Gpx header, a few bytes on disk
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path


@pytest.mark.parametrize(
    "name, message",
    [
        ("missing.jpg", "not found"),
        ("empty.jpg", "empty"),
        ("text.png", "not an image"),
        ("truncated.jpg", "truncated or corrupt"),
        ("truncated.png", "truncated or corrupt"),
        ("bomb.png", "too large"),
        (".", "directory"),
    ],
)
def test_bad_files_raise_image_error(tmp_path, name, message):
    folder = bad_files(tmp_path)
    with pytest.raises(ImageError, match=message) as info:
        open_image(folder / name)
    assert isinstance(info.value, MinisailError)
    assert info.value.__cause__ is None  # a clear message, not a chained PIL traceback


def test_decompression_bomb_warning_is_an_error(tmp_path, monkeypatch):
    path = tmp_path / "medium.png"
    Image.new("RGB", (12, 12)).save(path)  # 144 px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 144 is between 1x and 2x: PIL only warns
    with pytest.raises(ImageError, match="too large"):
        open_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # above 2x: PIL raises
    with pytest.raises(ImageError, match="too large"):
        open_image(path)


@pytest.mark.parametrize("size", [(0, 0), (0, 5), (5, 0)])
def test_zero_pixel_image(size):
    with pytest.raises(ImageError, match="no pixels"):
        open_image(Image.new("RGB", size))


def test_wrong_type():
    with pytest.raises(ImageError, match="path or a PIL.Image"):
        open_image(42)
