"""The repository's folders, computed once, so a test file can move between tests/ sub-folders unchanged."""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent  # tests/
ROOT = TESTS.parent  # the repository root
PACKAGE = ROOT / "minisail"
DATA = TESTS / "data"  # reference data, with its sources and licences
GOLDEN = TESTS / "golden"  # the golden case folders (`python -m minisail parity tests/golden/*/`)
TOOLS = TESTS / "tools"  # record_golden.py, refresh_notebooks.py
