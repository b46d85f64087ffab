"""`python -m minisail tiles`: text, --json, --out picture, and clean errors."""

import json
import subprocess
import sys

import numpy as np
from helpers import paths
from PIL import Image

from minisail.cli import main
from minisail.image import internvl_tiles
from minisail.image.render import render_tiles

RED_PANDA = str(paths.DATA / "internvl" / "images" / "red_panda.jpg")  # 1000 x 747
FAMILIES = ["SAIL-VL-2B", "SAIL-VL2", "InternVL-Chat-V1-5", "Mono-InternVL-2B"]


def run(capsys, *argv):
    code = main(["tiles", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_text_output(capsys):
    code, out, _ = run(capsys, RED_PANDA)
    assert code == 0
    assert "grid: 4 cols x 3 rows of 448px + thumbnail = 13 tiles" in out
    assert all(f"{family}" in out for family in FAMILIES) and "3328" in out and "1024" in out


def test_json_is_the_last_line(capsys):
    code, out, _ = run(capsys, RED_PANDA, "--max-tiles", "6", "--json")
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert (result["width"], result["height"]) == (1000, 747)
    assert (result["cols"], result["rows"], result["blocks"]) == (3, 2, 6)
    assert result["thumbnail"] is True and result["num_tiles"] == 7 and result["image_size"] == 448
    assert result["tokens_per_tile"] == 256
    assert result["image_tokens"] == {**{family: 7 * 256 for family in FAMILIES}, "Yi-VL": 1024}
    assert result["out"] is None


def test_tokens_follow_image_size(capsys):
    _, out, _ = run(capsys, RED_PANDA, "--image-size", "224", "--max-tiles", "1", "--json")
    result = json.loads(out.splitlines()[-1])
    assert result["tokens_per_tile"] == 64 and result["num_tiles"] == 1 and not result["thumbnail"]
    assert result["image_tokens"]["SAIL-VL2"] == 64 and result["image_tokens"]["Yi-VL"] == 1024


def test_out_writes_the_picture(capsys, tmp_path):
    out_path = tmp_path / "tiles.png"
    code, out, _ = run(capsys, RED_PANDA, "--max-tiles", "6", "--out", str(out_path), "--json")
    assert code == 0 and json.loads(out.splitlines()[-1])["out"] == str(out_path)
    with Image.open(out_path) as picture:
        assert picture.format == "PNG" and picture.width > 4 * 448 and picture.height > 2 * 448


def test_picture_shows_the_exact_tiles():
    tiles = internvl_tiles(RED_PANDA, max_tiles=6, image_size=112)
    gap = 10
    picture = np.asarray(render_tiles(tiles, gap=gap))
    # find each tile by its bottom-right quarter (the label sits top-left): it must be there, pixel for pixel
    top = picture.shape[0] - gap - 2 * 112 - gap  # caption above, rows of 112 with a gap between
    for index, tile in enumerate(tiles.uint8().numpy()[:6]):
        row, col = divmod(index, 3)
        x, y = gap + col * (112 + gap), top + row * (112 + gap)
        assert np.array_equal(picture[y + 56 : y + 112, x + 56 : x + 112], tile[56:, 56:])
    x = gap + 3 * 112 + 2 * gap + 3 * gap  # the thumbnail, right of the grid
    assert np.array_equal(picture[top + 56 : top + 112, x + 56 : x + 112], tiles.uint8().numpy()[6][56:, 56:])


def test_errors_exit_2_with_a_message(capsys, tmp_path):
    code, out, err = run(capsys, str(tmp_path / "nope.png"))
    assert code == 2 and out == "" and "minisail: error: image file not found" in err
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    code, _, err = run(capsys, str(tmp_path / "bad.jpg"))
    assert code == 2 and "not an image file" in err
    code, _, err = run(capsys, RED_PANDA, "--max-tiles", "0")
    assert code == 2 and "max_tiles must be between 1 and" in err
    code, _, err = run(capsys, RED_PANDA, "--min-tiles", "5", "--max-tiles", "2")
    assert code == 2 and "--min-tiles 5 is larger than --max-tiles 2" in err
    code, _, err = run(capsys, RED_PANDA, "--out", str(tmp_path / "missing_dir" / "t.png"))
    assert code == 2 and "cannot write" in err


def test_module_entry_point():
    done = subprocess.run(
        [sys.executable, "-m", "minisail", "tiles", RED_PANDA, "--max-tiles", "6", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["num_tiles"] == 7
