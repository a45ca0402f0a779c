"""Feedback pages, the instructor report and review sheets, on a small graded batch written to disk
the way `gradelab grade --out` lays it out; the instructor report is also loaded in headless
Chromium, watching its console through the DevTools protocol."""

from __future__ import annotations

import base64
import contextlib
import csv
import fcntl
import json
import os
import re
import select
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from gradelab.boundary.records import FigureSummary, LateInfo, QuestionKind, QuestionScore, SubmissionResult
from gradelab.boundary.records import TestOutcome as Outcome  # a Test* name would be collected by pytest
from gradelab.publish.feedback import write_feedback
from gradelab.publish.instructor import write_instructor_report
from gradelab.publish.review import ManualScore, ReviewSheetError, read_review_sheet, write_review_sheet
from gradelab.publish.screenshot import chromium_command, screenshot


@dataclass(frozen=True)
class Question:
    id: str
    title: str
    kind: QuestionKind
    points: float
    manual_points: float = 0
    rubric: str = ""


QUESTIONS = [
    Question("q1_1", "Tensors", "auto", 2),
    Question("q1_2", "Sigmoid and its derivative", "auto", 3),
    Question("q2_1", "Two problems of the sigmoid", "manual", 0, 2,
             "1 point: saturation, the derivative is at most 0.25.\n1 point: not zero-centred."),
    Question("q2_2", "Gradients of the sigmoid model", "plot", 2, 1, "1 point: gradients shrink towards layer 1."),
]
MAX_SCORE = 10.0
SECRET = "SECRET-HIDDEN-7f3a"  # must never reach a student's page
SCRIPT = "<script>alert('pwned')</script>"
PLOT_FAILURE = "the violins should shrink from the last layer to the first"

# (name, question, points, visibility) of every test, in the order the grader runs them
TESTS = [
    ("test_tensor_shapes", "q1_1", 1.0, "visible"),
    ("test_tensor_values", "q1_1", 1.0, "hidden"),
    ("test_sigmoid_values", "q1_2", 1.0, "visible"),
    ("test_sigmoid_derivative", "q1_2", 1.0, "after_due_date"),
    (f"test_{SECRET}", "q1_2", 1.0, "hidden"),
    ("test_violin_plot", "q2_2", 2.0, "visible"),
]


def graded(student_id: str, failures: dict[str, tuple[str, str]] | None = None, *, status: str = "graded",
           **fields) -> SubmissionResult:
    """A submission whose tests pass except `failures` (test name -> (status, output))."""
    failures = failures or {}
    tests = []
    for name, question, points, visibility in TESTS:
        outcome, output = failures.get(name, ("passed", ""))
        tests.append(Outcome(name=name, question=question, score=points if outcome == "passed" else 0.0,
                             max_score=points, status=outcome, output=output, visibility=visibility))
    questions = []
    for q in QUESTIONS:
        mine = [t for t in tests if t.question == q.id]
        questions.append(QuestionScore(id=q.id, title=q.title, kind=q.kind, score=sum(t.score for t in mine),
                                       max_score=q.points, passed=sum(t.status == "passed" for t in mine),
                                       total=len(mine), needs_manual=q.manual_points > 0))
    return SubmissionResult(student_id=student_id, source=f"{student_id}.ipynb", content_hash="0" * 64,
                            status=status, score=sum(t.score for t in tests), max_score=MAX_SCORE, tests=tests,
                            questions=questions, **fields)


def not_run(student_id: str, status: str, message: str, tests: list[Outcome] | None = None) -> SubmissionResult:
    return SubmissionResult(student_id=student_id, source=f"{student_id}.ipynb", content_hash="1" * 64,
                            status=status, max_score=MAX_SCORE, messages=[message], grading_time=300.0,
                            tests=tests or [])


def draw_violins(path: Path, spreads: list[float]) -> None:
    rng = np.random.default_rng(0)
    fig = Figure(figsize=(4, 3))
    ax = fig.subplots()
    ax.violinplot([rng.normal(0, s, 200) for s in spreads])
    ax.set_title("gradients per layer")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=60)


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def image_sources(html: str) -> list[str]:
    return re.findall(r'src="([^"]*)"', html)


@dataclass
class Batch:
    dir: Path
    results: dict[str, SubmissionResult]
    report: Path

    def feedback(self, student_id: str) -> str:
        return (self.dir / student_id / "feedback.html").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> Batch:
    out = tmp_path_factory.mktemp("graded")
    results = [
        graded("s01_full", grading_time=4.0),
        graded("s02_partial", {
            "test_sigmoid_values": ("failed", "AssertionError: sigmoid(0) should be 0.5, got 0.25\n"
                                              f"student printed: {SCRIPT}"),
            f"test_{SECRET}": ("failed", f"{SECRET}: expected 0.7311 at x=1"),
        }, messages=[f"cell 4 printed {SCRIPT}"], grading_time=6.0),
        not_run("s03_broken", "broken", "the notebook could not be read: Expecting ',' delimiter: line 12 column 5"),
        not_run("s04_timeout", "timeout", "the submission ran longer than its 300 s limit (cell 7)",
                [Outcome(name="test_sigmoid_values", question="q1_2", score=0, max_score=1, status="timeout")]),
        graded("s05_plot", {
            "test_sigmoid_values": ("error", "NameError: name 'sigmoid' is not defined"),
            "test_violin_plot": ("failed", PLOT_FAILURE),
        }, figures=[FigureSummary(cell=12, index=0, png="figures/cell12_0.png")], grading_time=9.0),
        graded("s06_late", late=LateInfo(marked_late=True, seconds_late=2 * 86_400 + 3_600, penalty_fraction=0.3,
                                         penalty_points=3.0, reason="2 days 1 h after the due date: -30% = -3 points"),
               grading_time=5.0),
    ]
    for result in results:
        student_dir = out / result.student_id
        student_dir.mkdir()
        (student_dir / "submission.json").write_text(result.model_dump_json(indent=1), encoding="utf-8")
        (student_dir / "results.json").write_text(json.dumps(result.to_gradescope()), encoding="utf-8")
    draw_violins(out / "s05_plot/figures/q2_2_student.png", [1.0, 1.0, 1.0])
    draw_violins(out / "s05_plot/figures/q2_2_reference.png", [0.1, 0.5, 1.0])
    draw_violins(out / "s05_plot/figures/cell12_0.png", [1.0, 1.0, 1.0])
    for result in results:
        write_feedback(result, QUESTIONS, student_dir=out / result.student_id)
    report = write_instructor_report(results, QUESTIONS, out=out / "report.html", grading_seconds=42.5)
    return Batch(out, {r.student_id: r for r in results}, report)


# ---------------------------------------------------------------- feedback pages


def test_feedback_shows_scores_and_visible_failures(batch: Batch) -> None:
    html = batch.feedback("s02_partial")
    assert "Score: <strong>5 / 10</strong>" in html  # 7 automatic points, 2 lost
    assert "not final: manual grading of q2_1, q2_2" in html
    assert "Manual grading will add up to 2 points." in html
    assert "sigmoid(0) should be 0.5, got 0.25" in html
    assert "test_sigmoid_derivative" in html  # after_due_date tests are shown
    assert "<td>partial credit</td>" in html
    assert "<td>full marks</td>" in batch.feedback("s01_full")


def test_feedback_hides_hidden_tests_but_counts_them(batch: Batch) -> None:
    for student_id in batch.results:
        assert SECRET not in batch.feedback(student_id), student_id
    html = batch.feedback("s02_partial")
    assert "Hidden tests: 1 passed, 0 failed." in html  # q1_1
    assert "Hidden tests: 0 passed, 1 failed." in html  # q1_2, the secret one


def test_feedback_escapes_student_html(batch: Batch) -> None:
    html = batch.feedback("s02_partial")
    assert "<script" not in html
    assert "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;" in html
    assert html.count("&lt;script&gt;") == 2  # in the test output and in the message


def test_feedback_embeds_plot_figures(batch: Batch) -> None:
    html = batch.feedback("s05_plot")
    figures = batch.dir / "s05_plot/figures"
    for name in ("q2_2_student.png", "q2_2_reference.png", "cell12_0.png"):
        assert b64(figures / name) in html, name
    assert all(src.startswith("data:image/png;base64,") for src in image_sources(html))
    assert PLOT_FAILURE in html
    assert "your figure" in html and "reference" in html


def test_feedback_of_broken_and_late_submissions(batch: Batch) -> None:
    broken = batch.feedback("s03_broken")
    assert "the notebook could not be read: Expecting &#39;,&#39; delimiter" in broken
    assert "<td>not graded</td>" in broken
    late = batch.feedback("s06_late")
    assert "Late submission: 2 days 1 h late." in late
    assert "Penalty: &minus;3 points (30% of the maximum)" in late
    assert "Score after the penalty: <strong>4</strong>" in late
    assert "2 days 1 h after the due date: -30% = -3 points" in late
    assert 'id="late"' not in batch.feedback("s01_full")


def test_feedback_of_late_submission_without_penalty(batch: Batch, tmp_path: Path) -> None:
    on_grace = batch.results["s01_full"].model_copy(update={"late": LateInfo(marked_late=True, reason="within grace")})
    html = write_feedback(on_grace, QUESTIONS, student_dir=tmp_path).read_text(encoding="utf-8")
    assert "Late submission: marked late.</strong>\nNo penalty applies." in html


def test_feedback_with_manual_scores(batch: Batch, tmp_path: Path) -> None:
    comment = 'Saturation yes, but "zero-centred" <is missing>'
    page = write_feedback(batch.results["s01_full"], QUESTIONS, student_dir=tmp_path,
                          manual={"q2_1": (1.5, comment), "q2_2": (1.0, "")})
    html = page.read_text(encoding="utf-8")
    assert "Score: <strong>9.5 / 10</strong>" in html  # 7 automatic + 1.5 + 1
    assert "not final" not in html
    assert "Saturation yes, but &#34;zero-centred&#34; &lt;is missing&gt;" in html
    assert "<td>q2_1</td><td>Two problems of the sigmoid</td><td class=\"num\">1.5</td>" in html


# ---------------------------------------------------------------- instructor report


def section(html: str, anchor: str) -> str:
    """The HTML from the heading with id `anchor` to the next h2."""
    start = html.index(f'id="{anchor}"')
    end = html.find("<h2", start)
    return html[start:end if end != -1 else len(html)]


def test_instructor_report(batch: Batch) -> None:
    html = batch.report.read_text(encoding="utf-8")
    for name, count in {"submissions": 6, "graded": 4, "broken": 1, "timeout": 1, "crashed": 0, "late": 1}.items():
        assert f'id="count-{name}">{count}<' in html, name
    assert "42.5 s wall clock" in html
    sources = image_sources(html)
    assert len(sources) >= 4 and all(src.startswith("data:image/png;base64,") for src in sources)

    most_failed = section(html, "most-failed")
    first_row = most_failed.split("<tr>")[2]
    assert "<td>test_sigmoid_values</td><td>q1_2</td>" in first_row and '<td class="num">3</td>' in first_row
    assert "sigmoid(0) should be 0.5" in first_row  # the sample message
    assert f"test_{SECRET}" in most_failed  # the instructor does see hidden tests

    not_run = section(html, "not-run")
    assert "s03_broken" in not_run and "the notebook could not be read" in not_run
    assert "s04_timeout" in not_run and "longer than its 300 s limit" in not_run
    assert "s01_full" not in not_run

    plots = section(html, "plot-failures")
    assert plots.count('class="plot-failure"') == 1
    assert 'href="s05_plot/feedback.html"' in plots
    figures = batch.dir / "s05_plot/figures"
    assert b64(figures / "q2_2_student.png") in plots and b64(figures / "q2_2_reference.png") in plots
    assert "<script" not in html


def test_instructor_report_links_feedback_pages_relatively(batch: Batch, tmp_path: Path) -> None:
    results_dir = tmp_path / "graded"
    draw_violins(results_dir / "s05_plot/figures/q2_2_student.png", [1.0, 0.2])
    out = write_instructor_report([batch.results["s05_plot"]], QUESTIONS, out=tmp_path / "reports/index.html",
                                  results_dir=results_dir)
    plots = section(out.read_text(encoding="utf-8"), "plot-failures")
    assert b64(results_dir / "s05_plot/figures/q2_2_student.png") in plots
    assert "href=" not in plots  # no feedback page there to link to
    write_feedback(batch.results["s05_plot"], QUESTIONS, student_dir=results_dir / "s05_plot")
    out = write_instructor_report([batch.results["s05_plot"]], QUESTIONS, out=out, results_dir=results_dir)
    assert 'href="../graded/s05_plot/feedback.html"' in out.read_text(encoding="utf-8")


# ---------------------------------------------------------------- review sheets

ANSWERS = {
    "s01_full": {"q2_1": "It saturates: σ'(x) ≤ 0.25, so gradients vanish.\nAnd it is not zero-centred."},
    "s02_partial": {"q2_1": f"{SCRIPT} it saturates"},
}
COMMENT = 'Good, but "zero-centred" needs a reason, Ødegård\nsecond line'


def fill(sheet: Path, points: dict[str, str], *, encoding: str = "utf-8-sig", delimiter: str = ",") -> None:
    """Enter points (and COMMENT on the first graded row) the way a spreadsheet saves them."""
    with sheet.open(encoding="utf-8-sig", newline="") as stream:
        rows = list(csv.DictReader(stream))
    for row in rows:
        row["points"] = points.get(row["student_id"], "")
        row["comment"] = COMMENT if row["student_id"] == "s01_full" else ""
    with sheet.open("w", encoding=encoding, newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)


def test_review_sheet_pages(batch: Batch, tmp_path: Path) -> None:
    paths = write_review_sheet(list(batch.results.values()), QUESTIONS, answers=ANSWERS, out_dir=tmp_path)
    assert [p.name for p in paths] == ["review_q2_1.html", "review_q2_1.csv", "review_q2_2.html", "review_q2_2.csv"]
    html = paths[0].read_text(encoding="utf-8")
    assert "σ&#39;(x) ≤ 0.25" in html and "&lt;script&gt;" in html and "<script" not in html
    assert "1 point: saturation" in html and html.count("no answer") == 4
    with paths[1].open(encoding="utf-8-sig", newline="") as stream:
        rows = list(csv.reader(stream))
    assert rows[0] == ["student_id", "question_id", "max_points", "points", "comment"]
    assert rows[1] == ["s01_full", "q2_1", "2", "", ""] and len(rows) == 7
    assert paths[1].read_bytes().startswith(b"\xef\xbb\xbf")


@pytest.mark.parametrize(("encoding", "delimiter", "typed"), [("utf-8-sig", ",", "1.5"), ("utf-8", ";", "1,5")])
def test_review_sheet_round_trip(batch: Batch, tmp_path: Path, encoding: str, delimiter: str, typed: str) -> None:
    results = list(batch.results.values())
    sheet = write_review_sheet(results, QUESTIONS, answers=ANSWERS, out_dir=tmp_path)[1]
    fill(sheet, {"s01_full": typed, "s02_partial": "0"}, encoding=encoding, delimiter=delimiter)
    expected = [ManualScore(student_id="s01_full", question_id="q2_1", points=1.5, comment=COMMENT),
                ManualScore(student_id="s02_partial", question_id="q2_1", points=0.0, comment="")]
    assert read_review_sheet(sheet) == expected
    write_review_sheet(results, QUESTIONS, answers=ANSWERS, out_dir=tmp_path)  # e.g. after a late submission
    assert read_review_sheet(sheet) == expected


@pytest.mark.parametrize(("typed", "problem"), [("3", r"outside \[0, 2\]"), ("-1", "outside"), ("two", "not a number")])
def test_review_sheet_rejects_bad_points(batch: Batch, tmp_path: Path, typed: str, problem: str) -> None:
    sheet = write_review_sheet(list(batch.results.values()), QUESTIONS, answers=ANSWERS, out_dir=tmp_path)[1]
    fill(sheet, {"s01_full": "2", "s02_partial": typed})
    with pytest.raises(ReviewSheetError, match=rf"row 3 \(student 's02_partial'\).*{problem}"):
        read_review_sheet(sheet)


# ---------------------------------------------------------------- the report in a browser


class DevTools:
    """Chromium's DevTools protocol over --remote-debugging-pipe: NUL-terminated JSON messages,
    commands into the browser's fd 3, replies and events out of its fd 4."""

    def __init__(self, profile: Path) -> None:
        to_browser, self._send = os.pipe()
        self._receive, from_browser = os.pipe()
        # Copies numbered 5 and up: neither dup2 below can then overwrite the other pipe end,
        # whatever numbers os.pipe returned.
        commands = fcntl.fcntl(to_browser, fcntl.F_DUPFD_CLOEXEC, 5)
        replies = fcntl.fcntl(from_browser, fcntl.F_DUPFD_CLOEXEC, 5)
        argv = chromium_command(profile, "--remote-debugging-pipe", "about:blank")
        # posix_spawn rather than Popen(preexec_fn=...): no Python runs between fork and exec,
        # where a lock held by another thread (torch's, in a full test run) could deadlock.
        self.pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=[
            *((os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)),
            (os.POSIX_SPAWN_DUP2, commands, 3),
            (os.POSIX_SPAWN_DUP2, replies, 4),
        ])
        for fd in (to_browser, from_browser, commands, replies):
            os.close(fd)
        self._buffer = b""
        self._last_id = 0
        self.events: list[dict] = []

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._last_id += 1
        command_id = self._last_id
        message = {"id": command_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._send, json.dumps(message).encode() + b"\0")
        reply = self.wait_for(lambda m: m.get("id") == command_id)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait_for(self, done: Callable[[dict], bool], timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "method" in message:
                    self.events.append(message)
                if done(message):
                    return message
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._receive], [], [], remaining)[0]:
                raise TimeoutError("no answer from chromium's DevTools pipe")
            chunk = os.read(self._receive, 1 << 20)
            if not chunk:
                raise EOFError("chromium closed its DevTools pipe")
            self._buffer += chunk

    def close(self) -> None:
        with contextlib.suppress(EOFError, TimeoutError, RuntimeError):
            self.call("Browser.close")
        exited = os.pidfd_open(self.pid)
        if not select.select([exited], [], [], 20)[0]:
            os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        for fd in (exited, self._send, self._receive):
            os.close(fd)


def console_errors(page: Path, settle: float = 0.3) -> list[str]:
    """What Chromium's console reports at error level while loading `page`: console.error and
    console.assert calls, uncaught exceptions, and log entries such as failed loads and Content
    Security Policy violations (Chromium's stderr logging shows neither of the latter)."""
    with tempfile.TemporaryDirectory(prefix="gradelab-devtools-") as profile:
        browser = DevTools(Path(profile))
        try:
            target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Runtime", "Log", "Page"):
                browser.call(f"{domain}.enable", session=session)
            navigation = browser.call("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
            assert "errorText" not in navigation, navigation
            browser.wait_for(lambda m: m.get("method") == "Page.loadEventFired")
            with contextlib.suppress(TimeoutError):  # collect what arrives just after load
                browser.wait_for(lambda m: False, timeout=settle)
        finally:
            browser.close()
    errors = []
    for event in browser.events:
        params = event["params"]
        if event["method"] == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            errors.append(" ".join(str(arg.get("value", arg.get("description", ""))) for arg in params["args"]))
        elif event["method"] == "Runtime.exceptionThrown":
            errors.append(params["exceptionDetails"]["text"])
        elif event["method"] == "Log.entryAdded" and params["entry"]["level"] == "error":
            errors.append(f"{params['entry']['text']} ({params['entry'].get('url', '')})")
    return errors


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (./run installs Debian's chromium when run as root)")
def test_instructor_report_in_chromium(batch: Batch, tmp_path: Path) -> None:
    # The check itself must see errors, or "no errors" below would prove nothing.
    broken = tmp_path / "broken.html"
    broken.write_text('<!doctype html><title>x</title><img src="missing.png"><script>console.error("boom")</script>')
    control = console_errors(broken)
    assert any("ERR_FILE_NOT_FOUND" in e for e in control) and "boom" in control, control

    assert console_errors(batch.report) == []
    png = tmp_path / "report.png"
    assert screenshot(batch.report, png)
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 10_000
