"""Exercises for instructors: student versions of the notebooks, and check cells with friendly feedback.

The notebooks mark every solution with nbgrader's markers, inside a function that the exercise
asks for::

    # Exercise 1.1: one forward step
    def forward_step(x_prev, beta_t, noise):
        ### BEGIN SOLUTION
        return (1 - beta_t) ** 0.5 * x_prev + beta_t ** 0.5 * noise
        ### END SOLUTION

and carry nbgrader cell metadata, so an instructor can use nbgrader directly. Without nbgrader,

    python -m minidiff.classroom release notebooks/ OUTDIR

writes student versions: each solution region becomes a stub that raises ``NotImplementedError``
naming the exercise, outputs are cleared, and every other cell is kept as it is.

A check cell wraps its assertions in :func:`checking`, which turns a missing solution or a wrong
answer into a short, friendly message (and still fails, so nbgrader counts it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

BEGIN_SOLUTION = "### BEGIN SOLUTION"
END_SOLUTION = "### END SOLUTION"
_EXERCISE_TITLE = re.compile(r"^\s*#\s*(Exercise\s+[\w.]+)\s*[:—-]?\s*(.*)$", re.IGNORECASE)


class _ShortReport(AssertionError):
    """An assertion whose report in Jupyter is its message alone: the friendly sentence, not a traceback through
    contextlib and this module. (IPython shows ``_render_traceback_()`` instead of the traceback; nbgrader still
    sees a failed cell.)"""

    def _render_traceback_(self) -> list[str]:
        return [f"\033[31m✗ {self}\033[0m"]


class ExerciseNotDone(_ShortReport):
    """A check found the student's stub still in place."""


class ExerciseWrong(_ShortReport):
    """A check found an answer that does not match the reference."""


# ---------------------------------------------------------------------------------------
# Check cells
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def checking(exercise: str) -> Iterator[None]:
    """Run a check cell's assertions for ``exercise`` and report the outcome in plain words.

    * the stub is still there (``NotImplementedError``): fail with "not done yet";
    * an assertion fails: fail with "not quite", then the assertion's message;
    * anything else raises as it is (a bug is a bug);
    * success prints a tick.
    """
    try:
        yield
    except NotImplementedError as error:
        # nbgrader's own stub raises a bare NotImplementedError(); ours names the exercise
        detail = f" [{error}]" if str(error) else ""
        raise ExerciseNotDone(f"{exercise} is not done yet: write your solution in the cell above "
                              f"(where it says NotImplementedError), run that cell, then run this one again."
                              f"{detail}") from None
    except AssertionError as error:
        if isinstance(error, ExerciseNotDone | ExerciseWrong):
            raise
        raise ExerciseWrong(f"{exercise}: not quite. {error}") from None
    print(f"✓ {exercise}: correct, well done.")


def assert_close(got: torch.Tensor | float, expected: torch.Tensor | float, what: str,
                 rtol: float = 1e-4, atol: float = 1e-5, hint: str = "") -> None:
    """Assert ``got`` ≈ ``expected`` (same shape, within tolerances) with a message a student can act on."""
    got_tensor = torch.as_tensor(got)
    expected_tensor = torch.as_tensor(expected)
    if got_tensor.shape != expected_tensor.shape:
        raise AssertionError(f"{what} has shape {tuple(got_tensor.shape)}, expected {tuple(expected_tensor.shape)}. "
                             f"{hint}".strip())
    got64, expected64 = got_tensor.double().cpu(), expected_tensor.double().cpu()
    if not torch.allclose(got64, expected64, rtol=rtol, atol=atol):
        worst = (got64 - expected64).abs().max().item()
        raise AssertionError(f"{what} differs from the reference by up to {worst:.3g}. {hint}".strip())


def diagnose(got: torch.Tensor | float, mistakes: dict[str, torch.Tensor | float], otherwise: str,
             rtol: float = 1e-4, atol: float = 1e-5) -> str:
    """The hint for the first known mistake that ``got`` reproduces, else ``otherwise``.

    ``mistakes`` maps a hint to what the answer would be with that mistake, so that feedback names the slip the
    student made ("both coefficients are square roots") instead of repeating the formula.
    """
    got_tensor = torch.as_tensor(got).double().cpu()
    for hint, wrong in mistakes.items():
        wrong_tensor = torch.as_tensor(wrong).double().cpu()
        if wrong_tensor.shape == got_tensor.shape and torch.allclose(got_tensor, wrong_tensor, rtol=rtol, atol=atol):
            return hint
    return otherwise


# ---------------------------------------------------------------------------------------
# Student versions
# ---------------------------------------------------------------------------------------


def _exercise_name(lines: list[str], default: str) -> str:
    for line in lines:
        match = _EXERCISE_TITLE.match(line)
        if match:
            title = match.group(2).strip()
            return f"{match.group(1)} ({title})" if title else match.group(1)
    return default


def _is_marker(line: str, word: str) -> bool:
    """nbgrader's rule: a line that contains "BEGIN SOLUTION" (or "END SOLUTION") is a marker, whatever surrounds
    it (``## BEGIN SOLUTION``, ``# BEGIN SOLUTION  (hidden)``, …). A narrower rule would leak solutions."""
    return f"{word} SOLUTION" in line


def strip_solutions(source: str, default_name: str = "this exercise", markdown: bool = False) -> str:
    """Replace each BEGIN SOLUTION … END SOLUTION region by a stub (code: one that raises; markdown: a prompt).

    The stub keeps the indentation of the BEGIN marker, so a solution inside a function body
    leaves a valid function. Unbalanced markers are an error rather than a silent leak.
    """
    lines = source.splitlines()
    name = _exercise_name(lines, default_name)
    out: list[str] = []
    inside = False
    for number, line in enumerate(lines, start=1):
        if _is_marker(line, "BEGIN"):
            if inside:
                raise ValueError(f"line {number}: {BEGIN_SOLUTION} inside another solution region")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            out.extend(["YOUR ANSWER HERE"] if markdown else
                       [f"{indent}# YOUR CODE HERE", f"{indent}raise NotImplementedError({name!r})"])
        elif _is_marker(line, "END"):
            if not inside:
                raise ValueError(f"line {number}: {END_SOLUTION} without a matching {BEGIN_SOLUTION}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{BEGIN_SOLUTION} without a matching {END_SOLUTION}")
    return "\n".join(out)


def _is_solution_cell(cell: dict) -> bool:
    return bool(cell.get("metadata", {}).get("nbgrader", {}).get("solution"))


def has_solutions(notebook: dict) -> bool:
    """True if any cell holds a solution: a BEGIN SOLUTION marker or nbgrader's ``solution`` metadata."""
    return any(_is_solution_cell(cell) or _is_marker(_source(cell), "BEGIN") for cell in notebook["cells"])


def _source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def release_notebook(notebook: dict) -> dict:
    """Return the student version of a notebook (as parsed JSON): solutions stubbed, outputs cleared.

    As nbgrader does: marked regions become stubs, in code and markdown cells alike; a cell that nbgrader's metadata
    calls a solution but that has no markers is replaced whole.
    """
    released = json.loads(json.dumps(notebook))  # a deep copy that keeps the format exactly
    for cell in released["cells"]:
        source, markdown = _source(cell), cell["cell_type"] == "markdown"
        if _is_marker(source, "BEGIN"):
            source = strip_solutions(source, markdown=markdown)
        elif _is_solution_cell(cell):
            name = _exercise_name(source.splitlines(), "this exercise")
            source = "YOUR ANSWER HERE" if markdown else f"# YOUR CODE HERE\nraise NotImplementedError({name!r})"
        cell["source"] = source.splitlines(keepends=True)
        if cell["cell_type"] == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    return released


def release(source_dir: Path, output_dir: Path, overwrite: bool = False) -> list[Path]:
    """Write the student version of every ``*.ipynb`` in ``source_dir`` into ``output_dir``; return the paths.

    Nothing is written unless every notebook can be: an existing output notebook is kept unless ``overwrite``, and
    one that holds solutions (an instructor's file) is never overwritten. A source without any solution is
    refused too: it is already a student version, and the two folders were probably given the wrong way round.
    """
    source_dir, output_dir = Path(source_dir), Path(output_dir)
    notebooks = sorted(source_dir.glob("*.ipynb"))
    if not notebooks:
        raise ValueError(f"no notebooks (*.ipynb) found in {source_dir}")
    if output_dir.resolve() == source_dir.resolve():
        raise ValueError("the output folder must differ from the source folder (it would overwrite the solutions)")
    parsed = {path: json.loads(path.read_text(encoding="utf-8")) for path in notebooks}
    if not any(has_solutions(notebook) for notebook in parsed.values()):
        raise ValueError(f"no solutions found in {source_dir}: it looks like student versions already. Did you swap "
                         "the folders? The usage is: release INSTRUCTOR_NOTEBOOKS STUDENT_FOLDER")
    for path in notebooks:
        target = output_dir / path.name
        if target.exists():
            if has_solutions(json.loads(target.read_text(encoding="utf-8"))):
                raise ValueError(f"refusing to overwrite {target}: it contains solutions (an instructor's notebook). "
                                 "Did you swap the folders?")
            if not overwrite:
                raise ValueError(f"{target} exists; pass --overwrite to replace the student versions in {output_dir}")
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path, notebook in parsed.items():
        target = output_dir / path.name
        target.write_text(json.dumps(release_notebook(notebook), indent=1, ensure_ascii=False) + "\n",
                          encoding="utf-8")
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m minidiff.classroom release SOURCE_DIR OUTPUT_DIR``."""
    parser = argparse.ArgumentParser(prog="python -m minidiff.classroom", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    release_parser = commands.add_parser("release", help="write student versions of the notebooks")
    release_parser.add_argument("source", type=Path, help="folder with the instructor's notebooks")
    release_parser.add_argument("output", type=Path, help="folder for the student notebooks")
    release_parser.add_argument("--overwrite", action="store_true",
                                help="replace student notebooks already in OUTPUT (never an instructor's)")
    arguments = parser.parse_args(argv)
    try:
        written = release(arguments.source, arguments.output, arguments.overwrite)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
