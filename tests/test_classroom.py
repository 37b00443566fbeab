"""Student versions: no solution text, stubs that name the exercise, check cells that fail kindly."""

import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from minidiff.classroom import (
    BEGIN_SOLUTION,
    END_SOLUTION,
    ExerciseNotDone,
    ExerciseWrong,
    assert_close,
    checking,
    main,
    release,
    release_notebook,
    strip_solutions,
)
from tests.notebook_tools import NOTEBOOKS, ROOT, cell_source, load, nbgrader

SOURCE = """# Exercise 2.3: the Gaussian KL
def kl(a, b):
    ### BEGIN SOLUTION
    secret_line = a - b
    return secret_line
    ### END SOLUTION
"""


def test_strip_solutions_leaves_a_named_stub_with_the_same_indentation() -> None:
    stripped = strip_solutions(SOURCE)
    assert "secret_line" not in stripped and BEGIN_SOLUTION not in stripped
    assert "    raise NotImplementedError('Exercise 2.3 (the Gaussian KL)')" in stripped
    namespace: dict = {}
    exec(stripped, namespace)  # still valid Python
    with pytest.raises(NotImplementedError, match=r"Exercise 2\.3"):
        namespace["kl"](1, 2)


@pytest.mark.parametrize("broken", [f"{BEGIN_SOLUTION}\nx = 1\n", f"x = 1\n{END_SOLUTION}\n",
                                    f"{BEGIN_SOLUTION}\n{BEGIN_SOLUTION}\n{END_SOLUTION}\n"])
def test_unbalanced_markers_are_an_error(broken: str) -> None:
    with pytest.raises(ValueError, match="SOLUTION"):
        strip_solutions(broken)


def test_checking_gives_friendly_feedback(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ExerciseNotDone, match=r"Exercise 9\.9 is not done yet"), checking("Exercise 9.9"):
        raise NotImplementedError("Exercise 9.9")
    with pytest.raises(ExerciseWrong, match=r"Exercise 9\.9: not quite\. answer differs .* Try harder"), \
            checking("Exercise 9.9"):
        assert_close(torch.ones(3), torch.zeros(3), "answer", hint="Try harder.")
    with pytest.raises(ExerciseWrong, match=r"has shape \(2,\), expected \(3,\)"), checking("Exercise 9.9"):
        assert_close(torch.ones(2), torch.ones(3), "answer")
    with checking("Exercise 9.9"):
        assert_close(torch.ones(3), torch.ones(3) + 1e-7, "answer")
    assert "✓ Exercise 9.9" in capsys.readouterr().out
    with pytest.raises(ZeroDivisionError), checking("Exercise 9.9"):  # a real bug is not dressed up
        _ = 1 / 0


def test_every_notebook_has_graded_exercises_with_nbgrader_metadata() -> None:
    for path in NOTEBOOKS:
        cells = load(path)["cells"]
        solutions = [i for i, c in enumerate(cells) if BEGIN_SOLUTION in cell_source(c)]
        assert len(solutions) >= 2, f"{path.name}: a lesson needs at least two exercises"
        for index in solutions:
            assert nbgrader(cells[index]).get("solution") is True, f"{path.name} cell {index}: nbgrader metadata"
            following = cells[index + 1]
            assert nbgrader(following).get("grade") is True and "checking(" in cell_source(following), \
                f"{path.name} cell {index}: every exercise is followed by a graded check cell using checking()"
        ids = [nbgrader(c)["grade_id"] for c in cells if nbgrader(c)]
        assert len(ids) == len(set(ids)), f"{path.name}: nbgrader grade_ids must be unique"


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("student")
    subprocess.run([sys.executable, "-m", "minidiff.classroom", "release", str(ROOT / "notebooks"), str(output)],
                   check=True, capture_output=True)
    return output


def test_release_removes_every_solution_and_keeps_everything_else(released: Path) -> None:
    for path in NOTEBOOKS:
        source_cells, student_cells = load(path)["cells"], load(released / path.name)["cells"]
        assert len(source_cells) == len(student_cells)
        for original, student in zip(source_cells, student_cells, strict=True):
            text, student_text = cell_source(original), cell_source(student)
            if BEGIN_SOLUTION in text:
                secret = text.split(BEGIN_SOLUTION, 1)[1].split(END_SOLUTION, 1)[0]
                for line in filter(None, (raw.strip() for raw in secret.splitlines())):
                    assert line not in student_text, f"{path.name}: solution line leaked: {line!r}"
                assert re.search(r"raise NotImplementedError\(['\"]Exercise \d", student_text), student_text
            else:
                assert student_text == text
            if student["cell_type"] == "code":
                assert student["outputs"] == [] and student["execution_count"] is None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_released_check_cells_fail_kindly_on_the_stub(released: Path, path: Path) -> None:
    """Run the student notebook: each check cell must fail with the friendly 'not done yet' message.

    (That the same check cells pass on the instructor's solutions is what nbval proves on notebooks/.)
    """
    notebook = nbformat.read(released / path.name, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    check_cells = [c for c in notebook.cells if nbgrader(c).get("grade")]
    assert check_cells
    for cell in check_cells:
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert errors and errors[0].ename == "ExerciseNotDone", f"{path.name}: {cell_source(cell)[:60]}"
        assert "is not done yet" in errors[0].evalue


def test_release_refuses_to_overwrite_the_source(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must differ"):
        release(ROOT / "notebooks", ROOT / "notebooks")
    with pytest.raises(ValueError, match="no notebooks"):
        release(tmp_path, tmp_path / "out")


def _notebook(*cells: dict) -> dict:
    return {"cells": list(cells), "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


def _cell(kind: str, source: str, solution: bool = False) -> dict:
    cell = {"cell_type": kind, "metadata": {"nbgrader": {"solution": True}} if solution else {}, "source": source}
    return cell | ({"outputs": [], "execution_count": None} if kind == "code" else {})


@pytest.mark.parametrize("solution_cell", [
    _cell("code", "def f():\n    ## BEGIN SOLUTION\n    return 42  # SECRET\n    ## END SOLUTION\n"),
    _cell("code", "def f():\n    ### BEGIN SOLUTION  (hidden from students)\n    return 42  # SECRET\n"
                  "    ### END SOLUTION  (done)\n"),
    _cell("markdown", "Why?\n### BEGIN SOLUTION\nBecause SECRET.\n### END SOLUTION\n"),
    _cell("code", "def f():\n    return 42  # SECRET\n", solution=True),
    _cell("markdown", "Because SECRET.", solution=True),
])
def test_release_never_leaks_a_solution_nbgrader_would_hide(solution_cell: dict) -> None:
    """Marker variants that nbgrader accepts, markdown answers and metadata-only solution cells are all stubbed."""
    released = release_notebook(_notebook(_cell("markdown", "# Title"), solution_cell))
    assert "SECRET" not in json.dumps(released)
    assert "YOUR" in "".join(released["cells"][1]["source"])


def test_release_protects_the_instructors_files(tmp_path: Path) -> None:
    """Swapped folders, or an output that already exists, never overwrite anything."""
    instructor, students = tmp_path / "instructor", tmp_path / "students"
    instructor.mkdir()
    original = _notebook(_cell("code", "def f():\n    ### BEGIN SOLUTION\n    return 42\n    ### END SOLUTION\n"))
    (instructor / "a.ipynb").write_text(json.dumps(original), encoding="utf-8")
    release(instructor, students)
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        release(instructor, students)
    release(instructor, students, overwrite=True)
    with pytest.raises(ValueError, match="swap"):  # the arguments the wrong way round
        release(students, instructor)
    assert json.loads((instructor / "a.ipynb").read_text(encoding="utf-8")) == original
    assert main(["release", str(students), str(instructor), "--overwrite"]) == 2
    assert json.loads((instructor / "a.ipynb").read_text(encoding="utf-8")) == original
