"""HTML reports: a feedback page per student, the instructor's batch report, and the review
sheets for manually graded answers.

Every page is one self-contained file: images are embedded as data URIs and no page carries a
script, so a page can be mailed or uploaded to an LMS as is. Jinja autoescaping is on and a
Content-Security-Policy forbids scripts, so a student's `<script>` in an answer or an output is
shown as text. Tests with visibility "hidden" reach a student's page only as counts per question.

Scores: `SubmissionResult.score` and `QuestionScore.score` are the automatic (test) part; manual
points come from the review sheets and are added on the feedback page. A question's maximum is
`points + manual_points` of its metadata.
"""

from __future__ import annotations

import base64
import csv
import io
import math
import os
import shutil
import statistics
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

import numpy as np
from jinja2 import DictLoader, Environment, StrictUndefined
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict, Field

from gradelab.late import apply_late, format_duration, format_points
from gradelab.models import LateInfo, QuestionKind, SubmissionResult, TestOutcome

FEEDBACK_FILE = "feedback.html"
FIGURES_DIR = "figures"  # <student>/figures/<question>_{student,reference,side_by_side}.png
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_TIMEOUT = 60.0  # seconds; a cold start on a loaded machine takes a few
REVIEW_COLUMNS = ("student_id", "question_id", "max_points", "points", "comment")

MOST_FAILED_ROWS = 15
SLOWEST_ROWS = 10
SAMPLE_CHARS = 600  # of a failure message quoted in the instructor report
MAX_BINS = 20

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Statuses that count as "did not pass"; a skipped test is neither passed nor failed.
_NOT_PASSED = frozenset({"failed", "error", "timeout", "not_answered"})
_TEST_LABELS = {"passed": "passed", "failed": "failed", "error": "error", "timeout": "timed out",
                "not_answered": "not answered", "skipped": "skipped"}
_SUBMISSION_NOTES = {
    "broken": "Your notebook could not be graded as submitted; see the messages below.",
    "timeout": "Grading stopped because your notebook ran too long; tests that did not run score 0.",
    "crashed": "The grader failed on this submission. This is not your fault: your instructor will look at it.",
}


class QuestionInfo(Protocol):
    """What the reports need of a question's configuration (`config.Question` fits)."""

    @property
    def id(self) -> str: ...
    @property
    def title(self) -> str: ...
    @property
    def kind(self) -> QuestionKind: ...
    @property
    def points(self) -> float: ...
    @property
    def manual_points(self) -> float: ...
    @property
    def rubric(self) -> str: ...


class ManualScore(BaseModel):
    """One manually graded answer, as read back from a review sheet."""

    model_config = ConfigDict(extra="forbid")

    student_id: str = Field(min_length=1)
    question_id: str = Field(min_length=1)
    points: float = Field(ge=0)
    comment: str = ""


class ReviewSheetError(ValueError):
    """A review sheet cannot be read; the message names the file and the row."""


# --- templates ------------------------------------------------------------------------------

_BASE = """\
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{% block title %}{% endblock %}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; padding: 0 1rem; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; background: #f6f6f6; padding: 0.5rem; margin: 0.25rem 0; max-height: 28rem; overflow: auto; }
section { border-top: 1px solid #ddd; margin-top: 1.2rem; }
.passed { color: #1b6e20; font-weight: bold; }
.failed { color: #a4161a; font-weight: bold; }
.notice { border-left: 4px solid #c77d00; background: #fff6e3; padding: 0.5rem 1rem; margin: 1rem 0; }
.panels { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; }
figure { margin: 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
.thumbs figure img { max-width: 18rem; }
</style>
</head>
<body>
{% block body %}{% endblock %}
</body>
</html>
"""

_MACROS = """\
{% macro panels(items, css="panels") %}
<div class="{{ css }}">
{% for panel in items %}
<figure><img src="{{ panel.uri }}" alt="{{ panel.caption }}"><figcaption>{{ panel.caption }}</figcaption></figure>
{% endfor %}
</div>
{% endmacro %}
"""

_FEEDBACK = """\
{% extends "base.html" %}
{% from "macros.html" import panels %}
{% block title %}Feedback: {{ page.student_id }}{% endblock %}
{% block body %}
<h1>Feedback for {{ page.student_id }}</h1>
<p id="total">Score: <strong>{{ page.total|points }} / {{ page.max_score|points }}</strong>
{% if page.pending %} (not final: manual grading of {{ page.pending|join(", ") }} is still to come){% endif %}</p>
{% if page.late %}
<div class="notice" id="late"><strong>Late submission: {{ page.late.how_late }}.</strong>
{% if page.late.penalty_points %}Penalty: &minus;{{ page.late.penalty_points|points }} points ({{ page.late.penalty_percent }}).
Score after the penalty: <strong>{{ page.late.final|points }}</strong>.{% else %}No penalty applies.{% endif %}
{% if page.late.reason %}<br>{{ page.late.reason }}{% endif %}</div>
{% endif %}
{% if page.note %}<div class="notice">{{ page.note }}</div>{% endif %}
{% if page.messages %}
<h2>Messages</h2>
{% for message in page.messages %}<pre>{{ message }}</pre>
{% endfor %}
{% endif %}
<h2>Questions</h2>
<table>
<tr><th>Question</th><th>Title</th><th>Score</th><th>Max</th><th>Status</th></tr>
{% for q in page.questions %}
<tr><td>{{ q.id }}</td><td>{{ q.title }}</td><td class="num">{{ q.score|points }}</td><td class="num">{{ q.max_score|points }}</td><td>{{ q.status }}</td></tr>
{% endfor %}
</table>
{% for q in page.questions %}
<section id="q-{{ q.id }}">
<h3>{{ q.id }}: {{ q.title }} ({{ q.score|points }} / {{ q.max_score|points }})</h3>
{% if q.comment %}<p>{{ q.comment }}</p>{% endif %}
{% for test in q.tests %}
<div class="test"><span class="{{ 'passed' if test.status == 'passed' else 'failed' }}">{{ labels[test.status] }}</span>
{{ test.name }} ({{ test.score|points }} / {{ test.max_score|points }})
{% if test.output %}<pre>{{ test.output }}</pre>{% endif %}</div>
{% endfor %}
{% if q.hidden_passed or q.hidden_failed %}
<p class="hidden-tests">Hidden tests: {{ q.hidden_passed }} passed, {{ q.hidden_failed }} failed.</p>
{% endif %}
{% if q.pending_points %}<p>Manual grading will add up to {{ q.pending_points|points }} {{ "point" if q.pending_points == 1 else "points" }}.</p>{% endif %}
{% if q.manual_comment %}<p class="manual"><strong>Grader's comment:</strong> {{ q.manual_comment }}</p>{% endif %}
{% if q.plot %}{{ panels(q.plot) }}{% endif %}
</section>
{% endfor %}
{% if page.figures %}
<h2>Figures captured from your notebook</h2>
{{ panels(page.figures, "panels thumbs") }}
{% endif %}
{% endblock %}
"""

_INSTRUCTOR = """\
{% extends "base.html" %}
{% from "macros.html" import panels %}
{% block title %}Grading report{% endblock %}
{% block body %}
<h1>Grading report</h1>
<h2>Submissions</h2>
<table id="counts">
<tr>{% for name in counts %}<th>{{ name }}</th>{% endfor %}</tr>
<tr>{% for name, n in counts.items() %}<td class="num" id="count-{{ name }}">{{ n }}</td>{% endfor %}</tr>
</table>
{% if mean is not none %}<p>Automatic score: mean {{ mean|points }}, median {{ median|points }} (of {{ max_score|points }}).</p>{% endif %}
<p id="time">Grading time: {{ wall_time }} wall clock; {{ cpu_time|seconds }} summed over submissions.</p>
<h2>Distribution of total scores</h2>
<img src="{{ totals_chart }}" alt="histogram of total scores">
<h2>Scores per question</h2>
<img src="{{ questions_chart }}" alt="histograms of each question's scores">
<h2 id="most-failed">Most-failed tests</h2>
{% if failed_tests %}
<table>
<tr><th>Test</th><th>Question</th><th>Visibility</th><th>Failures</th><th>Sample message</th></tr>
{% for row in failed_tests %}
<tr><td>{{ row.name }}</td><td>{{ row.question }}</td><td>{{ row.visibility }}</td><td class="num">{{ row.failures }}</td><td><pre>{{ row.sample }}</pre></td></tr>
{% endfor %}
</table>
{% else %}<p>No test failed.</p>{% endif %}
<h2 id="not-run">Submissions that did not run to the end</h2>
{% if not_run %}
<table>
<tr><th>Student</th><th>Status</th><th>Messages</th></tr>
{% for r in not_run %}
<tr><td>{{ r.student_id }}</td><td>{{ r.status }}</td><td>{% for message in r.messages %}<pre>{{ message }}</pre>{% endfor %}</td></tr>
{% endfor %}
</table>
{% else %}<p>Every submission ran.</p>{% endif %}
<h2 id="slowest">Slowest submissions</h2>
<table>
<tr><th>Student</th><th>Status</th><th>Grading time</th><th>Execution time</th></tr>
{% for r in slowest %}
<tr><td>{{ r.student_id }}</td><td>{{ r.status }}</td><td class="num">{{ r.grading_time|seconds }}</td><td class="num">{{ r.execution_time|seconds }}</td></tr>
{% endfor %}
</table>
<h2 id="plot-failures">Failed plot tests</h2>
{% for item in plot_failures %}
<section class="plot-failure">
<h3>{% if item.feedback_href %}<a href="{{ item.feedback_href }}">{{ item.student_id }}</a>{% else %}{{ item.student_id }}{% endif %}: {{ item.question_id }} {{ item.question_title }}</h3>
<p>Failed: {{ item.tests|join(", ") }}</p>
{% if item.panels %}{% if item.feedback_href %}<a href="{{ item.feedback_href }}">{{ panels(item.panels, "panels thumbs") }}</a>{% else %}{{ panels(item.panels, "panels thumbs") }}{% endif %}
{% else %}<p>No figures were saved for this question.</p>{% endif %}
</section>
{% else %}<p>No plot test failed.</p>
{% endfor %}
{% endblock %}
"""

_REVIEW = """\
{% extends "base.html" %}
{% block title %}Review {{ question.id }}{% endblock %}
{% block body %}
<h1>Manual grading: {{ question.id }} {{ question.title }}</h1>
<p>Up to {{ question.manual_points|points }} points. Enter points and comments in <code>{{ csv_name }}</code>
(blank points = not graded yet); comments are shown to the student.</p>
<h2>Rubric</h2>
<pre>{{ question.rubric or "(no rubric)" }}</pre>
<h2>Answers ({{ answers|length }})</h2>
{% for student_id, text in answers %}
<section id="student-{{ student_id }}"><h3>{{ student_id }}</h3>
{% if text.strip() %}<pre>{{ text }}</pre>{% else %}<p><em>no answer</em></p>{% endif %}</section>
{% endfor %}
{% endblock %}
"""

_ENV = Environment(
    loader=DictLoader({"base.html": _BASE, "macros.html": _MACROS, "feedback.html": _FEEDBACK,
                       "instructor.html": _INSTRUCTOR, "review.html": _REVIEW}),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_ENV.filters["points"] = format_points
_ENV.filters["seconds"] = lambda value: f"{value:.1f} s"


# --- images -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Panel:
    caption: str
    uri: str


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _png_uri(base: Path, relative: str) -> str | None:
    """The PNG at base/relative as a data URI; None if missing, not a PNG, or outside base."""
    path = (base / relative).resolve()
    if not path.is_relative_to(base.resolve()) or not path.is_file():
        return None
    data = path.read_bytes()
    return _data_uri(data) if data.startswith(_PNG_SIGNATURE) else None


def _plot_panels(student_dir: Path, question_id: str, student_caption: str) -> list[_Panel]:
    """Each of the student's figures of the question beside its reference (`<question>[_<figure>]_student.png`
    and `..._reference.png`), or the grader's combined image if that is all there is."""
    figures = f"{FIGURES_DIR}/{question_id}"
    panels = []
    for student_png in sorted((student_dir / FIGURES_DIR).glob(f"{question_id}*_student.png")):
        stem = student_png.name.removesuffix("_student.png")
        label = stem.removeprefix(question_id).strip("_")
        pair = [(f"{student_caption} {label}".strip(), _png_uri(student_dir, f"{FIGURES_DIR}/{stem}_student.png")),
                (f"reference {label}".strip(), _png_uri(student_dir, f"{FIGURES_DIR}/{stem}_reference.png"))]
        panels += [_Panel(caption, uri) for caption, uri in pair if uri]
    combined = _png_uri(student_dir, f"{figures}_side_by_side.png")
    if not panels and combined:
        panels = [_Panel(f"{student_caption} and reference", combined)]
    return panels


def _figure_uri(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return _data_uri(buffer.getvalue())


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


# --- student feedback -------------------------------------------------------------------------

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
    plot: list[_Panel] = field(default_factory=list)


def _is_late(info: LateInfo | None) -> bool:
    return info is not None and (info.marked_late or info.seconds_late > 0 or info.penalty_points > 0)


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
        hidden_failed=sum(t.status in _NOT_PASSED for t in hidden),
        manual_comment=manual_comment,
        plot=_plot_panels(student_dir, question.id, "your figure") if question.kind == "plot" else [],
    )


def _late_view(result: SubmissionResult, total: float) -> _LateView | None:
    info = result.late
    if info is None or not _is_late(info):
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
    figures = [_Panel(f"cell {f.cell}, figure {f.index + 1}", uri) for f in result.figures
               if f.png and (uri := _png_uri(student_dir, f.png))]
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
    html = _ENV.get_template("feedback.html").render(page=page, labels=_TEST_LABELS)
    student_dir.mkdir(parents=True, exist_ok=True)
    path = student_dir / FEEDBACK_FILE
    path.write_text(html, encoding="utf-8")
    return path


# --- instructor report ------------------------------------------------------------------------

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
    panels: list[_Panel]
    feedback_href: str | None


def _most_failed(results: Sequence[SubmissionResult]) -> list[_FailedTest]:
    failed = [t for r in results for t in r.tests if t.status in _NOT_PASSED]
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
        student_dir = results_dir / result.student_id
        feedback = student_dir / FEEDBACK_FILE
        # Relative, so the report and the feedback pages can move together.
        href = quote(Path(os.path.relpath(feedback, report_dir)).as_posix()) if feedback.is_file() else None
        for question in questions:
            failed = [t.name for t in result.tests if t.question == question.id and t.status in _NOT_PASSED]
            if question.kind == "plot" and failed:
                failures.append(_PlotFailure(result.student_id, question.id, question.title, failed,
                                             _plot_panels(student_dir, question.id, "student"), href))
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
                   "timeout": statuses["timeout"], "crashed": statuses["crashed"],
                   "late": sum(_is_late(r.late) for r in results)},
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
    out.write_text(_ENV.get_template("instructor.html").render(**context), encoding="utf-8")
    return out


# --- manual review sheets ---------------------------------------------------------------------

def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(spreadsheet row number, row) of a review sheet, header checked. Accepts UTF-8 with or
    without a BOM and the `;` or tab separators spreadsheets use in some locales."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ReviewSheetError(f"{path}: not UTF-8 ({exc}); save it as 'CSV UTF-8'") from exc
    header_line = text.split("\n", 1)[0]
    delimiter = max((",", ";", "\t"), key=header_line.count)
    records = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = [name.strip() for name in next(records, [])]
    missing = [name for name in REVIEW_COLUMNS if name not in header]
    if missing:
        raise ReviewSheetError(f"{path}: missing column(s) {', '.join(missing)}; expected {','.join(REVIEW_COLUMNS)}")
    for number, record in enumerate(records, start=2):  # the header is row 1
        if any(cell.strip() for cell in record):
            yield number, dict(zip(header, record + [""] * (len(header) - len(record))))


def _number(text: str, where: str, column: str) -> float:
    try:
        value = float(text.strip().replace(",", "."))  # a decimal comma, as some spreadsheets write it
    except ValueError:
        raise ReviewSheetError(f"{where}: {column} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ReviewSheetError(f"{where}: {column} {text!r} is not a number")
    return value


def read_review_sheet(path: Path) -> list[ManualScore]:
    """The graded rows of a review sheet; rows with blank points are not graded yet and skipped."""
    scores: list[ManualScore] = []
    seen: set[tuple[str, str]] = set()
    for number, row in _csv_rows(path):
        student_id, question_id, points_text = (row[c].strip() for c in ("student_id", "question_id", "points"))
        where = f"{path}, row {number} (student {student_id!r})"
        if not points_text:
            continue
        if not student_id or not question_id:
            raise ReviewSheetError(f"{where}: student_id and question_id must not be blank")
        if (student_id, question_id) in seen:
            raise ReviewSheetError(f"{where}: {question_id} of {student_id} is graded twice")
        seen.add((student_id, question_id))
        max_points = _number(row["max_points"], where, "max_points")
        points = _number(points_text, where, "points")
        if not 0 <= points <= max_points:
            raise ReviewSheetError(f"{where}: points {points_text} are outside [0, {format_points(max_points)}]")
        scores.append(ManualScore(student_id=student_id, question_id=question_id, points=points,
                                  comment=row["comment"]))
    return scores


def write_review_sheet(results: Sequence[SubmissionResult], questions: Sequence[QuestionInfo], *,
                       answers: Mapping[str, Mapping[str, str]], out_dir: Path) -> list[Path]:
    """For each question with manual points, `review_<qid>.html` (answers + rubric) and the
    sheet `review_<qid>.csv` to fill in. `answers` maps student id -> question id -> answer text.
    Points and comments already entered in an existing sheet are kept."""
    out_dir.mkdir(parents=True, exist_ok=True)
    student_ids = sorted({r.student_id for r in results})
    written: list[Path] = []
    for question in (q for q in questions if q.manual_points > 0):
        page, sheet = out_dir / f"review_{question.id}.html", out_dir / f"review_{question.id}.csv"
        entered = ({row["student_id"].strip(): (row["points"], row["comment"]) for _, row in _csv_rows(sheet)}
                   if sheet.exists() else {})
        texts = [(sid, answers.get(sid, {}).get(question.id, "")) for sid in student_ids]
        page.write_text(_ENV.get_template("review.html").render(question=question, answers=texts, csv_name=sheet.name),
                        encoding="utf-8")
        # utf-8-sig: Excel reads a file without a BOM as the local code page and mangles "Ø".
        with sheet.open("w", encoding="utf-8-sig", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(REVIEW_COLUMNS)
            for sid in student_ids:
                points, comment = entered.get(sid, ("", ""))
                writer.writerow([sid, question.id, format_points(question.manual_points), points, comment])
        written += [page, sheet]
    return written


# --- screenshots ------------------------------------------------------------------------------

def chromium_command(user_data_dir: Path, *arguments: str) -> list[str]:
    """Headless Chromium with a throwaway profile and no background network traffic."""
    return [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={user_data_dir}", *arguments]


def screenshot(html: Path, png: Path, *, width: int = 1280, height: int = 2000) -> bool:
    """Render `html` to `png` with headless Chromium; False if Chromium is not installed."""
    if shutil.which(str(CHROMIUM)) is None:
        return False
    png = png.resolve()
    png.unlink(missing_ok=True)  # so a stale file cannot pass for a fresh screenshot
    with tempfile.TemporaryDirectory(prefix="gradelab-chromium-") as profile:
        proc = subprocess.run(
            chromium_command(Path(profile), f"--screenshot={png}", f"--window-size={width},{height}",
                             html.resolve().as_uri()),
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT)
    if proc.returncode != 0 or not png.is_file():
        tail = "\n".join(proc.stderr.splitlines()[-5:])
        raise RuntimeError(f"chromium could not screenshot {html} (exit {proc.returncode}):\n{tail}")
    return True
