"""The installed package runs with `transformers` unimportable (CONTRIBUTING: nothing under minisail/ imports it).

transformers is a test-only oracle (the `parity` extra) and the benchmark's comparison, both outside minisail/.
Two checks: no module under minisail/ names it in an import, at the top or inside a function (read from the
syntax tree, so a lazy import cannot hide); and the README's main job, every golden case and the tile picture,
runs in a fresh interpreter where `import transformers` fails.
"""

from __future__ import annotations

import ast
import subprocess
import sys

from helpers import paths
from helpers.imports import imported_modules

ROOT = paths.ROOT
PACKAGE = ROOT / "minisail"

# A fresh interpreter in which transformers (and every submodule) cannot be imported, then `python -m minisail`.
BLOCKED = """
import runpy, sys
sys.modules["transformers"] = None  # `import transformers` now raises ImportError
try:
    import transformers
except ImportError:
    pass
else:
    raise SystemExit("transformers is still importable")
sys.argv = ["minisail", *sys.argv[1:]]
runpy.run_module("minisail", run_name="__main__", alter_sys=True)
"""


def test_nothing_under_minisail_imports_transformers():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 30  # the walk really saw the package
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path in modules
        for line, name in imported_modules(ast.parse(path.read_text(), filename=str(path)))
        if name == "transformers" or name.startswith("transformers.")
    ]
    assert not offenders, "minisail/ must not import transformers (a test-only oracle):\n" + "\n".join(offenders)


def test_nothing_under_minisail_imports_the_benchmarks_llama_cpp_peer():
    """llama.cpp (llama_cpp) and its GGUF writer (gguf) are the benchmark's peer, in the `llama` extra: bench/ only."""
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line, name in imported_modules(ast.parse(path.read_text(), filename=str(path)))
        if name.split(".")[0] in ("llama_cpp", "gguf")
    ]
    assert not offenders, "minisail/ must not import llama_cpp or gguf (bench/ only):\n" + "\n".join(offenders)


def test_the_import_check_sees_lazy_imports():
    source = "def f():\n    import transformers.models\n\ndef g():\n    importlib.import_module('transformers')\n"
    assert [name for _, name in imported_modules(ast.parse(source))] == ["transformers.models", "transformers"]


def _run_blocked(*argv: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKED, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_every_golden_case_passes_with_transformers_unimportable():
    cases = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests" / "golden").iterdir() if p.is_dir())
    assert cases
    run = _run_blocked("parity", *cases)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"{len(cases)} passed, 0 failed" in run.stdout


def test_tiles_run_with_transformers_unimportable(tmp_path):
    image = "tests/data/internvl/images/beluga_portrait.jpg"
    run = _run_blocked("tiles", image, "--out", str(tmp_path / "tiles.png"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "tiles.png").stat().st_size > 0
