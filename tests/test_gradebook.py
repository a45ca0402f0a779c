"""Gradebook: round trips, upserts, manual scores that survive regrades, and several processes."""

from __future__ import annotations

import multiprocessing
import os
import signal
from datetime import datetime, timezone
from multiprocessing.synchronize import Event
from pathlib import Path

import pytest

from gradelab.grading.gradebook import Gradebook
# Imported under another name: pytest would try to collect a class called Test*.
from gradelab.boundary.records import FigureSummary, LateInfo, QuestionScore, SubmissionResult
from gradelab.boundary.records import TestOutcome as Outcome

# spawn: each child opens its own connection, as separate grading processes would.
SPAWN = multiprocessing.get_context("spawn")


def make_result(student_id: str, *, content_hash: str = "hash-1", q1_score: float = 2.0) -> SubmissionResult:
    return SubmissionResult(
        student_id=student_id,
        source=f"{student_id}.ipynb",
        content_hash=content_hash,
        status="graded",
        score=q1_score,
        max_score=10.0,
        tests=[Outcome(name="test_relu_grads", question="q1", score=q1_score, max_score=5.0, status="passed")],
        questions=[
            QuestionScore(
                id="q1", title="ReLU gradients", kind="auto", score=q1_score, max_score=5.0, passed=1, total=1
            ),
            QuestionScore(
                id="q2", title="Explain the plot", kind="manual", score=0.0, max_score=5.0, needs_manual=True
            ),
        ],
        messages=["ran in 3.2 s"],
        late=LateInfo(submitted_at=datetime(2026, 11, 20, 14, 3, 11, 123456, tzinfo=timezone.utc), marked_late=True),
        figures=[FigureSummary(cell=4, index=0, helper="plot_gradients", png="figures/0.png")],
    )


def test_save_then_get_round_trips(tmp_path: Path) -> None:
    result = make_result("alice")
    with Gradebook(tmp_path / "out" / "grades.sqlite") as book:
        book.save(result)
        assert book.get("alice") == result
        assert book.content_hash("alice") == "hash-1"
        assert book.get("bob") is None and book.content_hash("bob") is None
    with Gradebook(tmp_path / "out" / "grades.sqlite") as reopened:
        assert reopened.results() == [result]


def test_save_replaces_the_students_result(tmp_path: Path) -> None:
    with Gradebook(tmp_path / "grades.sqlite") as book:
        book.save(make_result("bob"))
        book.save(make_result("alice"))
        regraded = make_result("bob", content_hash="hash-2", q1_score=5.0)
        book.save(regraded)
        assert [r.student_id for r in book.results()] == ["alice", "bob"]
        assert book.get("bob") == regraded and book.content_hash("bob") == "hash-2"


def test_manual_scores_survive_a_regrade_and_are_merged(tmp_path: Path) -> None:
    with Gradebook(tmp_path / "grades.sqlite") as book:
        book.save(make_result("alice"))
        book.set_manual_score("alice", "q2", 4.0, "clear explanation", grader="ta1")
        book.save(make_result("alice", content_hash="hash-2", q1_score=3.0))  # regrade after a fix

        [merged] = book.results()
        q1, q2 = merged.questions
        assert (q2.score, q2.needs_manual, q2.comment) == (4.0, False, "clear explanation")
        assert q1.score == 3.0 and merged.score == 7.0
        assert book.get("alice").questions[1].needs_manual  # get() is the result as saved
        assert book.manual_scores() == {"alice": {"q2": (4.0, "clear explanation")}}
        assert book.orphan_manual_scores() == {}


def test_merged_score_never_goes_below_zero(tmp_path: Path) -> None:
    with Gradebook(tmp_path / "grades.sqlite") as book:
        book.save(make_result("alice", q1_score=1.0))
        book.set_manual_score("alice", "q2", -3.0, "copied answer")
        assert book.results()[0].score == 0.0


def test_manual_scores_without_a_question_are_kept_as_orphans(tmp_path: Path) -> None:
    with Gradebook(tmp_path / "grades.sqlite") as book:
        book.save(make_result("alice"))
        book.set_manual_score("alice", "q9", 1.0, "bonus")
        book.set_manual_score("carol", "q2", 2.0)  # graded by hand before her result exists

        assert book.results() == [make_result("alice")]
        assert book.orphan_manual_scores() == {"alice": {"q9": (1.0, "bonus")}, "carol": {"q2": (2.0, "")}}
        with pytest.raises(ValueError):
            book.set_manual_score("alice", "q2", float("nan"))


def save_then_die(path: Path, student_ids: list[str], saves_before_kill: int) -> None:
    book = Gradebook(path)
    for done, student_id in enumerate(student_ids):
        if done == saves_before_kill:
            os.kill(os.getpid(), signal.SIGKILL)  # no close(), no atexit, no flush: a hard crash
        book.save(make_result(student_id))


def test_a_killed_writer_loses_no_saved_result(tmp_path: Path) -> None:
    path = tmp_path / "grades.sqlite"
    batch = [f"student{n:02d}" for n in range(20)]
    writer = SPAWN.Process(target=save_then_die, args=(path, batch, 7))
    writer.start()
    writer.join(timeout=60)

    assert writer.exitcode == -signal.SIGKILL
    with Gradebook(path) as book:
        assert book.results() == [make_result(student_id) for student_id in batch[:7]]


def save_all(path: Path, student_ids: list[str], start: Event) -> None:
    start.wait()
    with Gradebook(path) as book:
        for student_id in student_ids:
            book.save(make_result(student_id))


def test_two_processes_saving_at_once_both_land(tmp_path: Path) -> None:
    path = tmp_path / "grades.sqlite"
    start = SPAWN.Event()
    halves = [[f"a{n:02d}" for n in range(40)], [f"b{n:02d}" for n in range(40)]]
    writers = [SPAWN.Process(target=save_all, args=(path, half, start)) for half in halves]
    for writer in writers:
        writer.start()
    start.set()
    for writer in writers:
        writer.join(timeout=60)

    assert [writer.exitcode for writer in writers] == [0, 0]
    with Gradebook(path) as book:
        assert [r.student_id for r in book.results()] == halves[0] + halves[1]
