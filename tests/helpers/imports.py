"""Every import a Python module makes, read from its syntax tree (so a lazy import inside a function counts)."""

from __future__ import annotations

import ast


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import statement and every `importlib.import_module("...")` / `__import__("...")`
    with a literal name, wherever it sits in the module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
            if name in ("import_module", "__import__", "find_spec") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found
