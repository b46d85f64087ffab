"""Absurd and hostile inputs: each ends quickly in a minisail error naming the value, never in a crash,
a hang or a huge allocation (issue: "Runs on every CPU, and refuses every bad input").

One section per class of input: images, tokenizer files, prompts and streaming, generation lengths, the CLI.
"""

from __future__ import annotations

import pytest
from PIL import Image

from minisail.errors import ImageError
from minisail.image import internvl_pixel_values, internvl_tiles, open_image, yivl_pixel_values
from minisail.image.preprocess import MAX_PIXEL_VALUES_BYTES, check_pixel_values_bytes

# --- images -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1, 40000), (40000, 1), (100, 40000)])
def test_thin_image_is_not_padded_to_a_huge_square(size):
    with pytest.raises(ImageError, match=f"{size[0]}x{size[1]}.*crop it closer to a square"):
        yivl_pixel_values(Image.new("RGB", size))


def test_thin_image_with_many_tiles_is_refused_before_resizing():
    with pytest.raises(ImageError, match="1x40000 into 1x1024 tiles.*lower max_tiles"):
        internvl_pixel_values(Image.new("RGB", (1, 40000)), max_tiles=1024)


@pytest.mark.parametrize(
    "kwargs", [dict(min_tiles=1024, max_tiles=1024), dict(max_tiles=2, min_tiles=2, image_size=8192)]
)
def test_flags_at_their_maxima_are_refused(kwargs):
    with pytest.raises(ImageError, match="lower max_tiles or image_size"):
        internvl_tiles(Image.new("RGB", (448, 448)), **kwargs)


def test_pixel_values_byte_bound():
    check_pixel_values_bytes(12 + 1, 448, "x")  # the usual 12 tiles and a thumbnail
    with pytest.raises(ImageError, match=r"1025 tiles of 448px make 2\.3 GiB.*lower max_tiles"):
        check_pixel_values_bytes(1025, 448, "lower max_tiles")
    assert MAX_PIXEL_VALUES_BYTES == 1 << 30


def test_in_memory_image_gets_the_bomb_check(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageError, match="11x10 = 110 pixels.*MAX_IMAGE_PIXELS"):
        open_image(Image.new("RGB", (11, 10)))
    assert open_image(Image.new("RGB", (10, 10))).size == (10, 10)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # disabled by the user: trusted input
    assert open_image(Image.new("RGB", (11, 10))).size == (11, 10)


def test_normal_images_still_pass():
    assert internvl_pixel_values(Image.new("RGB", (1, 40000)), max_tiles=12).shape == (13, 3, 448, 448)
    assert yivl_pixel_values(Image.new("RGB", (20, 3000))).shape == (1, 3, 448, 448)
