"""Helpers shared by the notebook tests: where the notebooks are and how to read their cells."""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
LESSONS = sorted((ROOT / "lessons").glob("*.md"))


def cell_source(cell: dict) -> str:
    source = cell["source"]
    return "".join(source) if isinstance(source, list) else source


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def nbgrader(cell: dict) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def only_displays(source: str) -> bool:
    """A cell that only shows an interactive widget or an HTML animation: running it outside Jupyter proves nothing."""
    return "ipywidgets.interact" in source or "HTML(" in source
