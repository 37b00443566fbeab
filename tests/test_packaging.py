"""The set-up files agree with each other, and CI runs exactly the README's test command."""

import re

import pytest
import tomllib
import yaml

from tests.notebook_tools import ROOT

CONDA_NAMES = {"torch": "pytorch"}  # PyPI name -> conda-forge name where they differ


def requirement_parts(requirement: str) -> tuple[str, str]:
    match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(.*)", requirement.strip())
    assert match, requirement
    return match.group(1).lower(), match.group(2).replace(" ", "")


def test_environment_yml_matches_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = dict(requirement_parts(d) for d in environment["dependencies"] if isinstance(d, str))
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    for name, spec in map(requirement_parts, wanted):
        conda_name = CONDA_NAMES.get(name, name)
        assert conda_name in conda, f"environment.yml lacks {conda_name} (pyproject asks for {name}{spec})"
        assert conda[conda_name] == spec, \
            f"{conda_name}: environment.yml says {conda[conda_name]!r}, pyproject {spec!r}"
    pip_section = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    assert '-e ".[dev]"' in pip_section or "-e .[dev]" in pip_section
    assert conda["python"] == "=3.11"


def readme_block(heading: str) -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split(heading, 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.strip().splitlines() if line and not line.startswith("#")]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    (test_command,) = readme_block("### Test")
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines, f".ci/run must run the README's test command verbatim: {test_command}"


def test_readme_has_one_setup_and_one_open_command() -> None:
    assert len(readme_block("### Set up")) == 1
    assert readme_block("### Open the course") == ["python -m minidiff.course"]


def test_docstring_equation_numbers_exist_in_their_lessons() -> None:
    """Every "lesson NN, eq. K" in the library names an equation that lesson tags as (K)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    tags = {path.name[:2]: set(re.findall(r"\\tag\{([^}]+)\}", path.read_text(encoding="utf-8")))
            for path in (root / "lessons").glob("*.md")}
    missing = [f"{path.name}: {match.group(0)}" for path in sorted((root / "minidiff").glob("*.py"))
               for match in re.finditer(r"lesson (\d\d), eqs?\. ([0-9][0-9a-z]*)", path.read_text(encoding="utf-8"))
               if match.group(2) not in tags.get(match.group(1), set())]
    assert not missing, missing


def test_the_course_opens_at_the_root_with_lessons_rendered_and_linked() -> None:
    """The open command serves the repository's root (so lessons/ is reachable), opens notebook 01, and makes
    Markdown open as a rendered preview; every notebook's first cell links to its lesson."""
    import json as json_module
    from pathlib import Path

    from minidiff.course import SETTINGS, lab_command

    command = lab_command()
    root = Path(__file__).resolve().parent.parent
    assert f"--ServerApp.root_dir={root}" in command
    assert any(part.endswith("/lab/tree/notebooks/01_forward_process.ipynb") for part in command)
    overrides = json_module.loads((SETTINGS / "overrides.json").read_text(encoding="utf-8"))
    assert overrides["@jupyterlab/docmanager-extension:plugin"]["defaultViewers"]["markdown"] == "Markdown Preview"
    for notebook in sorted((root / "notebooks").glob("*.ipynb")):
        first = "".join(json_module.loads(notebook.read_text(encoding="utf-8"))["cells"][0]["source"])
        assert f"(../lessons/{notebook.stem}.md)" in first, notebook.name
        assert (root / "lessons" / f"{notebook.stem}.md").exists()


def test_the_lessons_exact_tables_reproduce(monkeypatch: pytest.MonkeyPatch) -> None:
    """python -m minidiff.tables recomputes the lessons' oracle tables; a figure that no longer holds fails it."""
    import dataclasses

    from minidiff import tables

    assert tables.main(["--list"]) == 0
    assert tables.main([]) == 0
    # plant a wrong published figure (as if the lesson claimed Heun's error at 10 steps were DDIM's): the rerun
    # must flag it (on the quickest table: rerunning lesson 09's tilt for this took 13 s of CI)
    planted = dataclasses.replace(tables.TABLES["lesson08-orders"],
                                  published=dict(tables.TABLES["lesson08-orders"].published, **{"heun 10": 0.06}))
    monkeypatch.setitem(tables.TABLES, "lesson08-orders", planted)
    assert tables.main(["lesson08-orders"]) == 1


def printed_numbers(text: str) -> list[tuple[float, float]]:
    """Every number printed in a lesson, as (value, half a unit of its last printed digit): '1.66' gives
    (1.66, 0.005), '8.4%' (0.084, 0.0005), '3.9e-4' (3.9e-4, 5e-6)."""
    numbers = []
    for match in re.finditer(r"(?<![\w.])(-?)(\d+)(?:\.(\d+))?(?:e(-?\d+))?(%?)", text.replace("\u2212", "-")):
        sign, whole, decimals, exponent, percent = match.groups()
        scale = 10.0 ** int(exponent or 0) / (100 if percent else 1)
        value = float(f"{sign}{whole}.{decimals or 0}") * scale
        numbers.append((value, 0.5 * 10.0 ** -len(decimals or "") * scale))
    return numbers


def test_every_published_table_figure_is_printed_in_its_lesson() -> None:
    """What minidiff.tables checks a rerun against is what the lessons print: each published figure appears in its
    lesson, rounded as printed (half a unit of the last digit, plus the rounding of the published figure itself).
    A lesson edited without its table (or the reverse) fails here."""
    from minidiff import tables

    for table in tables.TABLES.values():
        lesson_files = re.findall(r"\d\d_\w+\.md", table.lesson)
        assert lesson_files, table.lesson
        numbers = [n for name in lesson_files for n in printed_numbers((ROOT / "lessons" / name).read_text())]
        for key, figure in table.published.items():
            # a printed number matches if the figure rounds to it; it must carry two significant digits or more
            matches = [value for value, half_unit in numbers
                       if abs(figure - value) <= 1.2 * half_unit + 1e-12 and half_unit <= 0.05 * abs(figure) + 5e-4]
            assert matches, f"{table.name}: {key} = {figure:g} is printed nowhere in {', '.join(lesson_files)}"


@pytest.mark.parametrize("name", ["lesson03-toys", "lesson04-ncsn", "lesson07-training", "lesson09-guidance-sweep",
                                  "lesson09-thresholding", "lesson08-mnist", "lesson10-text", "lesson11-latent"])
def test_the_trained_network_tables_produce_every_published_figure(name: str) -> None:
    """The --trained tables of lessons 03, 04, 07-11 run (fast mode: a few training steps and a handful of samples,
    so the figures are noise or null) and produce every figure their lesson publishes, under the same names."""
    from minidiff import tables

    table = tables.TABLES[name]
    assert table.trained and set(table.compute()) == set(table.published)


def test_a_notebook_table_rerun_prints_what_the_notebook_prints() -> None:
    """``python -m minidiff.tables lesson04-ncsn`` repeats notebook 04's cells with their seeds: run both (fast mode,
    CPU) and the notebook's printed energy ratio and log-densities must be the rerun's, digit for digit."""
    import nbformat
    from nbclient import NotebookClient

    from minidiff import tables

    notebook = nbformat.read(ROOT / "notebooks" / "04_score_matching.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    printed = "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", []))
    ratio = re.search(r"energy: samples vs data .* ratio ([\d.]+)", printed)
    log_densities = re.search(r"log-likelihood under the data: samples ([-\d.]+), data ([-\d.]+)", printed)
    assert ratio and log_densities, printed[-2000:]
    rerun = tables.TABLES["lesson04-ncsn"].compute()
    assert f"{rerun['energy ratio']:.2f}" == ratio.group(1)
    assert f"{rerun['samples log-density']:.3f}" == log_densities.group(1)
    assert f"{rerun['data log-density']:.3f}" == log_densities.group(2)
