"""The Gradescope bundle: setup.sh builds a working environment, run_autograder grades the notebook
Gradescope received and always writes a results.json in Gradescope's documented format."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

import nbformat
import pytest

from gradelab.config import ConfigError, load_config
from gradelab.grading.gradescope import NoNotebook, failure_document, results_document, submitted_notebook
from gradelab.boundary.records import SubmissionResult
from gradelab.boundary.records import TestOutcome as Outcome  # not "Test*": pytest would try to collect it
from student_notebooks import NOTEBOOK, reference_notebook

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "autograder" / "gradescope_autograder.zip"

# Gradescope's autograder results format (its "Autograder specifications"): the fields it reads.
TOP_LEVEL_FIELDS = {"score", "execution_time", "output", "output_format", "test_output_format", "test_name_format",
                    "visibility", "stdout_visibility", "extra_data", "tests", "leaderboard"}
TEST_FIELDS = {"score", "max_score", "status", "name", "name_format", "number", "output", "output_format",
               "tags", "visibility", "extra_data"}
VISIBILITIES = {"hidden", "after_due_date", "after_published", "visible"}


def assert_gradescope_results(document: dict) -> None:
    assert set(document) <= TOP_LEVEL_FIELDS, set(document) - TOP_LEVEL_FIELDS
    assert isinstance(document["score"], (int, float)) and isinstance(document["output"], str)
    assert isinstance(document["execution_time"], (int, float)) and document["visibility"] in VISIBILITIES
    for test in document["tests"]:
        assert set(test) <= TEST_FIELDS, set(test) - TEST_FIELDS
        assert isinstance(test["name"], str) and test["name"]
        assert isinstance(test["score"], (int, float)) and isinstance(test["max_score"], (int, float))
        assert 0 <= test["score"] <= test["max_score"]
        assert test["status"] in ("passed", "failed") and isinstance(test["output"], str)
        assert test["visibility"] in VISIBILITIES
        assert isinstance(test["tags"], list) and all(isinstance(t, str) for t in test["tags"])


# ------------------------------------------------------------------ which notebook is graded


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}", encoding="utf-8")
    return path


def test_the_configured_notebook_is_graded_and_checkpoints_are_ignored(tmp_path):
    named = _touch(tmp_path / NOTEBOOK)
    _touch(tmp_path / "scratch.ipynb")
    _touch(tmp_path / ".ipynb_checkpoints" / f"{Path(NOTEBOOK).stem}-checkpoint.ipynb")
    assert submitted_notebook(tmp_path, NOTEBOOK) == named


def test_the_only_notebook_is_graded_whatever_its_name(tmp_path):
    mine = _touch(tmp_path / "upload" / "my_work.ipynb")
    _touch(tmp_path / "upload" / ".ipynb_checkpoints" / "my_work-checkpoint.ipynb")
    _touch(tmp_path / "__MACOSX" / "._my_work.ipynb")
    assert submitted_notebook(tmp_path, NOTEBOOK) == mine
    assert submitted_notebook(mine, NOTEBOOK) == mine


def test_no_or_several_notebooks_say_what_to_submit(tmp_path):
    with pytest.raises(NoNotebook, match=f"holds no notebook .*: submit {NOTEBOOK}"):
        submitted_notebook(tmp_path, NOTEBOOK)
    _touch(tmp_path / "a.ipynb")
    _touch(tmp_path / "b.ipynb")
    with pytest.raises(NoNotebook, match=rf"holds 2 notebooks \(a.ipynb, b.ipynb\) and none is named {NOTEBOOK}"):
        submitted_notebook(tmp_path, NOTEBOOK)
    _touch(tmp_path / "one" / NOTEBOOK)
    _touch(tmp_path / "two" / NOTEBOOK)
    with pytest.raises(NoNotebook, match=f"2 files named {NOTEBOOK} .*: submit only one"):
        submitted_notebook(tmp_path, NOTEBOOK)
    with pytest.raises(NoNotebook, match="does not exist"):
        submitted_notebook(tmp_path / "missing", NOTEBOOK)


# ------------------------------------------------------------------ visibility from the config


def _config(tmp_path: Path, gradescope: str):
    text = (ROOT / "grading_config.yml").read_text(encoding="utf-8")
    start = text.index("gradescope:\n")
    end = text.index("\n\n", start)
    (tmp_path / "grading_config.yml").write_text(text[:start] + gradescope + text[end:], encoding="utf-8")
    return load_config(tmp_path / "grading_config.yml")


def test_visibility_follows_the_config_and_never_reveals_a_hidden_test(tmp_path):
    config = _config(tmp_path, "gradescope:\n  test_visibility: after_published\n  question_visibility: {q3_3: hidden}")
    tests = [Outcome(name="sigmoid", question="q1_2", score=1, max_score=1, status="passed"),
             Outcome(name="xor", question="q3_3", score=0, max_score=3, status="failed", output="not solved"),
             Outcome(name="secret", question="q1_1", score=2, max_score=2, status="passed", visibility="hidden")]
    result = SubmissionResult(student_id="s", source="s.ipynb", content_hash="0", status="graded", score=3, tests=tests)
    document = results_document(result, config)
    assert_gradescope_results(document)
    assert [t["visibility"] for t in document["tests"]] == ["after_published", "hidden", "hidden"]
    assert [t["tags"] for t in document["tests"]] == [["q1_2"], ["q3_3"], ["q1_1"]]


def test_visibility_of_an_unknown_question_stops_the_config(tmp_path):
    with pytest.raises(ConfigError, match="question_visibility names questions that are not listed: q9_9"):
        _config(tmp_path, "gradescope:\n  question_visibility: {q9_9: hidden}")
    with pytest.raises(ConfigError, match="test_visibility"):
        _config(tmp_path, "gradescope:\n  test_visibility: sometimes")


def test_a_failure_document_is_gradescope_results_with_score_zero():
    document = failure_document("the submission holds no notebook", 0.5)
    assert_gradescope_results(document)
    assert document["score"] == 0 and document["output"] == "Your submission was not graded: the submission holds no notebook."


# ------------------------------------------------------------------ the bundle, end to end


@pytest.fixture(scope="module")
def autograder(tmp_path_factory):
    """A fresh venv made by the bundle's setup.sh, and the bundle laid out as Gradescope's /autograder."""
    home = tmp_path_factory.mktemp("gradescope")
    with zipfile.ZipFile(BUNDLE) as bundle:
        bundle.extractall(home / "autograder" / "source")
    # Outside /tmp, as /opt/gradelab/venv is on Gradescope: the sandbox mounts a private /tmp,
    # which would hide a venv there from the student's code (and the checkout may itself be under
    # /tmp, as CI's fresh clone is). World-readable, as the sandbox's unprivileged user reads it.
    venv = Path(tempfile.mkdtemp(prefix="gradelab-gradescope-venv-", dir="/var/tmp"))
    os.chmod(venv, 0o755)
    # This machine's /usr/bin/python3 is 3.11 with venv support, so setup.sh leaves apt alone (on
    # Gradescope's Ubuntu 22.04 it installs python3.11 first). It reaches PyPI only, where pip's
    # configured find-links holds torch's CPU wheel: the CPU index stands in for download.pytorch.org.
    env = dict(os.environ, PATH="/usr/bin:/bin", GRADELAB_VENV=str(venv), TORCH_INDEX_URL="https://pypi.org/simple")
    done = subprocess.run(["bash", str(home / "autograder" / "source" / "setup.sh")], env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch, gradelab; print(torch.__version__)"],
                           capture_output=True, text=True)
    assert probe.stdout.strip().startswith("2.13.0"), probe.stderr
    config = home / "autograder" / "source" / "gradelab" / "grading_config.yml"
    text = config.read_text(encoding="utf-8")
    text = text.replace("test_visibility: visible", "test_visibility: after_published")
    config.write_text(text.replace("question_visibility: {}", "question_visibility: {q3_3: hidden}"), encoding="utf-8")
    yield home / "autograder", venv
    shutil.rmtree(venv, ignore_errors=True)


def _run_autograder(autograder, files: dict[str, str], *, venv: Path | None = None) -> dict:
    """Lay out `files` as the submission, run run_autograder, return results.json."""
    root, built = autograder
    shutil.rmtree(root / "submission", ignore_errors=True)
    shutil.rmtree(root / "results", ignore_errors=True)
    for name, text in files.items():
        (root / "submission" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "submission" / name).write_text(text, encoding="utf-8")
    env = {"PATH": "/usr/bin:/bin", "AUTOGRADER_ROOT": str(root), "GRADELAB_VENV": str(venv or built)}
    done = subprocess.run(["bash", str(root / "source" / "run_autograder")], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    document = json.loads((root / "results" / "results.json").read_text(encoding="utf-8"))
    assert_gradescope_results(document)
    return document


@pytest.fixture(scope="module")
def notebooks() -> dict[str, str]:
    return {"release": (ROOT / "release" / "vanishing_gradients" / NOTEBOOK).read_text(encoding="utf-8"),
            "reference": nbformat.writes(reference_notebook(ROOT))}


@pytest.mark.slow
def test_reference_answers_get_every_point_with_the_configured_visibility(autograder, notebooks):
    document = _run_autograder(autograder, {
        NOTEBOOK: notebooks["reference"],
        "scratch.ipynb": notebooks["release"],
        f".ipynb_checkpoints/{Path(NOTEBOOK).stem}-checkpoint.ipynb": notebooks["release"],
    })
    tests = document["tests"]
    assert tests and all(t["status"] == "passed" for t in tests), [t for t in tests if t["status"] != "passed"]
    # Every automatic point, bonus included (the manual parts are graded by hand, later).
    assert document["score"] == sum(q.points for q in load_config(ROOT / "grading_config.yml").questions)
    assert {t["visibility"] for t in tests if t["tags"] == ["q3_3"]} == {"hidden"}
    assert {t["visibility"] for t in tests if t["tags"] != ["q3_3"]} == {"after_published"}
    assert document["execution_time"] > 0


@pytest.mark.slow
def test_the_submitted_notebook_is_graded_not_its_checkpoint(autograder, notebooks):
    document = _run_autograder(autograder, {
        "my_work.ipynb": notebooks["release"],
        ".ipynb_checkpoints/my_work-checkpoint.ipynb": notebooks["reference"],
    })
    assert document["score"] == 0 and document["tests"]
    assert all(t["status"] == "failed" for t in document["tests"])
    assert any("not answered" in t["output"] for t in document["tests"])


@pytest.mark.slow
def test_a_broken_notebook_gets_zero_and_the_reason(autograder, notebooks):
    document = _run_autograder(autograder, {NOTEBOOK: notebooks["reference"][:5000]})
    assert document["score"] == 0
    assert "not valid notebook JSON" in document["output"] and "cut off" in document["output"]


@pytest.mark.slow
def test_several_notebooks_get_zero_and_what_to_submit(autograder, notebooks):
    document = _run_autograder(autograder, {"a.ipynb": notebooks["release"], "b.ipynb": notebooks["reference"]})
    assert document["score"] == 0 and document["tests"] == []
    assert f"holds 2 notebooks (a.ipynb, b.ipynb) and none is named {NOTEBOOK}: submit only {NOTEBOOK}" in document["output"]


@pytest.mark.slow
def test_an_autograder_that_cannot_start_still_writes_results(autograder, notebooks, tmp_path):
    document = _run_autograder(autograder, {NOTEBOOK: notebooks["reference"]}, venv=tmp_path / "no_such_venv")
    assert document["score"] == 0 and document["tests"] == []
    assert "the autograder could not run (gradelab exited with status 127)" in document["output"]
