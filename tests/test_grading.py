"""Grading one submission: the contract of the engine (its guarantees and its result format)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest
import torch
from click.testing import CliRunner

from gradelab.cli import main
from gradelab.config import load_config
from gradelab.grading.environment import HiddenPythonError
from gradelab.grading.supervisor import Grader
from gradelab.project import Project
from gradelab.grading.submission import load_submission
from gradelab.sandbox.launch import UID_BASE, probe_layers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def grader(root):
    with Grader(Project.load(root)) as grader:
        yield grader


@pytest.fixture(scope="module")
def reference_result(grader, root, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    return grader.grade(root / "source/vanishing_gradients/vanishing_gradients.ipynb", "reference", out_dir=out), out


def test_reference_scores_full_marks(reference_result, root):
    result, _ = reference_result
    config = load_config(root / "grading_config.yml")
    assert result.status == "graded"
    failed = [(t.name, t.output) for t in result.tests if t.status != "passed"]
    assert not failed
    for question in result.questions:
        assert question.score == pytest.approx(config.question(question.id).points), question.id
    assert result.score == pytest.approx(sum(q.points for q in config.questions))


def test_skipped_demonstration_cells_are_not_run(reference_result, root):
    """q3_3_train (skip_when_grading) is not executed: the hidden tests train the XOR model
    themselves, and the reference still scores full marks on q3_3."""
    result, _ = reference_result
    release = nbformat.read(root / "source/vanishing_gradients/vanishing_gradients.ipynb", as_version=4)
    submission = load_submission(root / "source/vanishing_gradients/vanishing_gradients.ipynb", release)
    by_id = {c.grade_id: c.index for c in submission.cells}
    executed = {i for i, _ in submission.to_execute({"q3_3_train"})}
    assert by_id["q3_3_train"] not in executed and by_id["q3_3_xor"] in executed
    assert by_id["q3_3_train"] in {i for i, _ in submission.to_execute()}
    assert next(q for q in result.questions if q.id == "q3_3").score == 3


def test_results_json_is_gradescope_format(reference_result):
    result, out = reference_result
    document = json.loads((out / "reference" / "results.json").read_text())
    assert document["score"] == pytest.approx(result.score)
    assert document["tests"] and all({"name", "score", "max_score", "output", "visibility", "tags"} <= set(t)
                                     for t in document["tests"])
    assert all(len(t["tags"]) == 1 and t["tags"][0].startswith("q") for t in document["tests"])
    assert json.loads((out / "reference" / "submission.json").read_text())["student_id"] == "reference"


def test_plot_figures_are_written_beside_their_reference(reference_result):
    _, out = reference_result
    figures = out / "reference" / "figures"
    for question, name in (("q2_2", "fig_sig"), ("q2_8", "fig2_tanh")):
        assert (figures / f"{question}_{name}_student.png").read_bytes().startswith(b"\x89PNG")
        assert (figures / f"{question}_{name}_reference.png").read_bytes().startswith(b"\x89PNG")


def test_untouched_release_scores_zero_with_not_answered(grader, root):
    result = grader.grade(root / "release/vanishing_gradients/vanishing_gradients.ipynb", "blank")
    assert result.status == "graded" and result.score == 0
    assert all(t.status != "passed" for t in result.tests)
    assert not any("assert " in t.output or "Traceback" in t.output for t in result.tests), "no test code shown"
    for question in result.questions:
        if question.kind != "manual":
            outputs = [t.output for t in result.tests if t.question == question.id]
            assert any("not answered" in o or "not defined" in o for o in outputs), (question.id, outputs)


def test_hidden_tests_that_cannot_be_collected_stop_each_grading_with_a_message(root, tmp_path):
    """The test-runner zygote collects once per worker; a broken hidden test file makes every
    submission "crashed" with a message for the instructor, never a hang."""
    for part in ("grading_config.yml", "release", "solutions", "autograder"):
        copy = shutil.copytree if (root / part).is_dir() else shutil.copy
        copy(root / part, tmp_path / part)
    (tmp_path / "autograder/tests/test_part1.py").write_text("def test_broken(:\n")
    with Grader(Project.load(tmp_path)) as grader:
        for _ in range(2):
            result = grader.grade(root / "release/vanishing_gradients/vanishing_gradients.ipynb", "blank")
            assert result.status == "crashed"
            assert any("hidden tests could not be collected" in m for m in result.messages), result.messages


def test_same_submission_same_score_and_messages(grader, root):
    path = root / "release/vanishing_gradients/vanishing_gradients.ipynb"
    first, second = grader.grade(path, "a"), grader.grade(path, "a")
    assert [(t.name, t.score, t.output) for t in first.tests] == [(t.name, t.score, t.output) for t in second.tests]


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"{\"cells\": [", "not valid notebook JSON"),
    (b"[1, 2, 3]", "not a Jupyter notebook"),
    (b"\x89PNG\r\n\x1a\n\x00\x00binary", "not text"),
])
def test_broken_files_get_a_clear_message(grader, tmp_path, content, message):
    path = tmp_path / "broken.ipynb"
    path.write_bytes(content)
    result = grader.grade(path, "broken", out_dir=tmp_path / "out")
    assert result.status == "broken" and result.score == 0
    assert message in result.messages[0]
    assert json.loads((tmp_path / "out" / "broken" / "results.json").read_text())["score"] == 0


def test_every_layer_reported_and_active_as_root(reference_result):
    result, _ = reference_result
    import os

    if os.geteuid() != 0:
        pytest.skip("the full sandbox needs root (CI runs as root)")
    assert result.sandbox_layers and all(state == "available" for state in result.sandbox_layers.values())


SNOOP = '''
import os
def _readable(path):
    try:
        with open(path, "rb") as handle:
            return bool(handle.read(10))
    except OSError:
        return False
_found = [p for p in {paths!r} if _readable(p)]
y = torch.tensor(7.0) if not _found else torch.tensor(float(len(_found)))
'''


@pytest.mark.parametrize("targets_private", [True, False], ids=["others' files", "own /tmp (control)"])
def test_submission_cannot_read_classmates_or_results(grader, root, tmp_path, targets_private):
    """A cell tries to read a classmate's notebook, the results folder and the grade store; the
    q1_1 test of `y` passes only if nothing was readable. The control reads the sandbox's own
    /tmp, which must work, so the mechanism is shown to detect a successful read."""
    import nbformat

    batch, out = tmp_path / "batch", tmp_path / "out"
    batch.mkdir()
    (out / "classmate").mkdir(parents=True)
    (batch / "classmate.ipynb").write_text("{'secret': 'answers'}")
    (out / "classmate" / "results.json").write_text('{"score": 44}')
    (out / "gradebook.sqlite").write_text("sqlite")
    paths = ([str(batch / "classmate.ipynb"), str(out / "classmate" / "results.json"), str(out / "gradebook.sqlite")]
             if targets_private else ["/tmp/vanishing_helpers.py"])
    nb = nbformat.read(root / "release/vanishing_gradients/vanishing_gradients.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(SNOOP.format(paths=paths)))
    path = batch / "snoop.ipynb"
    nbformat.write(nb, path)
    result = grader.grade(path, "snoop", out_dir=out)
    y_test = next(t for t in result.tests if t.question == "q1_1" and t.name.startswith("y and z"))
    if targets_private:
        assert "y should hold 7" not in y_test.output, y_test.output
    else:
        assert "y should hold 7" in y_test.output, y_test.output


# ------------------------------------------------------------------ a crash costs only its own tests

DYING_FUNCTIONS = '''
import ctypes
import os


def expected_initial_loss(num_classes):
    ctypes.string_at(0)  # a segmentation fault


def he_init_(model, negative_slope=0.0):
    os._exit(3)


def saturation_fraction(model, inputs, threshold=0.99):
    ctypes.string_at(0)


def kill_gradients(model):
    os._exit(4)
'''


def test_functions_that_end_the_process_cost_only_their_own_tests(grader, root, tmp_path):
    """Four functions of the reference kill the sandbox when called (more deaths than any restart
    budget would allow): their tests fail with how the process ended, every other test passes."""
    nb = nbformat.read(root / "source/vanishing_gradients/vanishing_gradients.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(DYING_FUNCTIONS))
    path = tmp_path / "dying.ipynb"
    nbformat.write(nb, path)
    result = grader.grade(path, "dying")
    dying = {"qb_3": "`expected_initial_loss` ended the student's process when called (killed by SIGSEGV)",
             "qb_1": "`he_init_` ended the student's process when called (exit status 3)",
             "qb_2": "`saturation_fraction` ended the student's process when called (killed by SIGSEGV)"}
    for test in result.tests:
        if test.question in dying:
            assert test.status == "failed" and test.output == dying[test.question], (test.name, test.output)
        elif test.name.startswith("kill_gradients"):
            assert test.output == "`kill_gradients` ended the student's process when called (exit status 4)"
        else:
            assert test.status == "passed", (test.name, test.output)


# ------------------------------------------------------------------ messages about the student's values


def test_messages_name_what_the_value_is():
    from gradelab.hidden import assert_tensor_close, expect_number, expect_tensor
    from gradelab.boundary.messages import RpcError
    from gradelab.hidden.proxy import _problem_from

    with pytest.raises(AssertionError, match=r"^d should be a torch.Tensor, got a str \('1 2 3'\)$"):
        expect_tensor("1 2 3", "d")
    with pytest.raises(AssertionError, match=r"^A has shape \(2, 2\), expected \(3, 3\)$"):
        expect_tensor(torch.zeros(2, 2), "A", shape=(3, 3))
    with pytest.raises(AssertionError, match="has dtype torch.int64, expected a floating-point tensor"):
        assert_tensor_close(torch.zeros(3, dtype=torch.int64), torch.zeros(3), "my_sigmoid(x)")
    assert expect_number(2, "n") == 2.0
    for value, message in ((True, "should be a number, got a bool"), (10 ** 400, "too large for a float"),
                           (None, "should be a number, got None")):
        with pytest.raises(AssertionError, match=message):
            expect_number(value, "expected_initial_loss(2)")
    assert str(_problem_from(RpcError(type="SystemExit", message="0"), "my_sigmoid", "call")).startswith(
        "`my_sigmoid` raised SystemExit when called: 0 (exit(), quit() and sys.exit() end a program")
    assert str(_problem_from(RpcError(type="ValueError", message="bad"), "d", "get")) == "`d` raised ValueError: bad"


def test_a_fake_import_error_in_a_cell_is_the_students_own(grader, root, tmp_path):
    """A cell that raises ModuleNotFoundError for a module this process imports is checked in a
    clean sandbox, which imports it: the submission is graded as usual."""
    nb = nbformat.read(root / "release/vanishing_gradients/vanishing_gradients.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell('raise ModuleNotFoundError("No module named \'IPython.core.logger\'")'))
    path = tmp_path / "fake_import_error.ipynb"
    nbformat.write(nb, path)
    assert grader.grade(path, "fake").status == "graded"


# ------------------------------------------------------------------ a Python the sandbox cannot read

needs_private_tmp = pytest.mark.skipif(
    probe_layers()["namespaces"] != "available", reason="without mount namespaces the sandbox shares /tmp")


@needs_private_tmp
def test_a_module_the_sandbox_cannot_import_stops_grading(grader, root, tmp_path, monkeypatch):
    """A module in Python's trees (here: a folder under /tmp, taken as one of them) that this
    process can import and the sandbox cannot: an error of the grading environment, not a grade."""
    site_dir = tmp_path / "site-packages"
    site_dir.mkdir()
    (site_dir / "gradelab_probe_module.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(site_dir))
    monkeypatch.setattr(grader, "python_trees", [*grader.python_trees, site_dir])
    nb = nbformat.read(root / "release/vanishing_gradients/vanishing_gradients.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import gradelab_probe_module"))
    path = tmp_path / "imports.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(HiddenPythonError, match="a clean sandbox cannot load what this Python loads "
                                                r"\(module gradelab_probe_module: ModuleNotFoundError"):
        grader.grade(path, "imports")


@needs_private_tmp
def test_a_virtual_environment_under_tmp_is_refused_up_front(root, tmp_path, monkeypatch):
    venv = tmp_path / "venv"
    venv.mkdir()
    monkeypatch.setattr(sys, "prefix", str(venv))
    with pytest.raises(HiddenPythonError, match=rf"{venv} is under /tmp, which the sandbox replaces"):
        Grader(Project.load(root))
    result = CliRunner().invoke(main, ["validate", str(root / "release/vanishing_gradients/vanishing_gradients.ipynb"),
                                       "--project", str(root)])
    assert result.exit_code == 3 and f"{venv} is under /tmp" in " ".join(result.output.split()), result.output


@pytest.mark.skipif(probe_layers()["uid"] != "available", reason="the sandbox uid needs root")
def test_folders_the_sandbox_uid_cannot_enter_or_that_are_hidden_are_named():
    from gradelab.grading.environment import unreachable

    outer = Path(tempfile.mkdtemp(dir="/var/tmp"))
    try:
        locked = outer / "venv"
        locked.mkdir(mode=0o700)
        os.chmod(outer, 0o755)
        os.chmod(locked, 0o700)
        hidden = outer / "source"  # as the project's source/ is hidden (the checkout may be under /tmp)
        (hidden / "vanishing_gradients").mkdir(parents=True)
        problems = unreachable([locked, hidden / "vanishing_gradients"], hide=[hidden], slot=7)
    finally:
        shutil.rmtree(outer)
    assert problems == [
        f"{hidden / 'vanishing_gradients'} is inside {hidden}, which the sandbox hides from student code",
        f"{locked} cannot be read by the sandbox's unprivileged user (uid {UID_BASE + 7}): {locked} "
        f"(mode drwx------, owner uid 0) does not let others in"]


@pytest.mark.parametrize("attack", ["hostile_forged_cell_report", "hostile_huge_report"])
def test_a_rejected_submission_leaves_the_next_one_a_whole_sandbox(grader, root, tmp_path, attack):
    """A sandbox whose messages were malformed is torn down before the next submission's starts:
    the next one gets every layer (its memory limit holds) and says what its box applied."""
    hostile = grader.grade(root / f"examples/submissions/{attack}.ipynb", attack, out_dir=tmp_path)
    assert hostile.status == "malformed" and hostile.score == 0
    assert "the sandbox sent malformed data" in hostile.messages[0]
    after = grader.grade(root / "examples/submissions/hostile_memory_bomb.ipynb", "after", out_dir=tmp_path)
    assert after.status == "graded" and any("out of memory, limit" in m for m in after.messages), after.messages
    if os.geteuid() == 0:
        assert after.sandbox_layers and all(state == "available" for state in after.sandbox_layers.values())


@pytest.mark.parametrize("require", [False, True])
def test_a_layer_that_fails_for_one_box_is_flagged_or_refused(root, tmp_path, monkeypatch, require):
    """Results record the layers the submission's own sandbox applied, not the machine's probe: a
    layer that fails for this box is named in the result, and --require-sandbox refuses to grade."""
    from gradelab.sandbox import launch

    spawn = launch.Sandbox.spawn

    def spawn_losing_memory_limit(*args, **kwargs):
        box = spawn(*args, **kwargs)
        box.layers = {**box.layers, "cgroup_memory": "failed: simulated"}
        return box

    monkeypatch.setattr(launch.Sandbox, "spawn", staticmethod(spawn_losing_memory_limit))
    layers = probe_layers()
    if any(state != "available" for state in layers.values()):
        pytest.skip("needs every layer on this machine")
    with Grader(Project.load(root), require_sandbox=require) as grader:
        result = grader.grade(root / "source/vanishing_gradients/vanishing_gradients.ipynb", "reference", out_dir=tmp_path)
    if require:
        assert result.status == "crashed" and result.score == 0
        assert "could not be applied" in result.messages[0] and "cgroup_memory (failed: simulated)" in result.messages[0]
    else:
        assert result.status == "graded" and all(t.status == "passed" for t in result.tests)
        assert result.sandbox_layers["cgroup_memory"] == "failed: simulated"
        assert any("not applied to this submission: cgroup_memory (failed: simulated)" in m for m in result.messages)
