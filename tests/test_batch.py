"""Batch grading (gradelab.grading.batch): a warm pool grades a folder into the gradebook and
<student>/results.json, a re-run grades only what changed, and a worker that dies costs only the
submission it was grading."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import nbformat
import pytest
from rich.console import Console

from gradelab.config import CONFIG_FILE, load_config
from gradelab.grading import batch
from gradelab.grading.gradebook import Gradebook
from gradelab.project import GRADEBOOK_FILE
from student_notebooks import NOTEBOOK, reference_notebook

pytestmark = pytest.mark.slow


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def submissions(root: Path, folder: Path, *, unanswered: list[str], answered: list[str] = ()) -> Path:
    """A folder of notebooks named <student id>.ipynb: the release notebook as handed out, or
    with the reference answers."""
    folder.mkdir(parents=True, exist_ok=True)
    release = nbformat.read(root / "release" / "vanishing_gradients" / NOTEBOOK, as_version=4)
    for student_id in unanswered:
        nbformat.write(release, folder / f"{student_id}.ipynb")
    for student_id in answered:
        nbformat.write(reference_notebook(root), folder / f"{student_id}.ipynb")
    return folder


def saved(out: Path) -> dict[str, float]:
    with Gradebook(out / GRADEBOOK_FILE) as gradebook:
        return {r.student_id: r.score for r in gradebook.results()}


def full_marks(root: Path) -> float:
    """The automatic points (the manual ones are the instructor's to give)."""
    return sum(q.points for q in load_config(root / CONFIG_FILE).questions)


@pytest.fixture(scope="module")
def graded(root: Path, tmp_path_factory: pytest.TempPathFactory):
    source = submissions(root, tmp_path_factory.mktemp("source"), unanswered=["alice"], answered=["bob"])
    out = tmp_path_factory.mktemp("graded")
    summary = batch.grade_batch(source, out, project=root, workers=2, console=quiet())
    return source, out, summary


def test_a_batch_is_saved_in_the_gradebook_and_each_students_folder(graded, root: Path) -> None:
    _, out, summary = graded
    assert summary.ok and not summary.unchanged
    results = {r.student_id: r for r in summary.results}
    assert sorted(results) == ["alice", "bob"]
    assert all(r.status == "graded" for r in results.values())
    assert all(t.status == "passed" for t in results["bob"].tests)  # the reference answers
    assert results["bob"].score == pytest.approx(full_marks(root)) and results["alice"].score < results["bob"].score
    assert saved(out) == {"alice": results["alice"].score, "bob": results["bob"].score}
    for student_id, result in results.items():
        gradescope = json.loads((out / student_id / "results.json").read_text())
        assert gradescope["score"] == pytest.approx(result.score)
    assert json.loads((out / "summary.json").read_text())["graded"] == 2


def test_a_rerun_grades_only_what_changed_or_was_asked_for(graded, root: Path) -> None:
    source, out, _ = graded
    again = batch.grade_batch(source, out, project=root, workers=2, console=quiet())
    assert sorted(again.unchanged) == ["alice", "bob"] and not again.results

    nbformat.write(reference_notebook(root), source / "alice.ipynb")  # alice resubmits, with answers
    changed = batch.grade_batch(source, out, project=root, workers=2, console=quiet())
    assert changed.unchanged == ["bob"] and [r.student_id for r in changed.results] == ["alice"]
    assert saved(out)["alice"] == pytest.approx(full_marks(root))

    one = batch.grade_batch(source, out, project=root, workers=2, only={"bob"}, force=True, console=quiet())
    assert [r.student_id for r in one.results] == ["bob"] and not one.unchanged

    forced = batch.grade_batch(source, out, project=root, workers=2, force=True, console=quiet())
    assert sorted(r.student_id for r in forced.results) == ["alice", "bob"] and not forced.unchanged


CULPRIT = "crasher"


def dies_on_the_culprit(path: str, student_id: str, out_dir: str, *, grade=batch._grade) -> str:
    if student_id == CULPRIT:
        os._exit(70)
    return grade(path, student_id, out_dir)


def test_a_submission_that_kills_its_worker_is_reported_and_the_others_are_graded(
        root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker's death, simulated: the sandbox (own pid namespace, no signal to its parent) leaves
    a submission no honest way to kill the worker. The pool's workers are forked from this process
    (fork start method), so they inherit the patched `batch._grade`, which ends the worker at once
    on the culprit's notebook and grades every other one."""
    monkeypatch.setattr(batch, "_grade", dies_on_the_culprit)
    source = submissions(root, tmp_path / "source", unanswered=["first", CULPRIT, "last"])
    out = tmp_path / "graded"
    summary = batch.grade_batch(source, out, project=root, workers=2, console=quiet())
    assert summary.lost == [(CULPRIT, f"the grading worker died {batch.WORKER_DEATHS} times on this submission")]
    assert not summary.ok
    assert sorted(r.student_id for r in summary.results) == ["first", "last"]
    assert all(r.status == "graded" for r in summary.results)
    assert sorted(saved(out)) == ["first", "last"]
    assert all((out / s / "results.json").is_file() for s in ("first", "last"))
    assert not (out / CULPRIT).exists()
