"""The course as a student meets it: JupyterLab in a real (headless) Chromium, driven by Selenium.

Runs only where Debian's ``chromium`` and ``chromium-driver`` are installed (``.ci/run`` installs them; elsewhere
these tests are skipped, with the reason). Select them alone with ``pytest -m browser``. The server serves a copy
of ``notebooks/`` and ``lessons/``, in fast mode, so that JupyterLab's autosave never touches the repository.

What is checked: each notebook in ``BROWSER_NOTEBOOKS`` runs all its cells in the browser with no error output, no
"Error displaying widget" and no uncaught page error; a slider redraws its figure; a lesson opens rendered, its
LaTeX typeset by MathJax.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from minidiff.course import ROOT, lab_command

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                 reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
                                        "chromium-driver); .ci/run installs them")]

#: The notebooks run in the browser: lesson 01 (formulas, animation) and lesson 13 (a slider), to keep CI short.
BROWSER_NOTEBOOKS = ("01_forward_process", "13_lora_finetuning")
TOKEN = "minidiff-browser-test"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A JupyterLab server on a copy of the course, in fast mode; yields its base URL and the copy's folder."""
    root = tmp_path_factory.mktemp("course")
    for folder in ("notebooks", "lessons"):
        shutil.copytree(ROOT / folder, root / folder)
    port = _free_port()
    command = lab_command([f"--port={port}", "--no-browser", f"--IdentityProvider.token={TOKEN}",
                           "--ServerApp.ip=127.0.0.1", "--allow-root"], root=root)
    log = open(root / "server.log", "w")
    # the test session's MPLBACKEND=Agg (conftest.py) must not reach the kernel: it would draw no figure at all
    env = {key: value for key, value in os.environ.items() if key != "MPLBACKEND"} | {"MINIDIFF_FAST": "1"}
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    log_text = (root / "server.log").read_text()[-3000:]
                    raise RuntimeError(f"JupyterLab did not start: {log_text}") from None
                time.sleep(0.5)
        yield url, root
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Headless Chromium with the flags this machine's closed network needs, logging the page's console."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(condition: Callable[[], Any], timeout: float, what: str, poll: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _kernel_busy(url: str) -> bool:
    """Whether any kernel of the server is running code (the server's own record, not the page's)."""
    with urllib.request.urlopen(f"{url}/api/kernels?token={TOKEN}", timeout=5) as reply:
        return any(kernel["execution_state"] != "idle" for kernel in json.load(reply))


def _menu(driver, menu: str, command: str) -> None:
    """Click ``menu`` in JupyterLab's menu bar, then its item for ``command``."""
    from selenium.webdriver.common.by import By

    _wait(lambda: [item for item in driver.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-item")
                   if item.text.strip() == menu], 60, f"the {menu} menu")[0].click()
    _wait(lambda: driver.find_elements(By.CSS_SELECTOR, f"li[data-command='{command}']"), 10, command)[0].click()


def _page_errors(driver) -> list[str]:
    """Uncaught exceptions in the page (network noise of a closed machine is not counted)."""
    return [entry["message"] for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE" and "Uncaught" in entry["message"]]


def run_notebook_in_browser(driver, url: str, root: Path, name: str,
                            then: Callable[[Any], None] | None = None) -> None:
    """Open ``notebooks/NAME.ipynb``, run all cells from the Run menu, wait for the kernel to finish, save from
    the File menu, and fail on any cell left unrun, any error output (read back from the saved file, so cells out
    of view count too), a widget that failed to display, or an uncaught page error. ``then(driver)`` runs once
    the cells have run, before the save."""
    from selenium.webdriver.common.by import By

    path = root / "notebooks" / f"{name}.ipynb"
    saved_before = path.stat().st_mtime
    # a workspace of its own, reset: only this notebook is open (a widget of another tab cannot be mistaken for ours)
    driver.get(f"{url}/lab/workspaces/{name}/tree/notebooks/{name}.ipynb?reset&token={TOKEN}")
    _wait(lambda: driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell"), 90, f"{name} to open")
    _wait(lambda: driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook-ExecutionIndicator[data-status='idle']"),
          90, "the kernel to start")
    _menu(driver, "Run", "runmenu:run-all")
    _wait(lambda: _kernel_busy(url), 30, "the kernel to start running", poll=0.1)
    quiet_since = time.monotonic()
    deadline = time.monotonic() + 240
    while time.monotonic() - quiet_since < 5:  # idle for 5 s in a row: run-all has finished (or stopped)
        assert time.monotonic() < deadline, f"{name} was still running after 240 s"
        if _kernel_busy(url):
            quiet_since = time.monotonic()
        time.sleep(0.25)
    if then is not None:
        then(driver)
    _menu(driver, "File", "docmanager:save")
    _wait(lambda: path.stat().st_mtime > saved_before, 30, f"{name} to be saved")
    cells = [cell for cell in json.loads(path.read_text(encoding="utf-8"))["cells"] if cell["cell_type"] == "code"]
    unrun = [k for k, cell in enumerate(cells) if cell["execution_count"] is None]
    errors = [f"cell {k}: {output.get('ename')}: {output.get('evalue')}" for k, cell in enumerate(cells)
              for output in cell["outputs"] if output["output_type"] == "error"
              or (output.get("name") == "stderr" and "Traceback" in "".join(output["text"]))]
    assert not errors, f"{name}: error output in the browser:\n" + "\n".join(errors)
    assert not unrun, f"{name}: code cells {unrun} never ran"
    figures = sum("image/png" in output.get("data", {}) for cell in cells for output in cell["outputs"])
    assert figures >= 3, f"{name}: only {figures} figures were displayed"
    page = driver.find_element(By.CSS_SELECTOR, "body").get_attribute("textContent")
    assert "Error displaying widget" not in page, f"{name}: a widget failed to display"
    assert not (uncaught := _page_errors(driver)), f"{name}: page errors {uncaught}"


def move_the_strength_slider(driver) -> None:
    """Notebook 13's LoRA-strength slider: its first figure is there, and one step of the slider redraws it."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    def strength_handles() -> list:
        # the widget view is built from comm messages after the kernel goes idle, and a cell far below the view may
        # be drawn only once scrolled to: bring the slider's cell into view, then look (CI once looked too early)
        driver.execute_script("""
            for (const cell of document.querySelectorAll('.jp-Notebook .jp-CodeCell')) {
                if (cell.textContent.includes('interact(show_strength')) { cell.scrollIntoView({block: 'center'}); }
            }""")
        try:
            return [handle for handle in driver.find_elements(By.CSS_SELECTOR, ".widget-interact .noUi-handle")
                    if "strength" in handle.find_element(By.XPATH, "ancestor::div[contains(@class, 'widget-slider')]")
                    .get_attribute("textContent")]
        except StaleElementReferenceException:  # redrawn while we looked: look again
            return []

    try:
        handles = _wait(strength_handles, 60, "the strength slider to render")
    except AssertionError as timeout:
        outputs = driver.execute_script("""
            return [...document.querySelectorAll('.jp-Notebook .jp-CodeCell')]
                .filter(cell => cell.textContent.includes('interact(show_strength'))
                .map(cell => (cell.querySelector('.jp-OutputArea') || cell).textContent.slice(0, 300));""")
        raise AssertionError(f"the strength slider did not render; its cell's output reads {outputs}") from timeout
    assert len(handles) == 1, f"{len(handles)} strength sliders rendered, one expected"
    handle = handles[0]
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", handle)
    output = handle.find_element(By.XPATH, "ancestor::div[contains(@class, 'widget-interact')]").find_element(
        By.CSS_SELECTOR, ".widget-output")
    _wait(lambda: "<img" in output.get_attribute("innerHTML"), 30, "the slider's first figure")
    before = output.get_attribute("innerHTML")
    start = time.monotonic()
    handle.click()
    handle.send_keys(Keys.ARROW_RIGHT)
    _wait(lambda: output.get_attribute("innerHTML") != before and "<img" in output.get_attribute("innerHTML"),
          30, "the slider's figure to redraw", poll=0.05)
    print(f"slider redraw: {time.monotonic() - start:.2f} s")


#: What to do in a notebook once its cells have run.
AFTER_RUN = {"13_lora_finetuning": move_the_strength_slider}


@pytest.mark.parametrize("name", BROWSER_NOTEBOOKS)
def test_a_notebook_runs_in_the_browser_without_errors(lab: tuple[str, Path], browser, name: str) -> None:
    run_notebook_in_browser(browser, *lab, name, AFTER_RUN.get(name))


def test_a_lesson_opens_rendered_with_its_math(lab: tuple[str, Path], browser) -> None:
    """A double-click on a lesson opens JupyterLab's Markdown preview (the course's settings), and MathJax
    typesets its formulas."""
    from selenium.webdriver.common.by import By

    browser.get(f"{lab[0]}/lab/workspaces/lesson/tree/lessons/01_forward_process.md?reset&token={TOKEN}")
    # MathJax typesets progressively: wait for more than 20 formulas (lesson 01 has 92), not for the first one
    _wait(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".jp-RenderedMarkdown mjx-container")) > 20, 60,
          "more than 20 typeset formulas in the lesson")
    assert not browser.find_elements(By.CSS_SELECTOR, ".jp-FileEditor"), "the lesson opened as raw text"
