"""The instructor's batch report: counts, score distributions, most-failed tests, submissions
that did not run, the slowest ones, and every failed plot test beside its reference."""

from __future__ import annotations

import io
import math
import os
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gradelab.boundary.records import SubmissionResult, TestOutcome
from gradelab.project import FEEDBACK_FILE, ResultsDir
from gradelab.publish.late import is_late
from gradelab.publish.pages import NOT_PASSED, TEMPLATES, Panel, QuestionInfo, data_uri, plot_panels

MOST_FAILED_ROWS = 15
SLOWEST_ROWS = 10
SAMPLE_CHARS = 600  # of a failure message quoted in the report
MAX_BINS = 20


@dataclass(frozen=True)
class _FailedTest:
    name: str
    question: str
    visibility: str
    failures: int
    sample: str


@dataclass(frozen=True)
class _PlotFailure:
    student_id: str
    question_id: str
    question_title: str
    tests: list[str]
    panels: list[Panel]
    feedback_href: str | None


def _figure_uri(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return data_uri(buffer.getvalue())


def _histogram(ax: Axes, values: Sequence[float], max_score: float) -> None:
    # Half-point bins for small questions, at most MAX_BINS for the total; bonus points may
    # push a score above the maximum.
    upper = max([max_score, *values, 1e-9])
    bins = max(1, min(MAX_BINS, math.ceil(upper * 2)))
    ax.hist(values, bins=np.linspace(0, upper, bins + 1), color="#4c72b0", edgecolor="white")
    ax.set_xlim(0, upper)


def _totals_chart(results: Sequence[SubmissionResult]) -> str:
    fig = Figure(figsize=(7, 3), layout="constrained")
    FigureCanvasAgg(fig)  # a standalone Agg figure: pyplot's global state is left alone
    ax = fig.subplots()
    _histogram(ax, [r.score for r in results], max((r.max_score for r in results), default=0))
    ax.set_xlabel("automatic score")
    ax.set_ylabel("submissions")
    return _figure_uri(fig)


def _questions_chart(results: Sequence[SubmissionResult], questions: Sequence[QuestionInfo]) -> str:
    questions = [q for q in questions if q.points > 0]  # manual-only questions have no automatic score
    columns = 4
    rows = max(1, math.ceil(len(questions) / columns))
    fig = Figure(figsize=(columns * 2.6, rows * 1.9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, question in zip(axes, questions):
        scores = [q.score for r in results for q in r.questions if q.id == question.id]
        ax.set_title(f"{question.id} (n={len(scores)})", fontsize=9)
        ax.tick_params(labelsize=7)
        if scores:
            _histogram(ax, scores, question.points)
        else:
            ax.text(0.5, 0.5, "no automatic scores", ha="center", va="center", fontsize=8, transform=ax.transAxes)
    for ax in axes[len(questions):]:
        ax.set_axis_off()
    return _figure_uri(fig)


def _most_failed(results: Sequence[SubmissionResult]) -> list[_FailedTest]:
    failed = [t for r in results for t in r.tests if t.status in NOT_PASSED]
    counts = Counter((t.question, t.name) for t in failed)
    first: dict[tuple[str, str], TestOutcome] = {}  # a failure with a message, if any has one
    for test in failed:
        key = (test.question, test.name)
        if key not in first or (test.output and not first[key].output):
            first[key] = test
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:MOST_FAILED_ROWS]
    return [_FailedTest(name, question, first[question, name].visibility, n,
                        first[question, name].output[:SAMPLE_CHARS]) for (question, name), n in ranked]


def _plot_failures(results: Sequence[SubmissionResult], questions: Sequence[QuestionInfo], *,
                   results_dir: Path, report_dir: Path) -> list[_PlotFailure]:
    failures = []
    for result in sorted(results, key=lambda r: r.student_id):
        student_dir = ResultsDir(results_dir).student(result.student_id)
        feedback = student_dir / FEEDBACK_FILE
        # Relative, so the report and the feedback pages can move together.
        href = quote(Path(os.path.relpath(feedback, report_dir)).as_posix()) if feedback.is_file() else None
        for question in questions:
            failed = [t.name for t in result.tests if t.question == question.id and t.status in NOT_PASSED]
            if question.kind == "plot" and failed:
                failures.append(_PlotFailure(result.student_id, question.id, question.title, failed,
                                             plot_panels(student_dir, question.id, "student"), href))
    return failures


def write_instructor_report(results: Sequence[SubmissionResult], questions: Sequence[QuestionInfo], *, out: Path,
                            grading_seconds: float | None = None, results_dir: Path | None = None) -> Path:
    """Write the batch report to `out`. `results_dir` holds `<student_id>/` (default: out's folder);
    write the feedback pages first so the plot-failure thumbnails can link to them."""
    results_dir = results_dir if results_dir is not None else out.parent
    out.parent.mkdir(parents=True, exist_ok=True)
    statuses = Counter(r.status for r in results)
    scores = [r.score for r in results]
    context = {
        "counts": {"submissions": len(results), "graded": statuses["graded"], "broken": statuses["broken"],
                   "timeout": statuses["timeout"], "crashed": statuses["crashed"], "malformed": statuses["malformed"],
                   "late": sum(is_late(r.late) for r in results)},
        "mean": statistics.fmean(scores) if scores else None,
        "median": statistics.median(scores) if scores else None,
        "max_score": max((r.max_score for r in results), default=0.0),
        "wall_time": f"{grading_seconds:.1f} s" if grading_seconds is not None else "not recorded",
        "cpu_time": sum(r.grading_time for r in results),
        "totals_chart": _totals_chart(results),
        "questions_chart": _questions_chart(results, questions),
        "failed_tests": _most_failed(results),
        "not_run": sorted((r for r in results if r.status != "graded"), key=lambda r: (r.status, r.student_id)),
        "slowest": sorted(results, key=lambda r: -r.grading_time)[:SLOWEST_ROWS],
        "plot_failures": _plot_failures(results, questions, results_dir=results_dir, report_dir=out.parent),
    }
    out.write_text(TEMPLATES.get_template("instructor.html").render(**context), encoding="utf-8")
    return out
