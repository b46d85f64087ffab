"""The package's shape, as CONTRIBUTING.md promises it: small modules, and one image's path through at most 8 files."""

from __future__ import annotations

import re

from helpers.paths import PACKAGE, ROOT

MAX_LINES = 300


def test_no_module_is_over_300_lines():
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    too_long = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines (split them by concept): {too_long}"


def test_the_pixels_to_logits_path_is_at_most_8_files_that_exist():
    text = (ROOT / "CONTRIBUTING.md").read_text()
    steps = re.findall(r"^(\d)\. `([\w/]+\.py)`", text.split("One image through SAIL-VL-2B", 1)[1], re.M)
    assert [int(n) for n, _ in steps] == list(range(1, len(steps) + 1)) and 1 < len(steps) <= 8, steps
    files = [name for _, name in steps]
    assert len(set(files)) == len(files), f"a file appears twice on the path: {files}"
    missing = [name for name in files if not (PACKAGE / name).is_file()]
    assert not missing, f"CONTRIBUTING.md's path names files that do not exist: {missing}"
