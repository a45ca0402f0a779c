"""The grade store: one SQLite file in the output folder, safe to share between processes.

Each graded submission is one row: its SubmissionResult as JSON, plus the columns a query needs
(student_id, content_hash, status, score, graded_at). Every write is one statement in autocommit
mode, so once `save` returns the row is committed; WAL mode lets readers run while one process
writes, and a busy timeout makes concurrent writers wait their turn instead of failing.

Manual scores (a human's points for a question) live in their own table. Saving a regraded
result never touches them; `results()` merges them in (see `Gradebook.results`).
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

from gradelab.boundary.records import SubmissionResult

BUSY_TIMEOUT_SECONDS = 60.0  # how long a writer waits for another process's write to finish

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    student_id   TEXT PRIMARY KEY,
    content_hash TEXT NOT NULL,
    status       TEXT NOT NULL,
    score        REAL NOT NULL,  -- the automatic score, as saved; manual points are not in it
    graded_at    TEXT NOT NULL,  -- UTC, ISO 8601, when save() was called
    result_json  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS manual_scores (
    student_id   TEXT NOT NULL,
    question_id  TEXT NOT NULL,
    points       REAL NOT NULL,
    comment      TEXT NOT NULL,
    grader       TEXT NOT NULL,
    updated_at   TEXT NOT NULL,
    PRIMARY KEY (student_id, question_id)
);
"""

ManualScores = dict[str, dict[str, tuple[float, str]]]  # student -> question -> (points, comment)


class Gradebook:
    """Results and manual scores of one assignment. Open one Gradebook per process (a SQLite
    connection must not cross a fork); any number of processes may use the same file."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: autocommit, so each write statement is its own committed transaction.
        self._db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
        # Switching to WAL needs an exclusive lock that SQLite does not wait for when another
        # process is opening the same new file, so this one step is retried by hand.
        _retry_while_busy(lambda: self._db.execute("PRAGMA journal_mode=WAL"))
        # FULL: a commit is synced to disk before save() returns, so even a power cut keeps it.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def get(self, student_id: str) -> SubmissionResult | None:
        """The result exactly as saved, without manual scores (so that saving it back cannot
        count them twice); `results()` gives the merged view."""
        row = self._db.execute("SELECT result_json FROM results WHERE student_id = ?", (student_id,)).fetchone()
        return SubmissionResult.model_validate_json(row[0]) if row else None

    def content_hash(self, student_id: str) -> str | None:
        row = self._db.execute("SELECT content_hash FROM results WHERE student_id = ?", (student_id,)).fetchone()
        return row[0] if row else None

    def save(self, result: SubmissionResult) -> None:
        """Insert or replace the student's result; committed when this returns. Manual scores stay."""
        self._db.execute(
            """INSERT INTO results (student_id, content_hash, status, score, graded_at, result_json)
               VALUES (?, ?, ?, ?, ?, ?)
               ON CONFLICT (student_id) DO UPDATE SET
                   content_hash = excluded.content_hash, status = excluded.status, score = excluded.score,
                   graded_at = excluded.graded_at, result_json = excluded.result_json""",
            (
                result.student_id, result.content_hash, result.status, result.score,
                _now(), result.model_dump_json(),
            ),
        )

    def results(self) -> list[SubmissionResult]:
        """Every result, sorted by student_id, with manual scores merged in.

        For each manual score whose question id the result has, that QuestionScore gets the
        manual points added to its (automatic) score, `needs_manual=False` and the manual
        comment; the result's score then becomes the sum of its question scores, never below
        zero. Results without manual scores are returned as saved. Manual scores for a question
        (or student) without a result are not merged anywhere: see `orphan_manual_scores()`.
        """
        manual = self.manual_scores()
        return [_merge(result, manual.get(result.student_id, {})) for result in self._saved_results()]

    def set_manual_score(
        self, student_id: str, question_id: str, points: float, comment: str = "", grader: str = ""
    ) -> None:
        """Record (or replace) a human's points for one question; committed when this returns."""
        if not math.isfinite(points):
            raise ValueError(f"manual points must be a finite number, not {points!r}")
        self._db.execute(
            """INSERT INTO manual_scores (student_id, question_id, points, comment, grader, updated_at)
               VALUES (?, ?, ?, ?, ?, ?)
               ON CONFLICT (student_id, question_id) DO UPDATE SET
                   points = excluded.points, comment = excluded.comment,
                   grader = excluded.grader, updated_at = excluded.updated_at""",
            (student_id, question_id, float(points), comment, grader, _now()),
        )

    def manual_scores(self) -> ManualScores:
        scores: ManualScores = {}
        rows = self._db.execute(
            "SELECT student_id, question_id, points, comment FROM manual_scores ORDER BY student_id, question_id"
        )
        for student_id, question_id, points, comment in rows:
            scores.setdefault(student_id, {})[question_id] = (points, comment)
        return scores

    def orphan_manual_scores(self) -> ManualScores:
        """Manual scores that `results()` cannot merge: no result for the student, or no
        question with that id in it. They are kept, so a later result can pick them up."""
        question_ids = {
            result.student_id: {question.id for question in result.questions} for result in self._saved_results()
        }
        orphans: ManualScores = {}
        for student_id, questions in self.manual_scores().items():
            for question_id, score in questions.items():
                if question_id not in question_ids.get(student_id, set()):
                    orphans.setdefault(student_id, {})[question_id] = score
        return orphans

    def _saved_results(self) -> list[SubmissionResult]:
        rows = self._db.execute("SELECT result_json FROM results ORDER BY student_id")
        return [SubmissionResult.model_validate_json(json) for (json,) in rows]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Gradebook:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def _merge(result: SubmissionResult, manual: dict[str, tuple[float, str]]) -> SubmissionResult:
    """`result` with the manual points of its questions added (see `Gradebook.results`)."""
    if not any(question.id in manual for question in result.questions):
        return result
    questions = [
        question.model_copy(update={
            "score": question.score + manual[question.id][0],
            "needs_manual": False,
            "comment": manual[question.id][1],
        }) if question.id in manual else question
        for question in result.questions
    ]
    total = max(0.0, sum(question.score for question in questions))
    return result.model_copy(update={"questions": questions, "score": total})


def _retry_while_busy(action: Callable[[], object]) -> None:
    deadline = time.monotonic() + BUSY_TIMEOUT_SECONDS
    while True:
        try:
            action()
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()
