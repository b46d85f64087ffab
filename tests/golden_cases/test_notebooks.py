"""The teaching notebooks in notebooks/ run, and their committed outputs are what the code produces today.

Every notebook is executed top to bottom in a fresh Jupyter kernel (nbclient + ipykernel, the `test` extra)
with the working directory notebooks/, as Jupyter runs it. A cell that raises fails its test with the cell's
traceback. Then the fresh outputs are compared with the committed ones, ignoring only volatile parts (memory
addresses, whitespace, float noise, picture encoding; see tests/tools/refresh_notebooks.py), so a change to
minisail that changes what a notebook shows fails here until the notebook is refreshed:

    python tests/tools/refresh_notebooks.py [NAME ...]

The committed files must also show a clean run: execution counts 1, 2, 3, ... and no error output.
"""

from __future__ import annotations

import importlib.util

import pytest
from helpers import paths

nbformat = pytest.importorskip("nbformat", reason="the notebook runner is in the test extra: pip install -e '.[test]'")
pytest.importorskip("nbclient", reason="the notebook runner is in the test extra: pip install -e '.[test]'")
pytest.importorskip("ipykernel", reason="the notebook kernel is in the test extra: pip install -e '.[test]'")

_TOOL = paths.TOOLS / "refresh_notebooks.py"
_spec = importlib.util.spec_from_file_location("refresh_notebooks", _TOOL)
refresh = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(refresh)

NOTEBOOKS = refresh.notebook_paths()
REFRESH = f"python {_TOOL.relative_to(refresh.REPO)}"


def test_the_teaching_notebooks_are_there():
    names = [path.name for path in NOTEBOOKS]
    assert len(names) >= 6, f"expected the six teaching notebooks in {refresh.NOTEBOOKS}, found {names}"
    assert names == sorted(names) and all(name[:2].isdigit() for name in names), "notebooks are named NN_topic.ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_committed_notebook_shows_a_clean_run(path):
    problems = refresh.structure_problems(nbformat.read(path, as_version=4))
    assert not problems, f"{path.name}: " + "; ".join(problems) + f". Refresh it: {REFRESH} {path.stem}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_and_its_outputs_are_fresh(path):
    committed = nbformat.read(path, as_version=4)
    fresh, _ = refresh.execute(path)  # raises CellExecutionError, with the traceback, if a cell fails
    differences = refresh.output_differences(committed, fresh)
    assert not differences, (
        f"{path.name}: the committed outputs are stale ({len(differences)} difference(s)); refresh them with "
        f"`{REFRESH} {path.stem}` and review the diff:\n  " + "\n  ".join(differences[:10])
    )


def test_the_staleness_check_notices_a_changed_output():
    """The comparison is not vacuous: a changed number, a changed id or a missing output is a difference."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("print(x)", execution_count=1)]
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", name="stdout", text="max |diff| 4.7e-06, token 211\n")]

    def with_text(text):
        other = nbformat.from_dict(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(x)")]))
        other.cells[0].outputs = [nbformat.v4.new_output("stream", name="stdout", text=text)] if text else []
        return other

    assert refresh.output_differences(nb, with_text("max |diff|  3.1e-06,  token 211\n")) == []  # noise, spacing
    assert refresh.output_differences(nb, with_text("max |diff| 4.7e-02, token 211\n"))  # a real change
    assert refresh.output_differences(nb, with_text("max |diff| 4.7e-06, token 212\n"))  # ids are exact
    assert refresh.output_differences(nb, with_text(None))  # an output went missing
