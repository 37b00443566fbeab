"""nbgrader end to end on notebook 01 (issue 20): generate the student version, autograde three submissions.

The three students: one hands in the instructor's solutions (every check passes: 4 of 4 points), one makes a
listed mistake in exercise 1.1 (the square roots forgotten: 3 of 4), one hands in the released notebook
untouched (0 of 4). nbgrader is a test-only dependency; without it the test is skipped and says why.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.notebook_tools import ROOT, cell_source, load, nbgrader
from tests.test_exercise_mistakes import MISTAKES

pytest.importorskip("nbgrader", reason="nbgrader is not installed (pip install -e '.[dev]' installs it)")

NOTEBOOK = "01_forward_process.ipynb"
ASSIGNMENT = "ps01"


def _nbgrader(course: Path, *args: str) -> subprocess.CompletedProcess:
    """Run one nbgrader command on the course folder, in fast mode, with the cell limit it is given."""
    env = {**os.environ, "MINIDIFF_FAST": "1"}
    env.pop("MPLBACKEND", None)  # the kernel chooses its own backend, as a student's would
    command = [sys.executable, "-m", "nbgrader", *args, f"--CourseDirectory.root={course}"]
    done = subprocess.run(command, cwd=course, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _submission(released: dict, solutions: dict[str, str]) -> dict:
    """The released notebook with some solution cells (by grade_id) filled in, as a student would hand it in."""
    notebook = copy.deepcopy(released)
    for cell in notebook["cells"]:
        grade_id = nbgrader(cell).get("grade_id")
        if grade_id in solutions:
            cell["source"] = solutions[grade_id]
    return notebook


def _check_output(notebook: Path, grade_id: str) -> str:
    """Everything a graded notebook's check cell shows: its printed text, error lines and displays."""
    check = next(c for c in load(notebook)["cells"] if nbgrader(c).get("grade_id") == grade_id)
    return "".join("".join(o.get("text", "")) + "\n".join(o.get("traceback", []))
                   + "".join(o.get("data", {}).get("text/plain", "")) for o in check["outputs"])


def test_generate_and_autograde_three_students(tmp_path: Path) -> None:
    course = tmp_path / "course"
    (course / "source" / ASSIGNMENT).mkdir(parents=True)
    shutil.copy(ROOT / "notebooks" / NOTEBOOK, course / "source" / ASSIGNMENT / NOTEBOOK)
    _nbgrader(course, "generate_assignment", ASSIGNMENT)
    released = load(course / "release" / ASSIGNMENT / NOTEBOOK)

    instructor = load(ROOT / "notebooks" / NOTEBOOK)
    answers = {nbgrader(c)["grade_id"]: cell_source(c) for c in instructor["cells"] if nbgrader(c).get("solution")}
    assert len(answers) == 4, f"notebook 01 should have four exercises, found {sorted(answers)}"
    for grade_id in answers:
        released_cell = next(c for c in released["cells"] if nbgrader(c).get("grade_id") == grade_id)
        assert "BEGIN SOLUTION" not in cell_source(released_cell), f"{grade_id}'s solution reached the students"

    wrong_step, _hint = MISTAKES["ex01_forward_step_check"][0]  # the square roots forgotten
    students = {
        "correct": _submission(released, answers),
        "wrong": _submission(released, {**answers, "ex01_forward_step": wrong_step}),
        "unfinished": released,
    }
    for student, notebook in students.items():
        folder = course / "submitted" / student / ASSIGNMENT
        folder.mkdir(parents=True)
        (folder / NOTEBOOK).write_text(json.dumps(notebook), encoding="utf-8")

    _nbgrader(course, "autograde", ASSIGNMENT, "--create", "--ExecutePreprocessor.timeout=120")

    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gradebook:
        scores = {s: gradebook.find_submission(ASSIGNMENT, s).score for s in students}
        max_score = gradebook.find_assignment(ASSIGNMENT).max_score
        wrong_cells = [g.name for g in gradebook.find_submission_notebook(NOTEBOOK[:-6], ASSIGNMENT, "wrong").grades
                       if g.score < g.max_score]
    assert max_score == 4
    assert scores == {"correct": 4, "wrong": 3, "unfinished": 0}, scores
    assert wrong_cells == ["ex01_forward_step_check"], wrong_cells

    # The graded notebooks show the student the check's one friendly block, not a library traceback.
    for student, expected in (("wrong", "square roots"), ("unfinished", "not done yet")):
        shown = _check_output(course / "autograded" / student / ASSIGNMENT / NOTEBOOK, "ex01_forward_step_check")
        assert expected in shown, f"{student}: the check said {shown!r}"
        assert " []" not in shown, f"{student}: an empty detail was shown: {shown!r}"
        assert "classroom.py" not in shown and "contextlib" not in shown, f"a traceback reached {student}:\n{shown}"
