"""Run the teaching notebooks in notebooks/ and keep their committed outputs fresh.

    python tests/tools/refresh_notebooks.py            # re-run every notebook, write the new outputs in place
    python tests/tools/refresh_notebooks.py 03 05      # only the notebooks whose file name contains "03" or "05"
    python tests/tools/refresh_notebooks.py --check    # re-run and compare with the committed outputs; write nothing

The .ipynb files are the source: edit one in Jupyter (or any editor), then refresh it with this script so that
its outputs come from a clean top-to-bottom run. Each notebook runs in a fresh `python3` kernel (ipykernel) with
the working directory set to notebooks/, as Jupyter does when you open it there, and PYTHONHASHSEED=0.

tests/golden_cases/test_notebooks.py uses the same functions, so CI fails when a notebook raises, when its committed
file was not run top to bottom (execution counts 1, 2, 3, ...; no error output), or when its committed outputs
differ from a fresh run. "Differ" ignores what is volatile by nature:
- execution timing metadata and the notebook's kernel metadata (this script writes a fixed set);
- memory addresses (`0x7f3a...`), the repository's absolute path, and whitespace;
- float noise: numbers with a decimal point or an exponent must agree within rel 1e-3 or abs 1e-4 (so
  `4.71e-06` and `3.2e-06` are both "float32 rounding"); integers (token ids, shapes, counts) must be equal;
- the bytes of pictures: same size, mean pixel difference below 3 levels (JPEG/zlib builds differ).
Everything else, text of every stream and every rich output, must be the same.
"""

from __future__ import annotations

import argparse
import base64
import copy
import io
import math
import os
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
KERNEL = "python3"
CELL_TIMEOUT = 300  # seconds: a guard against a hung cell, not a speed target (each notebook takes seconds)
IMAGE_TYPES = ("image/png", "image/jpeg")
FLOAT_REL, FLOAT_ABS = 1e-3, 1e-4
PIXEL_TOLERANCE = 3.0  # mean absolute difference, in 0..255 levels

# The metadata every committed notebook carries (nothing machine-specific, so a refresh does not churn it).
METADATA = {
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": KERNEL},
    "language_info": {"name": "python", "pygments_lexer": "ipython3", "file_extension": ".py"},
}

_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")


def notebook_paths(filters: list[str] | tuple[str, ...] = ()) -> list[Path]:
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    return [p for p in paths if not filters or any(f in p.name for f in filters)]


def execute(path: Path) -> tuple[nbformat.NotebookNode, float]:
    """Run the notebook at `path` top to bottom in a fresh kernel; (executed notebook, seconds).

    Raises nbclient's CellExecutionError (with the cell's traceback) if any cell fails."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name=KERNEL,
        timeout=CELL_TIMEOUT,
        record_timing=False,
        resources={"metadata": {"path": str(path.parent)}},  # the kernel's working directory
        extra_arguments=["--IPKernelApp.log_level=ERROR"],  # not its TCP-transport banner on every start
    )
    env = dict(os.environ, PYTHONHASHSEED="0", PYDEVD_DISABLE_FILE_VALIDATION="1")
    start = time.perf_counter()
    client.execute(env=env)
    return clean(nb), time.perf_counter() - start


def clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop run-specific metadata so that a refresh only changes what the cells print."""
    nb.metadata = nbformat.from_dict(METADATA)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        cell.metadata.pop("ExecuteTime", None)
        if cell.cell_type == "code":
            cell.outputs = _coalesce_streams(cell.outputs)
    return nb


def _coalesce_streams(outputs: list) -> list:
    """One output per run of same-stream text: how print() output is split into messages depends on timing."""
    merged: list = []
    for output in outputs:
        previous = merged[-1] if merged else None
        if output.output_type == "stream" and previous is not None and previous.output_type == "stream":
            if previous.name == output.name:
                previous.text += output.text
                continue
        merged.append(output)
    return merged


def write(nb: nbformat.NotebookNode, path: Path) -> None:
    text = nbformat.writes(nb)
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------


def structure_problems(nb: nbformat.NotebookNode) -> list[str]:
    """What shows a committed notebook was not run top to bottom in one fresh kernel (empty list = fine)."""
    problems = []
    try:
        nbformat.validate(nb)
    except nbformat.ValidationError as error:
        problems.append(f"not a valid notebook: {error.message}")
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    if not code:
        problems.append("has no code cells")
    counts = [cell.execution_count for cell in code]
    if counts != list(range(1, len(code) + 1)):
        problems.append(f"execution counts are {counts}, not 1..{len(code)} in order: refresh it")
    for index, cell in enumerate(code, 1):
        if any(output.output_type == "error" for output in cell.outputs):
            problems.append(f"code cell {index} holds an error output")
    if not any(cell.outputs for cell in code):
        problems.append("no code cell has an output")
    return problems


def output_differences(committed: nbformat.NotebookNode, fresh: nbformat.NotebookNode) -> list[str]:
    """Where the committed outputs differ from a fresh run, beyond the volatile parts (see the module doc)."""
    old_cells = [cell for cell in committed.cells if cell.cell_type == "code"]
    new_cells = [cell for cell in fresh.cells if cell.cell_type == "code"]
    if len(old_cells) != len(new_cells):
        return [f"{len(old_cells)} code cells committed, {len(new_cells)} executed"]
    differences = []
    for index, (old, new) in enumerate(zip(old_cells, new_cells, strict=True), 1):
        where = f"code cell {index} ({_first_line(new.source)})"
        old_outputs = _comparable(_coalesce_streams(copy.deepcopy(old.outputs)))
        new_outputs = _comparable(_coalesce_streams(copy.deepcopy(new.outputs)))
        if [kind for kind, _ in old_outputs] != [kind for kind, _ in new_outputs]:
            kinds = ([kind for kind, _ in old_outputs], [kind for kind, _ in new_outputs])
            differences.append(f"{where}: outputs {kinds[0]} committed, {kinds[1]} now")
            continue
        for (kind, old_value), (_, new_value) in zip(old_outputs, new_outputs, strict=True):
            compare = _image_difference if kind in IMAGE_TYPES else _text_difference
            why = compare(old_value, new_value)
            if why:
                differences.append(f"{where}, {kind}: {why}")
    return differences


def _comparable(outputs) -> list[tuple[str, str]]:
    """(kind, payload) per output: one entry per stream and per rich-output MIME type (images win over text)."""
    items = []
    for output in outputs:
        if output.output_type == "stream":
            items.append((f"stream:{output.name}", output.text))
        elif output.output_type in ("display_data", "execute_result"):
            data = output.get("data", {})
            images = [kind for kind in IMAGE_TYPES if kind in data]
            for kind in images or sorted(data):
                value = data[kind]
                items.append((kind, value if isinstance(value, str) else "".join(value)))
        elif output.output_type == "error":
            items.append(("error", f"{output.ename}: {output.evalue}"))
    return items


def _first_line(source: str) -> str:
    line = next((line for line in source.splitlines() if line.strip()), "")
    return line if len(line) <= 60 else line[:57] + "..."


def _tokens(text: str) -> list[str | float | int]:
    """Text split into numbers and the rest, with the volatile parts normalised away."""
    text = text.replace(str(REPO), "<repo>")
    text = _ADDRESS.sub("0x?", text)
    tokens: list[str | float | int] = []
    position = 0
    for match in _NUMBER.finditer(text):
        tokens.append(re.sub(r"\s+", "", text[position : match.start()]))
        number = match.group()
        tokens.append(float(number) if any(c in number for c in ".eE") else int(number))
        position = match.end()
    tokens.append(re.sub(r"\s+", "", text[position:]))
    return tokens


def _text_difference(old: str, new: str) -> str | None:
    old_tokens, new_tokens = _tokens(old), _tokens(new)
    if len(old_tokens) == len(new_tokens):
        for a, b in zip(old_tokens, new_tokens, strict=True):
            if isinstance(a, float) and isinstance(b, float):
                if not math.isclose(a, b, rel_tol=FLOAT_REL, abs_tol=FLOAT_ABS):
                    break
            elif a != b:
                break
        else:
            return None
    line = _first_differing_line(old, new)
    return f"committed {line[0]!r}, now {line[1]!r}"


def _first_differing_line(old: str, new: str) -> tuple[str, str]:
    old_lines, new_lines = old.splitlines(), new.splitlines()
    for index in range(max(len(old_lines), len(new_lines))):
        a = old_lines[index] if index < len(old_lines) else "<end>"
        b = new_lines[index] if index < len(new_lines) else "<end>"
        if _tokens(a) != _tokens(b):
            return a[:200], b[:200]
    return old[:200], new[:200]


def _image_difference(old: str, new: str) -> str | None:
    import numpy as np
    from PIL import Image

    def pixels(payload: str):
        with Image.open(io.BytesIO(base64.b64decode(payload))) as image:
            return np.asarray(image.convert("RGB"), dtype=np.float64)

    a, b = pixels(old), pixels(new)
    if a.shape != b.shape:
        return f"picture size {a.shape[1]}x{a.shape[0]} committed, {b.shape[1]}x{b.shape[0]} now"
    mean = float(np.abs(a - b).mean())
    return None if mean < PIXEL_TOLERANCE else f"pictures differ (mean pixel difference {mean:.1f} levels)"


# --------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="substrings of notebook file names (default: every notebook)")
    parser.add_argument("--check", action="store_true", help="compare with the committed outputs, write nothing")
    args = parser.parse_args(argv)
    paths = notebook_paths(args.names)
    if not paths:
        print(f"no notebook in {NOTEBOOKS} matches {args.names}", file=sys.stderr)
        return 2
    stale = 0
    for path in paths:
        committed = nbformat.read(path, as_version=4)
        fresh, seconds = execute(path)
        if args.check:
            problems = structure_problems(committed) + output_differences(committed, fresh)
            stale += bool(problems)
            print(f"{'STALE' if problems else 'ok   '} {path.name} ({seconds:.1f}s)")
            for problem in problems:
                print(f"      {problem}")
        else:
            write(fresh, path)
            print(f"wrote {path.relative_to(REPO)} ({seconds:.1f}s)")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
