"""Course structure: clean notebooks, one lesson per notebook, everything listed in the README."""

import re
from pathlib import Path

import pytest

from tests.notebook_tools import LESSONS, NOTEBOOKS, ROOT, cell_source, load


def test_notebooks_are_stored_without_outputs() -> None:
    assert NOTEBOOKS, "no notebooks found"
    for path in NOTEBOOKS:
        for index, cell in enumerate(load(path)["cells"]):
            if cell["cell_type"] == "code":
                assert not cell["outputs"] and cell["execution_count"] is None, \
                    f"{path.name} cell {index} has stored output: clear it before committing"


def test_notebooks_and_lessons_pair_up_and_are_numbered() -> None:
    assert {p.stem for p in NOTEBOOKS} == {p.stem for p in LESSONS}
    for path in NOTEBOOKS:
        assert re.fullmatch(r"\d\d_[a-z0-9_]+", path.stem), f"{path.name}: name must be NN_topic"


def test_readme_lists_every_notebook_and_lesson() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for path in NOTEBOOKS:
        assert f"notebooks/{path.name}" in readme, f"README does not list notebooks/{path.name}"
        assert f"lessons/{path.stem}.md" in readme, f"README does not list lessons/{path.stem}.md"


def test_lessons_have_goals_derivation_exercises_and_references() -> None:
    for path in LESSONS:
        text = path.read_text(encoding="utf-8")
        for heading in ("## Goals", "## Exercises", "## References"):
            assert heading in text, f"{path.name} lacks a '{heading}' section"
        assert "$$" in text, f"{path.name} should derive its equations in LaTeX"


def test_notebooks_size_their_loops_with_budget() -> None:
    """Fast mode only works if notebooks never hard-code a big loop size: each one uses budget()."""
    for path in NOTEBOOKS:
        sources = "\n".join(cell_source(c) for c in load(path)["cells"] if c["cell_type"] == "code")
        assert "budget(" in sources, f"{path.name} never calls budget()"
        assert "cuda" not in sources.replace("torch.cuda.is_available", ""), \
            f"{path.name} hard-codes a device: use minidiff.device()"


_DRAWING_CALLS = {"show_images", "scatter2d", "density_contours", "title", "suptitle", "legend", "plot", "bar",
                  "hist", "imshow", "scatter", "set", "xlabel", "ylabel", "axhline", "axvline", "loglog", "text"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_cell_ends_in_a_bare_drawing_call(path: Path) -> None:
    """A cell whose last statement is e.g. ``plt.title(...)`` prints a stray ``Text(…)`` or ``<Axes: …>`` under the
    figure; end it with ``;`` (or assign the result)."""
    import ast

    offenders = []
    for cell in load(path)["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = cell_source(cell)
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        last = tree.body[-1] if tree.body else None
        if isinstance(last, ast.Expr) and isinstance(last.value, ast.Call):
            function = last.value.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
            if name in _DRAWING_CALLS and not source.rstrip().endswith(";"):
                offenders.append(source.strip().splitlines()[-1][:70])
    assert not offenders, offenders
