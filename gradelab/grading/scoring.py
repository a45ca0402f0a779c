"""From verdicts to a result: question scores, the SubmissionResult, and its files on disk."""

from __future__ import annotations

import json
from pathlib import Path

from gradelab.boundary.figures import FigureData
from gradelab.boundary.messages import FigureError
from gradelab.boundary.records import FigureSummary, QuestionScore, SubmissionResult, SubmissionStatus, TestOutcome
from gradelab.config import GradingConfig, question_of
from gradelab.grading.submission import Submission
from gradelab.project import FIGURES_DIR, RESULTS_FILE, SUBMISSION_FILE


def question_scores(config: GradingConfig, outcomes: list[TestOutcome]) -> list[QuestionScore]:
    scores = []
    for q in config.questions:
        mine = [o for o in outcomes if o.question == q.id]
        scores.append(QuestionScore(
            id=q.id, title=q.title, kind=q.kind, score=round(sum(o.score for o in mine), 4),
            max_score=q.total, passed=sum(o.status == "passed" for o in mine), total=len(mine),
            needs_manual=q.manual_points > 0))
    return scores


def unrun_result(config: GradingConfig, status: SubmissionStatus, message: str, **base) -> SubmissionResult:
    """The result of a submission that gets no score: a file that is not a notebook of this
    assignment, a sandbox that sent malformed data, a failure of the grader itself."""
    return SubmissionResult(status=status, messages=[message], questions=question_scores(config, []), **base)


def submission_result(config: GradingConfig, *, status: str, outcomes: list[TestOutcome], execution,
                      messages: list[str], submission: Submission, layers: dict[str, str],
                      **base) -> SubmissionResult:
    """The result of a submission that was loaded (run or not): scores, messages, timings.

    `execution` is the supervisor's Execution; `base` holds the identity fields (student_id,
    source, content_hash, max_score)."""
    messages = submission.problems + execution_messages(execution) + messages
    # `layers`: what the submission's sandboxes applied, or, when none ran, what the machine offers.
    if missing := [f"{n} ({state})" for n, state in layers.items() if state != "available"]:
        messages.append("Sandbox layers not applied to this submission: " + ", ".join(missing))
    result = SubmissionResult(
        status=status, tests=outcomes, questions=question_scores(config, outcomes),
        messages=messages, sandbox_layers=dict(layers), answers=answers_by_question(submission),
        execution_time=round(execution.student_seconds, 3), figure_time=round(execution.figure_seconds, 3),
        test_time=round(max(0.0, sum(o.duration for o in outcomes) - execution.call_seconds), 3),
        cell_timeouts=execution.cell_timeouts, call_timeouts=execution.call_timeouts, **base)
    result.score = round(sum(q.score for q in result.questions), 4)
    return result


def execution_messages(execution) -> list[str]:
    messages = []
    for index in sorted(execution.cells):
        cell = execution.cells[index]
        if cell.status in ("timeout", "crashed", "refused"):
            messages.append(f"Cell {index}: {cell.status}: {cell.error.message if cell.error else ''}".rstrip(": "))
    if execution.skipped:
        messages.append(f"Cells {sorted(execution.skipped)} were skipped when the notebook was run again "
                        f"after they stopped the process.")
    return messages


def answers_by_question(submission: Submission) -> dict[str, str]:
    answers: dict[str, str] = {}
    for grade_id, text in submission.answers.items():
        if qid := question_of(grade_id):
            answers[qid] = (answers.get(qid, "") + "\n\n" + text).strip()
    return answers


def write_result(student_dir: Path, result: SubmissionResult) -> None:
    """results.json (Gradescope's format) and submission.json (everything), written atomically."""
    student_dir.mkdir(parents=True, exist_ok=True)
    for name, text in ((RESULTS_FILE, json.dumps(result.to_gradescope(), indent=2)),
                       (SUBMISSION_FILE, result.model_dump_json(indent=2))):
        tmp = student_dir / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(student_dir / name)


def save_figures(figures: list[FigureData | FigureError], artifacts: dict[str, bytes],
                 student_dir: Path | None) -> list[FigureSummary]:
    """Summaries of the figures the notebook drew; with `student_dir`, their PNGs and those the
    hidden tests attached (`artifacts`) are written to its figures/. Both lists are bounded
    (gradelab.boundary.messages), and so are the files written."""
    summaries = []
    for fig in figures:
        drawn = isinstance(fig, FigureData)
        summary = FigureSummary(cell=fig.cell, index=fig.index, helper=fig.helper if drawn else None)
        if student_dir and drawn:
            png = fig.png
            name = f"{FIGURES_DIR}/cell{summary.cell:03d}_{summary.index}.png"
            (student_dir / FIGURES_DIR).mkdir(parents=True, exist_ok=True)
            (student_dir / name).write_bytes(png)
            summary.png = name
        summaries.append(summary)
    if student_dir:
        for name, png in artifacts.items():
            (student_dir / FIGURES_DIR).mkdir(parents=True, exist_ok=True)
            (student_dir / FIGURES_DIR / name).write_bytes(png)
    return summaries
