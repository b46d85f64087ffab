"""The model code never depends on the fast paths: nothing in layers.py, vision/, llm/ or models/ imports
minisail.fast (int8, packing, page release, read-ahead are added from outside, as loader hooks or module swaps).

Read from the syntax tree, as tests/loading/test_no_transformers.py does, so a lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import paths
from helpers.imports import imported_modules

ROOT = paths.ROOT
PACKAGE = ROOT / "minisail"
MODEL_CODE = [PACKAGE / "layers.py", PACKAGE / "vision", PACKAGE / "llm", PACKAGE / "models"]


def _is_fast(module: str) -> bool:
    return module == "minisail.fast" or module.startswith("minisail.fast.")


def _from_imports(tree: ast.AST, path: Path) -> list[tuple[int, str]]:
    """(line, package.name) of every name a `from ... import name` takes, relative imports resolved, so that
    `from minisail import fast` and `from ..fast import int8` are seen as imports of minisail.fast."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def test_model_code_does_not_import_the_fast_paths():
    modules = [p for root in MODEL_CODE for p in ([root] if root.is_file() else sorted(root.rglob("*.py")))]
    assert len(modules) > 10  # the walk really saw the model code
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path in modules
        for tree in [ast.parse(path.read_text(), filename=str(path))]
        for line, name in imported_modules(tree) + _from_imports(tree, path)
        if _is_fast(name)
    ]
    assert not offenders, "layers/vision/llm/models must not import minisail.fast:\n" + "\n".join(offenders)


def test_the_check_sees_every_way_of_importing_the_fast_paths():
    path = PACKAGE / "llm" / "example.py"
    for source in (
        "def f():\n    from minisail.fast.packing import pack_linears\n",
        "import minisail.fast.int8\n",
        "from minisail import fast\n",
        "from ..fast import memory\n",
    ):
        tree = ast.parse(source)
        assert any(_is_fast(name) for _, name in imported_modules(tree) + _from_imports(tree, path)), source
    tree = ast.parse("from minisail import layers\nfrom .cache import KVCache\n")
    assert not any(_is_fast(name) for _, name in imported_modules(tree) + _from_imports(tree, path))
