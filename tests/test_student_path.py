"""The student's self-check, from the release folder alone: `check()`, `check_all()`, otter's
spelling, and `python public_checks.py NOTEBOOK`."""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from IPython.core.formatters import DisplayFormatter
from packaging.requirements import Requirement

from student_notebooks import NOTEBOOK, student_folder

ROOT = Path(__file__).resolve().parents[1]
RELEASE = ROOT / "release" / "vanishing_gradients"
STUDENT_INSTALL = ("jupyterlab", "torch", "matplotlib")  # the README's student install
QUESTIONS_WITH_CHECKS = 14

# Run before anything else in the self-check's processes (the script and its kernel): the
# project's own packages cannot be imported there, as on a student's machine.
NO_PROJECT_PACKAGES = '''
import importlib.abc, sys
class _NotOnAStudentsMachine(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("gradelab", "nbgrader", "reference_solutions"):
            raise ImportError(f"{name} is not on a student's machine")
sys.meta_path.insert(0, _NotOnAStudentsMachine())
'''


def _release_module(name: str):
    spec = importlib.util.spec_from_file_location(f"release_{name}", RELEASE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def public_checks():
    return _release_module("public_checks")


SIGMOID = "import torch\ndef my_sigmoid(x):\n    return 1 / (1 + torch.exp(-x))\n"


def _in_notebook(public_checks, code: str, expression: str):
    """Run `code` and then `expression` in one namespace, as cells and a check cell of a notebook."""
    namespace = {"check": public_checks.check, "check_all": public_checks.check_all,
                 "Notebook": public_checks.Notebook}
    exec(code, namespace)
    exec(f"_result = {expression}", namespace)
    return namespace["_result"]


def _shown(result) -> dict[str, str]:
    """What Jupyter displays for a cell's value: its mime bundle."""
    bundle, _ = DisplayFormatter().format(result)
    return bundle


def test_failing_check_is_a_short_summary_with_the_hint(public_checks):
    result = _in_notebook(public_checks, SIGMOID + "def my_sigmoid_grad(a):\n    return my_sigmoid(a) * (1 - my_sigmoid(a))\n",
                          'check("q1_2")')
    assert (result.status, result.passed, result.passed_all) == ("failed", False, False)
    shown = _shown(result)
    assert shown["text/plain"] == ("q1_2 failed: my_sigmoid_grad(a) should be a * (1 - a): "
                                   "it receives the activation, not x")
    assert "q1_2 failed" in shown["text/html"] and "it receives the activation, not x" in shown["text/html"]
    assert "Traceback" not in shown["text/plain"] + shown["text/html"]


def test_passing_and_unanswered_checks(public_checks):
    passing = _in_notebook(public_checks, SIGMOID + "def my_sigmoid_grad(a):\n    return a * (1 - a)\n", 'check("q1_2")')
    assert passing.passed and _shown(passing)["text/plain"].startswith("q1_2 passed: ")
    stub = 'def my_sigmoid(x):\n    raise NotImplementedError("q1_2: replace this line with your answer")\nmy_sigmoid_grad = my_sigmoid\n'
    unanswered = _in_notebook(public_checks, stub, 'check("q1_2")')
    assert unanswered.status == "not answered" and "`my_sigmoid` is not answered yet" in unanswered.message


def test_an_error_in_the_students_code_is_reported_not_raised(public_checks):
    result = _in_notebook(public_checks, SIGMOID + "def my_sigmoid_grad(a):\n    return a.no_such_method()\n",
                          'check("q1_2")')
    assert result.status == "failed"
    assert result.message.startswith("calling your code raised AttributeError:")
    unknown = _in_notebook(public_checks, "", 'check("q9_9")')
    assert unknown.status == "failed" and "q1_1" in unknown.message


def test_otter_spelling_gives_the_same_results(public_checks):
    # A notebook written for otter, with `import public_checks as otter` for `import otter`.
    code = SIGMOID + "def my_sigmoid_grad(a):\n    return a * (1 - a)\ngrader = otter.Notebook('nb.ipynb', tests_dir='./tests')\n"
    code = f"import sys\notter = sys.modules[{public_checks.__name__!r}]\n" + code
    assert _in_notebook(public_checks, code, 'grader.check("q1_2")') == _in_notebook(public_checks, code, 'check("q1_2")')
    table = _in_notebook(public_checks, code, "grader.check_all()")
    assert table == _in_notebook(public_checks, code, "check_all()")
    assert [r.question for r in table.results][:2] == ["q1_1", "q1_2"] and len(table.results) == QUESTIONS_WITH_CHECKS
    statuses = {r.question: r.status for r in table.results}
    assert statuses["q1_2"] == "passed" and statuses["q1_1"] == "not answered" and not table.passed_all
    result = _in_notebook(public_checks, code, 'grader.check("q1_2")')
    assert (result.name, result.passed_all, result.summary()) == ("q1_2", True, repr(result))
    shown = _shown(table)
    assert "<table" in shown["text/html"] and "1 of 14 questions pass" in shown["text/plain"]


XOR_THREADS = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from vanishing_helpers import xor_problem
seen = []
class Probe(torch.nn.Module):
    def __init__(self, fail=False):
        super().__init__()
        self.linear, self.fail = torch.nn.Linear(2, 1), fail
    def forward(self, x):
        seen.append(torch.get_num_threads())
        if self.fail:
            raise ValueError("broken model")
        return self.linear(x)
torch.set_num_threads(2)
xor_problem(Probe(), steps=3, verbose=False)
after = torch.get_num_threads()
try:
    xor_problem(Probe(fail=True), steps=3, verbose=False)
except ValueError:
    pass
print(seen[:3], after, seen[3:], torch.get_num_threads())
"""


def test_xor_training_uses_one_thread_and_restores_the_callers():
    # In a process of its own: a test process that ran torch with two threads deadlocks the
    # sandboxes later tests fork.
    done = subprocess.run([sys.executable, "-c", XOR_THREADS, str(RELEASE)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # Three training steps on one thread; the caller's two threads back for the final forward
    # pass, and after a training that raised.
    assert done.stdout.split() == ["[1,", "1,", "1]", "2", "[2,", "1]", "2"]


def _distributions_of(requirements: tuple[str, ...]) -> set[str]:
    """The installed distributions that `pip install REQUIREMENTS` brings, by their metadata."""
    todo, seen = list(requirements), set()
    while todo:
        name = metadata.distribution(todo.pop()).metadata["Name"].lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        for line in metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def test_the_student_install_brings_every_module_the_release_imports():
    brought = _distributions_of(STUDENT_INSTALL)
    providers = metadata.packages_distributions()
    for helper in ("public_checks.py", "vanishing_helpers.py"):
        tree = ast.parse((RELEASE / helper).read_text(encoding="utf-8"))
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        third_party = {m for m in imported if m not in sys.stdlib_module_names and m not in ("vanishing_helpers", "public_checks")}
        assert third_party, helper
        for module in third_party:
            dists = {d.lower().replace("_", "-") for d in providers.get(module, [])}
            assert dists & brought, f"{helper} imports {module}, which `pip install {' '.join(STUDENT_INSTALL)}` does not bring"


def _self_check(folder: Path, *args: str, guard_dir: Path) -> subprocess.CompletedProcess:
    (guard_dir / "sitecustomize.py").write_text(NO_PROJECT_PACKAGES, encoding="utf-8")
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(guard_dir), "PYTHONPATH": str(guard_dir)}
    return subprocess.run([sys.executable, "public_checks.py", *args], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_self_check_of_the_release_notebook(tmp_path):
    """An untouched release: every question is reported as not answered, and the exit status says so."""
    student_folder(ROOT, tmp_path / "student")
    done = _self_check(tmp_path / "student", NOTEBOOK, guard_dir=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert "cell 6 (q1_1_tensors): NotImplementedError: q1_1: replace this line with your answer" in done.stdout
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith(("q1_", "q2_", "q3_", "qb_"))]
    assert len(rows) == QUESTIONS_WITH_CHECKS and all(row[1:3] == ["not", "answered"] for row in rows), done.stdout
    assert "0 of 14 questions pass their public checks" in done.stdout


@pytest.mark.slow
def test_self_check_of_the_reference_answers(tmp_path):
    student_folder(ROOT, tmp_path / "student", answered=True)
    done = _self_check(tmp_path / "student", NOTEBOOK, guard_dir=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Cells that raised" not in done.stdout and "Traceback" not in done.stdout + done.stderr
    assert "14 of 14 questions pass their public checks" in done.stdout


def test_self_check_of_a_file_that_is_not_a_notebook(tmp_path):
    student_folder(ROOT, tmp_path / "student")
    (tmp_path / "student" / "broken.ipynb").write_text('{"cells": [', encoding="utf-8")
    done = _self_check(tmp_path / "student", "broken.ipynb", guard_dir=tmp_path)
    assert done.returncode == 2
    assert "broken.ipynb could not be checked: broken.ipynb is not a readable notebook" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    missing = _self_check(tmp_path / "student", "missing.ipynb", guard_dir=tmp_path)
    assert missing.returncode == 2 and "cannot read missing.ipynb" in missing.stderr


NBGRADER_CONFIG = """c = get_config()
c.CourseDirectory.course_id = "vanishing"
c.CourseDirectory.root = {root!r}
"""


@pytest.mark.slow
def test_nbgrader_autograde_scores_the_public_checks(tmp_path):
    """The source works as an nbgrader assignment: with nbgrader's default cell timeout (30 s), the
    reference answers get every automatic point and the untouched release none, public checks included."""
    course = tmp_path / "course"
    shutil.copytree(ROOT / "source" / "vanishing_gradients", course / "source" / "ps1")
    (course / "nbgrader_config.py").write_text(NBGRADER_CONFIG.format(root=str(course)), encoding="utf-8")
    nbgrader = [sys.executable, "-m", "nbgrader"]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")  # it calls `alembic`

    def run(*args: str) -> None:
        done = subprocess.run([*nbgrader, *args], cwd=course, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    run("db", "assignment", "add", "ps1")
    for student in ("reference", "untouched"):
        run("db", "student", "add", student)
    run("generate_assignment", "ps1")
    student_folder(ROOT, course / "submitted" / "reference" / "ps1", answered=True)
    shutil.copytree(course / "release" / "ps1", course / "submitted" / "untouched" / "ps1")
    run("autograde", "ps1")

    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gradebook:
        scores = {s: gradebook.find_submission("ps1", s).code_score for s in ("reference", "untouched")}
        possible = gradebook.find_submission("ps1", "reference").max_code_score
    assert scores == {"reference": possible, "untouched": 0}
