"""The student's path in a real browser: JupyterLab (the pinned version) on a loopback port with a
token, driven by Playwright in Debian's Chromium. The student answers two questions, runs all
cells and sees a stub message, a passing and a failing public check, and the plots; the reference
answers pass every public check. Screenshots go to out/browser/; the Run All time and the XOR
cell's time go to out/browser/timings.json (measured, never asserted)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import nbformat
import pytest

from student_notebooks import NOTEBOOK, student_folder

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / "out" / "browser"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
# Every cell in the page (no virtual scrolling), execution times recorded in the saved notebook,
# and no news or update pop-ups over the notebook.
LAB_SETTINGS = {
    "notebook-extension/tracker": {"windowingMode": "none", "recordTiming": True},
    "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
}
RUN_WAIT_MS = 600_000

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (./run installs it as root)")]

ANSWER_Q1_1 = """x = torch.tensor(3.0)
y = torch.tensor(7.0)
z = x * y
A = nn.init.uniform_(torch.empty(3, 3), a=-1.0, b=1.0)
b = nn.init.uniform_(torch.empty(3, 1), a=-1.0, b=1.0)
c = A @ b
d = np.array([[1], [2], [3]])
print(c)
c = c + d
print(c)"""
# A classic mistake: the derivative computed from x, although the function receives the activation.
WRONG_ANSWER_Q1_2 = '''def my_sigmoid(x):
    return 1 / (1 + torch.exp(-x))


def my_sigmoid_grad(a):
    return my_sigmoid(a) * (1 - my_sigmoid(a))'''

RUN_FINISHED = """() => {
  const status = document.querySelector('#jp-main-statusbar')?.textContent || '';
  const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(p => p.textContent);
  return status.includes('Idle') && !prompts.some(t => t.includes('*'));
}"""
RUN_STARTED = "() => [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].some(p => p.textContent.includes('*'))"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on 127.0.0.1 with a token, serving a fresh folder; yields (url, folder)."""
    home = tmp_path_factory.mktemp("lab_home")
    served = tmp_path_factory.mktemp("lab_root")
    for name, values in LAB_SETTINGS.items():
        path = home / "settings" / "@jupyterlab" / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values), encoding="utf-8")
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(home / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
               JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_DATA_DIR=str(home / "data"),
               JUPYTER_RUNTIME_DIR=str(home / "runtime"), IPYTHONDIR=str(home / "ipython"))
    log = (home / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
                               f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
                               f"--ServerApp.root_dir={served}"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (home / "server.log").read_text()
                time.sleep(0.5)
        yield lambda path: f"{url}/lab/tree/{path}?token={token}", served
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium_profile")), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1000})
        yield context
        context.close()


def _open(browser, url: str):
    page = browser.new_page()
    page.goto(url)
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
    page.wait_for_function("() => (document.querySelector('#jp-main-statusbar')?.textContent || '').includes('Idle')",
                           timeout=120_000)
    return page


def _run_all(page) -> float:
    """Run > Run All Cells, as the student clicks it; the seconds until the kernel is idle again."""
    page.get_by_role("menuitem", name="Run", exact=True).click()
    started = time.monotonic()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    page.wait_for_function(RUN_STARTED, timeout=60_000, polling=100)
    page.wait_for_function(RUN_FINISHED, timeout=RUN_WAIT_MS, polling=200)
    return time.monotonic() - started


def _cells(page, notebook: nbformat.NotebookNode) -> dict[str, object]:
    """The page's cells by nbgrader grade_id (the page shows the notebook's cells in order)."""
    cells = page.locator(".jp-Notebook .jp-Cell")
    assert cells.count() == len(notebook.cells)
    return {c.metadata["nbgrader"]["grade_id"]: cells.nth(i) for i, c in enumerate(notebook.cells)}


def _type_answer(page, cell, text: str) -> None:
    """Replace the cell's code with `text`, as a student pasting an answer."""
    cell.locator(".cm-content").click()
    page.keyboard.press("Control+a")
    page.keyboard.insert_text(text)
    page.keyboard.press("Escape")


def _save(page, path: Path, expected: str) -> nbformat.NotebookNode:
    page.keyboard.press("Control+s")
    for _ in range(120):
        text = path.read_text(encoding="utf-8")
        if expected in text and '"execution"' in text:
            return nbformat.reads(text, as_version=4)
        time.sleep(0.25)
    raise AssertionError(f"{path} was not saved with {expected!r}")


def _shot(locator, tmp_path: Path, name: str) -> Path:
    locator.scroll_into_view_if_needed()
    path = tmp_path / name
    locator.screenshot(path=str(path))
    SHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, SHOTS / name)
    return SHOTS / name


def _seconds(cell: nbformat.NotebookNode) -> float:
    timing = cell.metadata["execution"]
    return (datetime.fromisoformat(timing["shell.execute_reply"]) - datetime.fromisoformat(timing["iopub.execute_input"])).total_seconds()


def _record(name: str, value: float) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / "timings.json"
    timings = json.loads(path.read_text()) if path.exists() else {}
    timings[name] = round(value, 2)
    path.write_text(json.dumps(timings, indent=1, sort_keys=True) + "\n")
    print(f"{name}: {value:.1f} s")


def test_student_answers_two_questions_and_runs_all(lab, browser, tmp_path):
    url_of, served = lab
    notebook_path = student_folder(ROOT, served / "student")
    notebook = nbformat.read(notebook_path, as_version=4)
    page = _open(browser, url_of(f"student/{NOTEBOOK}"))
    cells = _cells(page, notebook)
    _type_answer(page, cells["q1_1_tensors"], ANSWER_Q1_1)
    _type_answer(page, cells["q1_2_sigmoid"], WRONG_ANSWER_Q1_2)
    _run_all(page)

    passed = cells["q1_1_check"].locator(".jp-OutputArea-output")
    assert passed.locator("p.public-check[data-status=passed]").count() == 1
    assert passed.inner_text().startswith("q1_1 passed: x, y, z, A, b and c have the right types and shapes")
    assert cells["q1_2_plot"].locator(".jp-OutputArea-output img").count() == 1, "the activation plot is drawn"
    failed = cells["q1_2_check"].locator(".jp-OutputArea-output")
    assert failed.locator("p.public-check[data-status=failed]").count() == 1
    assert failed.inner_text() == ("q1_2 failed: my_sigmoid_grad(a) should be a * (1 - a): "
                                   "it receives the activation, not x")
    stub = cells["q1_3_autograd"].locator(".jp-OutputArea-output")
    assert "NotImplementedError: q1_3: replace this line with your answer" in stub.inner_text()
    # JupyterLab's Run All stops at the first error: later cells have not run.
    assert cells["q1_4_check"].locator(".jp-OutputArea-output").count() == 0
    shown = "\n".join(page.locator(".jp-OutputArea-output").all_inner_texts())
    assert "public_checks.py" not in shown and "PublicCheckFailed" not in shown

    _shot(cells["q1_1_check"], tmp_path, "student_q1_1_passed.png")
    _shot(cells["q1_2_plot"], tmp_path, "student_q1_2_plot.png")
    _shot(cells["q1_2_check"], tmp_path, "student_q1_2_failed.png")
    _shot(cells["q1_3_autograd"], tmp_path, "student_q1_3_stub.png")
    page.screenshot(path=str(tmp_path / "student_page.png"))
    shutil.copy(tmp_path / "student_page.png", SHOTS / "student_page.png")

    # The saved notebook, checked from a terminal with the same checks.
    _save(page, notebook_path, "x = torch.tensor(3.0)")
    done = subprocess.run([sys.executable, "public_checks.py", NOTEBOOK], cwd=notebook_path.parent,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stdout + done.stderr
    statuses = {line.split()[0]: line.split()[1] for line in done.stdout.splitlines() if line.startswith("q1_")}
    assert statuses == {"q1_1": "passed", "q1_2": "failed", "q1_3": "not", "q1_4": "not"}, done.stdout


def test_reference_answers_pass_every_public_check(lab, browser, tmp_path):
    url_of, served = lab
    notebook_path = student_folder(ROOT, served / "reference", answered=True)
    notebook = nbformat.read(notebook_path, as_version=4)
    page = _open(browser, url_of(f"reference/{NOTEBOOK}"))
    cells = _cells(page, notebook)
    seconds = _run_all(page)

    check_cells = [g for g in cells if g.endswith("_check")]
    verdicts = {g: cells[g].locator("p.public-check").get_attribute("data-status") for g in check_cells}
    assert len(verdicts) == 14 and set(verdicts.values()) == {"passed"}, verdicts
    # stderr holds warnings only (NumPy's about torch + ndarray in q1_1), never an error.
    stderr = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").all_inner_texts()
    assert not [t for t in stderr if "Traceback" in t or "Error" in t], stderr
    for plot in ("q1_2_plot", "q1_3_plot", "q2_2_plot", "q2_4_plot", "q2_6_plot"):
        assert cells[plot].locator(".jp-OutputArea-output img").count() == 1, plot
    assert cells["q2_8_plots"].locator(".jp-OutputArea-output img").count() == 3
    assert "Accuracy: 1.00" in cells["q3_3_train"].inner_text()

    _shot(cells["q2_2_plot"], tmp_path, "reference_q2_2_plot.png")
    _shot(cells["q3_3_check"], tmp_path, "reference_q3_3_passed.png")
    saved = _save(page, notebook_path, '"execution"')
    xor = next(c for c in saved.cells if c.metadata.get("nbgrader", {}).get("grade_id") == "q3_3_train")
    _record("jupyterlab_run_all_reference_s", seconds)
    _record("jupyterlab_xor_cell_s", _seconds(xor))
