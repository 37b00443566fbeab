"""``python -m minidiff.course``: open the course in JupyterLab, notebooks and lessons side by side.

JupyterLab starts at the repository's root, so both ``notebooks/`` and ``lessons/`` are in its file browser and
the notebooks' links to their lessons work; it opens lesson 01's notebook first; and a lesson (Markdown) opens
rendered, with its LaTeX, instead of as raw text (``jupyter_settings/overrides.json``, passed as JupyterLab's
application settings, which change no setting of your own). Any further arguments go to ``jupyter lab``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = Path(__file__).resolve().parent / "jupyter_settings"
FIRST_NOTEBOOK = "notebooks/01_forward_process.ipynb"


def lab_command(extra: list[str] | None = None, root: Path = ROOT) -> list[str]:
    """The ``jupyter lab`` command line that opens the course at ``root`` (the repository; a copy of its notebooks
    and lessons for the browser test) (see the module doc)."""
    if not (root / FIRST_NOTEBOOK).exists():
        raise ValueError(f"the course's notebooks are not at {root} ({root / FIRST_NOTEBOOK} is missing): "
                         "run from a clone of the repository, installed with pip install -e .")
    return [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={root}",
            f"--LabApp.app_settings_dir={SETTINGS}", f"--LabApp.default_url=/lab/tree/{FIRST_NOTEBOOK}",
            *(extra or [])]


def main(argv: list[str] | None = None) -> int:
    """Start JupyterLab on the course (``--print`` shows the command instead of running it)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    command = lab_command([a for a in arguments if a != "--print"])
    if "--print" in arguments:
        print(" ".join(command))
        return 0
    if shutil.which("jupyter") is None and subprocess.run([sys.executable, "-c", "import jupyterlab"],
                                                           capture_output=True).returncode:
        print("JupyterLab is not installed: pip install -e '.[dev]' (or jupyterlab)", file=sys.stderr)
        return 2
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
