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
    diagnose,
    main,
    release,
    release_notebook,
    strip_solutions,
)
from tests.notebook_tools import NOTEBOOKS, ROOT, cell_source, load, nbgrader, only_displays

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
    # the cells after the last check cell cannot change what the checks print: they are left out (CI time)
    last_check = max(k for k, cell in enumerate(notebook.cells) if nbgrader(cell).get("grade"))
    notebook.cells = notebook.cells[:last_check + 1]
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


def _run_until(notebook: str, grade_id: str, replacement: str) -> None:
    """Execute a notebook's code cells in fast mode up to and including the check cell ``grade_id``, with the
    solution cell just before it replaced by ``replacement`` (a plausible wrong answer)."""
    import os

    cells = load(ROOT / "notebooks" / notebook)["cells"]
    namespace: dict = {}
    previous = os.environ.get("MINIDIFF_FAST")
    os.environ["MINIDIFF_FAST"] = "1"
    try:
        for index, cell in enumerate(cells):
            if cell["cell_type"] != "code":
                continue
            source = cell_source(cell)
            if index + 1 < len(cells) and nbgrader(cells[index + 1]).get("grade_id") == grade_id:
                source = replacement
            if only_displays(source):
                continue
            exec(compile(source, f"{notebook}[{index}]", "exec"), namespace)
            if nbgrader(cell).get("grade_id") == grade_id:
                return
    finally:
        if previous is None:
            os.environ.pop("MINIDIFF_FAST", None)
        else:
            os.environ["MINIDIFF_FAST"] = previous


def test_a_ddim_step_without_the_minus_sigma_squared_is_rejected() -> None:
    """Exercise 8.1's check must see the classic slip: √(1 − ᾱ_s) instead of √(1 − ᾱ_s − σ²) in front of ε."""
    import matplotlib

    matplotlib.use("Agg")
    wrong = '''def my_ddim_step(x_t, eps, alpha_bar_t, alpha_bar_s, eta, z):
    x0 = (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t ** 0.5
    sigma = eta * ((1 - alpha_bar_s) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_s)) ** 0.5
    return alpha_bar_s ** 0.5 * x0 + (1 - alpha_bar_s) ** 0.5 * eps + sigma * z
'''
    with pytest.raises(ExerciseWrong, match="variance of x_s"):
        _run_until("08_ddim_and_fast_sampling.ipynb", "ex08_ddim_step_check", wrong)


@pytest.mark.parametrize(("wrong", "hint"), [
    ("def forward_step(x_prev, beta_t, noise):\n    return (1 - beta_t) * x_prev + beta_t * noise\n", "square roots"),
    ("def forward_step(x_prev, beta_t, noise):\n    return beta_t ** 0.5 * x_prev + (1 - beta_t) ** 0.5 * noise\n",
     "swapped"),
])
def test_hints_name_the_mistake(wrong: str, hint: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    with pytest.raises(ExerciseWrong, match=hint):
        _run_until("01_forward_process.ipynb", "ex01_forward_step_check", wrong)


def test_feedback_renders_without_a_traceback() -> None:
    rendered = ExerciseWrong("Exercise 1.1: not quite.")._render_traceback_()
    assert rendered == ["\033[31m✗ Exercise 1.1: not quite.\033[0m"]
    assert diagnose(torch.ones(2), {"first": torch.zeros(2), "second": torch.ones(2)}, "none") == "second"
    assert diagnose(torch.ones(2), {"first": torch.zeros(2)}, "none") == "none"


def test_find_the_bug_rejects_the_classmates_chain() -> None:
    """Exercise 1.4's check uses the closed form, not the library: the unfixed chain (1 − β instead of √(1 − β))
    fails it (first on the mean, which it shrinks too fast)."""
    import matplotlib

    matplotlib.use("Agg")
    buggy = '''def fixed_chain(x0, betas, generator):
    x = x0
    for beta in betas[1:].tolist():
        x = (1 - beta) * x + beta**0.5 * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return x
'''
    with pytest.raises(ExerciseWrong, match=r"How much of x_\(t-1\) does one step keep"):
        _run_until("01_forward_process.ipynb", "ex01_find_the_bug_check", buggy)


def test_find_the_bug_rejects_the_slides_variance_used_as_a_standard_deviation() -> None:
    """Exercise 3.3: the slide slip σ_t = β̃_t collapses Gaussian-data samples; the check (data, not library) sees it."""
    import matplotlib

    matplotlib.use("Agg")
    buggy = '''def fixed_slide_step(x_t, eps_pred, t, schedule, z):
    beta, alpha, alpha_bar = schedule.betas[t].item(), schedule.alphas[t].item(), schedule.alpha_bars[t].item()
    mean = (x_t - beta / (1 - alpha_bar) ** 0.5 * eps_pred) / alpha**0.5
    return mean + schedule.posterior_variances[t].item() * z if t > 1 else mean
'''
    with pytest.raises(ExerciseWrong, match="standard deviation or a variance"):
        _run_until("03_ddpm_2d.ipynb", "ex03_find_the_bug_check", buggy)


def test_find_the_bug_rejects_a_ddim_loop_that_solves_for_x0_at_the_wrong_level() -> None:
    """Exercise 8.3: x̂0 computed with √(1 − ᾱ_s) instead of √(1 − ᾱ_t) is caught by the exact flow map."""
    import matplotlib

    matplotlib.use("Agg")
    buggy = '''def fixed_ddim(eps_model, schedule, x_T, steps):
    visited = [*timestep_sequence(schedule.T, steps), 0]
    x = x_T
    for t, s in itertools.pairwise(visited):
        a_t, a_s = schedule.alpha_bars[t].item(), schedule.alpha_bars[s].item()
        eps = eps_model(x, torch.full((len(x),), t))
        x0 = (x - (1 - a_s) ** 0.5 * eps) / a_t**0.5
        x = a_s**0.5 * x0 + (1 - a_s) ** 0.5 * eps
    return x
'''
    with pytest.raises(ExerciseWrong, match="Which noise level"):
        _run_until("08_ddim_and_fast_sampling.ipynb", "ex08_find_the_bug_check", buggy)


def test_the_langevin_check_sees_the_wrong_noise_scale() -> None:
    """Exercise 4.2 is graded on the chains' stationary law (Gaussian target), which √η noise halves."""
    import matplotlib

    matplotlib.use("Agg")
    wrong = "def my_langevin_step(x, score, step_size, z):\n    return x + step_size * score + step_size ** 0.5 * z\n"
    with pytest.raises(ExerciseWrong):
        _run_until("04_score_matching.ipynb", "ex04_langevin_check", wrong)


def test_the_cfg_check_sees_an_off_by_one_scale() -> None:
    """Exercise 9.1 is graded on what scale 1 samples (the class itself): cond + s (cond − uncond), which is scale
    s + 1, overshoots and fails."""
    import matplotlib

    matplotlib.use("Agg")
    wrong = ("def my_cfg(eps_unconditional, eps_conditional, scale):\n"
             "    return eps_conditional + scale * (eps_conditional - eps_unconditional)\n")
    with pytest.raises(ExerciseWrong, match="one step beyond"):
        _run_until("09_guidance.ipynb", "ex09_cfg_check", wrong)


@pytest.mark.parametrize(("check", "wrong", "hint"), [
    ("ex13_conv_delta_check", "def my_conv_delta(down, up, scale):\n"
     "    return torch.einsum('oj,jikl->oikl', up[:, :, 0, 0], down)\n", "scale alpha / r is missing"),
    ("ex13_stack_check", "def my_stack(down1, up1, s1, down2, up2, s2):\n"
     "    return torch.cat([down1, down2]), torch.cat([up1, up2], dim=1)\n", "scales are missing"),
])
def test_lesson_13_checks_name_the_slip(check: str, wrong: str, hint: str) -> None:
    """Exercises 13.1 and 13.2: a LoRA merge without α/r, a stack without the scales."""
    import matplotlib

    matplotlib.use("Agg")
    with pytest.raises(ExerciseWrong, match=hint):
        _run_until("13_lora_finetuning.ipynb", check, wrong)
