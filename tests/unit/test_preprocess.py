"""InternVL and Yi-VL preprocessing against every case of tests/data/preprocess/preprocess_cases.json.

Each case pins the decoded image, the uint8 tiles and the float32 pixel_values by sha256, so a difference
in decoding, tiling, resampling or normalisation shows up at the step where it happens.
"""

import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import paths
from PIL import Image

from minisail.errors import ImageError
from minisail.image import internvl_pixel_values, internvl_tiles, open_image, yivl_pixel_values, yivl_tile
from minisail.image.preprocess import IMAGENET_MEAN, IMAGENET_STD, YIVL_BACKGROUND, yivl_padded

DATA = paths.DATA
GOLDEN = json.loads((DATA / "preprocess" / "preprocess_cases.json").read_text())
CASES = GOLDEN["cases"]
SAMPLE_CYX = GOLDEN["sample_cyx"]


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


@functools.cache
def decoded(relative_path: str) -> Image.Image:
    return open_image(DATA / relative_path)


def case_id(case: dict) -> str:
    return f"{case['pipeline']}-{Path(case['image']).stem}-{case.get('max_num', 'pad')}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_golden_case(case):
    image = decoded(case["image"])
    assert list(image.size) == case["orig_size_wh"]
    with Image.open(DATA / case["image"]) as raw:  # format sniffed from content, not the file name
        assert (raw.format, raw.mode) == (case["file_format"], case["file_mode"])
    if "decoded_rgb_sha256" in case:
        assert sha256(np.asarray(image)) == case["decoded_rgb_sha256"]

    if case["pipeline"] == "internvl":
        kwargs = dict(min_tiles=case["min_num"], max_tiles=case["max_num"], image_size=case["image_size"])
        tiles = internvl_tiles(image, **kwargs, use_thumbnail=case["use_thumbnail"])
        assert tiles.grid == (case["cols"], case["rows"]) and tiles.thumbnail == case["thumbnail_appended"]
        u8 = tiles.uint8().numpy()
        assert [sha256(tile) for tile in u8] == case["per_tile_uint8_sha256"]
        pixel_values = internvl_pixel_values(image, **kwargs, use_thumbnail=case["use_thumbnail"])
    else:
        padded = yivl_padded(image)
        assert list(padded.size) == case["padded_size_wh"]
        assert list(padded.getpixel((0, 0))) == case["padded_corner_pixel"][:3]
        u8 = np.asarray(yivl_tile(image, image_size=case["image_size"]))[None]
        pixel_values = yivl_pixel_values(image, image_size=case["image_size"])

    assert sha256(u8) == case["tiles_uint8_sha256"]
    assert list(pixel_values.shape) == case["pixel_values_shape"] and pixel_values.dtype == torch.float32
    assert list(pixel_values.shape)[0] == case["num_tiles"]
    values = pixel_values.numpy()
    assert sha256(values.astype("<f4")) == case["pixel_values_float32_le_sha256"]
    n_last = values.shape[0] - 1
    for k, sample in enumerate(case["samples"]):
        n, (c, y, x) = (k * n_last) // 15, SAMPLE_CYX[k]
        assert (sample["n"], sample["c"], sample["y"], sample["x"]) == (n, c, y, x)
        assert values[n, c, y, x] == np.float32(sample["value"])
    as64 = values.astype(np.float64)  # the stats only differ by float64 summation order: compare to 1e-9
    np.testing.assert_allclose(as64.mean(axis=(0, 2, 3)), case["channel_mean"], rtol=1e-9, atol=0)
    np.testing.assert_allclose(as64.std(axis=(0, 2, 3)), case["channel_std"], rtol=1e-9, atol=0)


def test_yivl_paste_offset_is_centred_with_floor_division():
    for case in (c for c in CASES if c["pipeline"] == "yi-vl"):
        image = decoded(case["image"])
        padded = np.asarray(yivl_padded(image))
        x0, y0 = case["paste_offset_xy"]
        w, h = image.size
        assert np.array_equal(padded[y0 : y0 + h, x0 : x0 + w], np.asarray(image))
    odd = Image.new("RGB", (5, 2), (1, 2, 3))  # (5 - 2) // 2 = 1 row of background above, 2 below
    rows = np.asarray(yivl_padded(odd))[:, 0]
    assert [tuple(p) for p in rows] == [YIVL_BACKGROUND, (1, 2, 3), (1, 2, 3), YIVL_BACKGROUND, YIVL_BACKGROUND]


def test_yivl_square_image_is_not_padded_and_rescales_in_float64():
    image = Image.fromarray(np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3))
    assert np.array_equal(np.asarray(yivl_padded(image)), np.asarray(image))
    pv = yivl_pixel_values(image, image_size=16)  # 16 -> 16: the resize is the identity
    u = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    rescaled = (u.double() * (1 / 255)).float()
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(3, 1, 1)
    assert torch.equal(pv[0], (rescaled - mean) / std)


def test_both_rescales_agree_on_every_uint8_value():
    # Yi-VL's float64 rescale and InternVL's float32 division round to the same float32 for all 256 values,
    # so the difference the README warns about cannot show in pixel_values (minisail still mirrors each).
    u = torch.arange(256)
    assert torch.equal((u.double() * (1 / 255)).float(), u.float() / 255)


def test_pixel_values_are_normalised_tiles():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 700, 3), dtype=np.uint8))
    tiles = internvl_tiles(image, max_tiles=6, image_size=112)
    pv = internvl_pixel_values(image, max_tiles=6, image_size=112)
    assert tiles.grid == (2, 1) and tiles.thumbnail and pv.shape == (3, 3, 112, 112)
    x = tiles.uint8().permute(0, 3, 1, 2).float() / 255
    expected = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.equal(pv, expected)
    # the grid tiles are crops of one resize, row-major; the thumbnail is a separate resize of the whole image
    resized = np.asarray(image.resize((224, 112), Image.Resampling.BICUBIC))
    u8 = tiles.uint8().numpy()
    assert np.array_equal(u8[0], resized[:, :112]) and np.array_equal(u8[1], resized[:, 112:])
    assert np.array_equal(u8[2], np.asarray(image.resize((112, 112), Image.Resampling.BICUBIC)))


def test_no_thumbnail_when_off_or_single_tile():
    image = Image.new("RGB", (900, 450), (9, 9, 9))
    assert internvl_pixel_values(image, max_tiles=2, use_thumbnail=False).shape[0] == 2
    assert internvl_pixel_values(image, max_tiles=2).shape[0] == 3
    assert internvl_pixel_values(image, max_tiles=1).shape[0] == 1


def test_alpha_is_dropped_not_composited():
    rgba = Image.new("RGBA", (40, 40), (200, 100, 50, 0))  # fully transparent: colour kept as is
    tile = internvl_tiles(rgba, max_tiles=1, image_size=40).uint8()
    assert tile.shape == (1, 40, 40, 3) and torch.all(tile == torch.tensor([200, 100, 50], dtype=torch.uint8))
    assert np.all(np.asarray(yivl_tile(rgba, image_size=40)) == (200, 100, 50))


def test_path_and_image_inputs_agree():
    path = DATA / "internvl" / "images" / "red_panda.jpg"
    assert torch.equal(internvl_pixel_values(path, max_tiles=2), internvl_pixel_values(decoded(str(path)), max_tiles=2))


def test_oversized_intermediate_image_is_refused():
    wide = Image.new("RGB", (4096, 1))
    with pytest.raises(ImageError, match="intermediate image"):
        internvl_tiles(wide, max_tiles=1024, image_size=8192)
    with pytest.raises(ImageError, match="max_tiles"):
        internvl_pixel_values(wide, max_tiles=0)
    with pytest.raises(ImageError, match="image_size"):
        yivl_pixel_values(wide, image_size=0)
