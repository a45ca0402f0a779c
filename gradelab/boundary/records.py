"""Data that crosses module and process boundaries.

Everything here is plain data (pydantic models): a grading result travels from the trusted test
runner to the supervisor, into the gradebook store, and out to exports and reports, always as
one of these types and never as live objects.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

TestStatus = Literal["passed", "failed", "error", "timeout", "not_answered", "skipped"]
# broken: not a notebook of this assignment; malformed: its sandbox sent what gradelab's code never
# sends (tampering); crashed: the grader's own failure.
SubmissionStatus = Literal["graded", "broken", "timeout", "crashed", "malformed"]
QuestionKind = Literal["auto", "manual", "plot"]
Visibility = Literal["hidden", "after_due_date", "after_published", "visible"]


class TestOutcome(BaseModel):
    """One hidden test's verdict, as a Gradescope `tests[]` entry carries it."""

    name: str
    question: str
    score: float
    max_score: float
    status: TestStatus
    output: str = ""
    visibility: Visibility = "visible"
    duration: float = 0.0

    def to_gradescope(self) -> dict:
        return {
            "name": self.name,
            "score": round(self.score, 4),
            "max_score": round(self.max_score, 4),
            "status": "passed" if self.status == "passed" else "failed",
            "output": self.output,
            "visibility": self.visibility,
            "tags": [self.question],
        }


class QuestionScore(BaseModel):
    """A question's total over its tests (or its manual score)."""

    id: str
    title: str
    kind: QuestionKind
    score: float
    max_score: float
    passed: int = 0
    total: int = 0
    needs_manual: bool = False
    comment: str = ""


class LateInfo(BaseModel):
    """How late a submission was and what the late policy would take off. Shown, never hidden."""

    submitted_at: datetime | None = None
    marked_late: bool = False
    seconds_late: float = 0.0
    penalty_fraction: float = 0.0
    penalty_points: float = 0.0
    reason: str = ""


class FigureSummary(BaseModel):
    """Where a captured figure came from and where its PNG was written."""

    cell: int
    index: int
    helper: str | None = None
    png: str | None = None


class SubmissionResult(BaseModel):
    """Everything the grader knows about one student's submission."""

    student_id: str
    source: str
    content_hash: str
    status: SubmissionStatus
    score: float = 0.0
    max_score: float = 0.0
    tests: list[TestOutcome] = Field(default_factory=list)
    questions: list[QuestionScore] = Field(default_factory=list)
    messages: list[str] = Field(default_factory=list)
    sandbox_layers: dict[str, str] = Field(default_factory=dict)
    execution_time: float = 0.0  # seconds in the student's code (cells, and calls from hidden tests)
    figure_time: float = 0.0  # of execution_time: rendering the student's figures, as Jupyter does in the cell
    test_time: float = 0.0  # seconds of the hidden tests' own work (e.g. training rebuilt models)
    grading_time: float = 0.0  # wall time of the whole grading; the engine's overhead is the rest
    # How often grading waited for a time limit: cells stopped at limits.cell_timeout, calls from the
    # hidden tests at limits.test_timeout. A hang costs its wait once: a cell that timed out is not
    # run again, a function that hung is not called again.
    cell_timeouts: int = 0
    call_timeouts: int = 0
    late: LateInfo | None = None
    figures: list[FigureSummary] = Field(default_factory=list)
    # Free-text answers of manually graded questions (question id -> text), for the review pages.
    answers: dict[str, str] = Field(default_factory=dict)

    def to_gradescope(self) -> dict:
        """The Gradescope autograder `results.json` document."""
        return {
            "score": round(self.score, 4),
            "execution_time": round(self.execution_time, 3),
            "output": "\n".join(self.messages),
            "visibility": "visible",
            "stdout_visibility": "hidden",
            "tests": [t.to_gradescope() for t in self.tests],
            "extra_data": {
                "student_id": self.student_id,
                "status": self.status,
                "max_score": self.max_score,
                "questions": {q.id: {"score": q.score, "max_score": q.max_score} for q in self.questions},
            },
        }
