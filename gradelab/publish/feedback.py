"""The feedback page of one student: scores, what failed and why, plots beside the reference,
the grader's comments, the late penalty.

Tests with visibility "hidden" reach a student's page only as counts per question.
Scores: `SubmissionResult.score` and `QuestionScore.score` are the automatic (test) part; manual
points come from the review sheets and are added on the page. A question's maximum is
`points + manual_points` of its metadata.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gradelab.boundary.records import SubmissionResult, TestOutcome
from gradelab.project import FEEDBACK_FILE
from gradelab.publish.late import apply_late, format_duration, is_late
from gradelab.publish.pages import NOT_PASSED, TEMPLATES, Panel, QuestionInfo, plot_panels, png_uri


_TEST_LABELS = {"passed": "passed", "failed": "failed", "error": "error", "timeout": "timed out",
                "not_answered": "not answered", "skipped": "skipped"}
_SUBMISSION_NOTES = {
    "broken": "Your notebook could not be graded as submitted; see the messages below.",
    "timeout": "Grading stopped because your notebook ran too long; tests that did not run score 0.",
    "crashed": "The grader failed on this submission. This is not your fault: your instructor will look at it.",
    "malformed": "Your submission was rejected: while it ran, the grader's own code in its sandbox was changed "
                 "or bypassed, so none of its results can be trusted.",
}


@dataclass(frozen=True)
class _LateView:
    how_late: str
    penalty_points: float
    penalty_percent: str
    final: float
    reason: str


@dataclass
class _QuestionView:
    id: str
    title: str
    score: float
    max_score: float
    status: str
    pending_points: float = 0.0  # manual points not graded yet
    comment: str = ""
    tests: list[TestOutcome] = field(default_factory=list)  # the ones a student may see
    hidden_passed: int = 0
    hidden_failed: int = 0
    manual_comment: str = ""
    plot: list[Panel] = field(default_factory=list)


def _question_status(score: float, max_score: float, *, graded: bool, pending: bool) -> str:
    if not graded:
        return "not graded"
    if pending:
        return "awaiting manual grading"
    if score >= max_score:
        return "full marks"
    return "partial credit" if score > 0 else "no credit"


def _question_view(result: SubmissionResult, question: QuestionInfo, manual: Mapping[str, tuple[float, str]],
                   student_dir: Path) -> _QuestionView:
    auto = next((q for q in result.questions if q.id == question.id), None)
    manual_points, manual_comment = manual.get(question.id, (0.0, ""))
    score = (auto.score if auto else 0.0) + manual_points
    max_score = question.points + question.manual_points
    pending = question.manual_points > 0 and question.id not in manual
    tests = [t for t in result.tests if t.question == question.id]
    hidden = [t for t in tests if t.visibility == "hidden"]
    return _QuestionView(
        id=question.id,
        title=question.title,
        score=score,
        max_score=max_score,
        status=_question_status(score, max_score, pending=pending,
                                graded=result.status == "graded" or auto is not None or question.id in manual),
        pending_points=question.manual_points if pending else 0.0,
        comment=auto.comment if auto else "",
        tests=[t for t in tests if t.visibility != "hidden"],
        hidden_passed=sum(t.status == "passed" for t in hidden),
        hidden_failed=sum(t.status in NOT_PASSED for t in hidden),
        manual_comment=manual_comment,
        plot=plot_panels(student_dir, question.id, "your figure") if question.kind == "plot" else [],
    )


def _late_view(result: SubmissionResult, total: float) -> _LateView | None:
    info = result.late
    if info is None or not is_late(info):
        return None
    return _LateView(
        how_late=f"{format_duration(info.seconds_late)} late" if info.seconds_late > 0 else "marked late",
        penalty_points=info.penalty_points,
        penalty_percent=f"{info.penalty_fraction * 100:g}% of the maximum",
        final=apply_late(result.model_copy(update={"score": total}), info),
        reason=info.reason,
    )


def write_feedback(result: SubmissionResult, questions: Sequence[QuestionInfo], *, student_dir: Path,
                   manual: Mapping[str, tuple[float, str]] | None = None) -> Path:
    """Write `student_dir/feedback.html`; `manual` maps a question id to (points, grader's comment)."""
    manual = manual or {}
    views = [_question_view(result, q, manual, student_dir) for q in questions]
    total = result.score + sum(points for points, _ in manual.values())
    figures = [Panel(f"cell {f.cell}, figure {f.index + 1}", uri) for f in result.figures
               if f.png and (uri := png_uri(student_dir, f.png))]
    page = {
        "student_id": result.student_id,
        "total": total,
        "max_score": result.max_score,
        "pending": [q.id for q in questions if q.manual_points > 0 and q.id not in manual],
        "late": _late_view(result, total),
        "note": _SUBMISSION_NOTES.get(result.status, ""),
        "messages": result.messages,
        "questions": views,
        "figures": figures,
    }
    html = TEMPLATES.get_template("feedback.html").render(page=page, labels=_TEST_LABELS)
    student_dir.mkdir(parents=True, exist_ok=True)
    path = student_dir / FEEDBACK_FILE
    path.write_text(html, encoding="utf-8")
    return path
