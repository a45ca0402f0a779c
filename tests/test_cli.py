"""The `gradelab` command: instructor mistakes end in one `error:` line and a non-zero exit code
(never a traceback), and report -> review -> export work on a graded folder.

The graded folder is written straight into a gradebook from the project's own configuration, so
no notebook is run here."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from gradelab.cli import main
from gradelab.config import CONFIG_FILE, load_config
from gradelab.grading.gradebook import Gradebook
from gradelab.project import GRADEBOOK_FILE
from gradelab.boundary.records import QuestionScore, SubmissionResult
from gradelab.boundary.records import TestOutcome as Outcome  # a Test* name would be collected by pytest

ROOT = Path(__file__).resolve().parents[1]
# student id -> fraction of each automatic question's points (Canvas ids: no roster needed)
STUDENTS = {"1001": 1.0, "1002": 0.5}
ANSWER = "The sigmoid saturates, so its derivative is at most 0.25."


def run(*args: object, width: int = 80) -> Result:
    """The command's exit code and output (stdout and stderr) on a terminal `width` columns wide."""
    return CliRunner(env={"COLUMNS": str(width)}).invoke(main, [str(arg) for arg in args], prog_name="gradelab")


def assert_error(result: Result, exit_code: int, pattern: str) -> None:
    """The command failed the way a user should see it: one `error:` line, however long, and the
    exit code; an exception other than SystemExit would be a traceback for the user."""
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert re.search(pattern, lines[0]), lines[0]


def graded_result(student_id: str, fraction: float) -> SubmissionResult:
    """A graded submission of this assignment: every automatic question at `fraction` of its points."""
    config = load_config(ROOT / CONFIG_FILE)
    tests, questions = [], []
    for q in config.questions:
        if q.points:
            tests.append(Outcome(name=f"test_{q.id}", question=q.id, score=q.points * fraction, max_score=q.points,
                                 status="passed" if fraction == 1 else "failed",
                                 output="" if fraction == 1 else f"{q.id}: not quite"))
        questions.append(QuestionScore(id=q.id, title=q.title, kind=q.kind, score=q.points * fraction,
                                       max_score=q.points, passed=int(fraction == 1), total=int(q.points > 0),
                                       needs_manual=q.manual_points > 0))
    return SubmissionResult(student_id=student_id, source=f"{student_id}.ipynb", content_hash=student_id * 16,
                            status="graded", score=sum(q.score for q in questions), max_score=config.max_score,
                            tests=tests, questions=questions, answers={"q2_1": ANSWER}, grading_time=1.5)


@pytest.fixture
def graded_dir(tmp_path: Path) -> Path:
    """A `gradelab grade --out` folder: the gradebook and each student's result files."""
    out = tmp_path / "graded"
    with Gradebook(out / GRADEBOOK_FILE) as gradebook:
        for student_id, fraction in STUDENTS.items():
            gradebook.save(graded_result(student_id, fraction))
    return out


@pytest.fixture
def notebook(tmp_path: Path) -> Path:
    path = tmp_path / "submission.ipynb"
    path.write_text('{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}', encoding="utf-8")
    return path


# ---------------------------------------------------------------- mistakes: one line, non-zero exit


def test_missing_grading_config(tmp_path: Path, notebook: Path) -> None:
    result = run("grade", notebook, "--out", tmp_path / "out", "--project", tmp_path)
    assert_error(result, 1, rf"{CONFIG_FILE}: no such file; --project must name the assignment repository")


def test_roster_with_unknown_columns(graded_dir: Path, tmp_path: Path) -> None:
    roster = tmp_path / "roster.csv"
    roster.write_text("Matrikel,Vorname\n1,Anna\n", encoding="utf-8")
    result = run("export", "--from", graded_dir, "--to", "canvas", "--out", tmp_path / "c.csv", "--roster", roster,
                 "--project", ROOT)
    assert_error(result, 1, r"roster\.csv: unknown roster format; columns found: Matrikel, Vorname")
    assert not (tmp_path / "c.csv").exists()


def test_roster_that_is_not_utf8(graded_dir: Path, tmp_path: Path) -> None:
    roster = tmp_path / "roster.csv"
    roster.write_bytes("name,email\nØdegård,o@uni.example\n".encode("latin-1"))
    result = run("export", "--from", graded_dir, "--to", "csv", "--out", tmp_path / "g.csv", "--roster", roster,
                 "--project", ROOT)
    assert_error(result, 1, r"roster\.csv: not UTF-8 .*save it as 'CSV UTF-8'")


def test_bad_review_sheet_stores_nothing(graded_dir: Path, tmp_path: Path) -> None:
    good, bad = tmp_path / "review_q2_1.csv", tmp_path / "review_q2_3.csv"
    good.write_text("student_id,question_id,max_points,points,comment\n1001,q2_1,2,2,fine\n", encoding="utf-8")
    bad.write_text("student_id,question_id,max_points,points,comment\n1001,q2_3,2,5,\n", encoding="utf-8")
    result = run("review", good, bad, "--from", graded_dir)
    assert_error(result, 1, r"review_q2_3\.csv, row 2 \(student '1001'\): points 5 are outside \[0, 2\]")
    with Gradebook(graded_dir / GRADEBOOK_FILE) as gradebook:
        assert gradebook.manual_scores() == {}


def test_review_sheet_without_its_columns(graded_dir: Path, tmp_path: Path) -> None:
    sheet = tmp_path / "review_q2_1.csv"
    sheet.write_text("student,points\n1001,2\n", encoding="utf-8")
    assert_error(run("review", sheet, "--from", graded_dir), 1,
                 r"missing column\(s\) student_id, question_id, max_points, comment")


@pytest.mark.parametrize(("files", "problem"), [
    ({}, r"downloads: no notebook to grade \(it is empty\)"),
    ({"notes.txt": b"my answers", "scan.pdf": b"%PDF-1.7"},
     r"downloads: no notebook to grade; found notes\.txt: not a notebook; scan\.pdf: not a notebook$"),
])
def test_a_folder_without_a_notebook(tmp_path: Path, files: dict[str, bytes], problem: str) -> None:
    source = tmp_path / "downloads"
    source.mkdir()
    for name, data in files.items():
        (source / name).write_bytes(data)
    assert_error(run("grade", source, "--out", tmp_path / "out", "--project", ROOT), 1, problem)
    assert not (tmp_path / "out" / GRADEBOOK_FILE).exists()


@pytest.mark.parametrize("name", ["answers.pdf", "canvas_download.zip"])
def test_a_file_that_is_neither_a_zip_nor_a_notebook(tmp_path: Path, name: str) -> None:
    given = tmp_path / name
    given.write_bytes(b"%PDF-1.7, not a zip archive")
    assert_error(run("grade", given, "--out", tmp_path / "out", "--project", ROOT), 1,
                 rf"{re.escape(name)}: no notebook to grade; found {re.escape(name)}: not a readable zip archive")
    assert not (tmp_path / "out" / GRADEBOOK_FILE).exists()


@pytest.mark.parametrize("target", ["csv", "canvas"])
def test_export_before_grade(tmp_path: Path, target: str) -> None:
    ungraded = tmp_path / "out"
    ungraded.mkdir()
    result = run("export", "--from", ungraded, "--to", target, "--out", tmp_path / "grades.csv", "--project", ROOT)
    assert_error(result, 1, rf"no {GRADEBOOK_FILE}, so nothing was graded into it; run `gradelab grade")
    assert not (tmp_path / "grades.csv").exists() and not (ungraded / GRADEBOOK_FILE).exists()


def test_report_on_an_ungraded_folder(tmp_path: Path) -> None:
    ungraded = tmp_path / "out"
    ungraded.mkdir()
    assert_error(run("report", "--from", ungraded, "--project", ROOT), 1, rf"no {GRADEBOOK_FILE}")
    assert list(ungraded.iterdir()) == []  # no empty report, no new gradebook


def test_report_on_a_gradebook_without_results(tmp_path: Path) -> None:
    empty = tmp_path / "out"
    Gradebook(empty / GRADEBOOK_FILE).close()
    assert_error(run("report", "--from", empty, "--project", ROOT), 1, r"holds no graded submission")
    assert not (empty / "report.html").exists()


def test_workers_must_be_at_least_one(tmp_path: Path, notebook: Path) -> None:
    result = run("grade", notebook, "--out", tmp_path / "out", "--project", ROOT, "--workers", "0")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert "Invalid value for '--workers': 0 is not in the range x>=1" in result.output
    assert not (tmp_path / "out").exists()


def test_the_installed_command_prints_one_line_and_exits_non_zero(tmp_path: Path) -> None:
    """The real process, as the console script runs it: stderr and the exit status."""
    env = {name: value for name, value in os.environ.items() if name != "COLUMNS"}  # 80 columns, not a tty
    proc = subprocess.run([sys.executable, "-m", "gradelab.cli", "report", "--from", str(tmp_path),
                           "--project", str(ROOT)], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"error: {tmp_path}: no {GRADEBOOK_FILE}, so nothing was graded into it; "
        f"run `gradelab grade SUBMISSIONS --out {tmp_path}` first"]


# ---------------------------------------------------------------- report -> review -> export


def fill_sheet(sheet: Path, points: dict[str, tuple[str, str]]) -> None:
    """Enter (points, comment) per student id into a review sheet, as a spreadsheet saves it."""
    with sheet.open(encoding="utf-8-sig", newline="") as stream:
        rows = list(csv.DictReader(stream))
    for row in rows:
        row["points"], row["comment"] = points.get(row["student_id"], ("", ""))
    with sheet.open("w", encoding="utf-8-sig", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plain_export(graded_dir: Path, out: Path) -> dict[str, dict[str, str]]:
    result = run("export", "--from", graded_dir, "--to", "csv", "--out", out, "--project", ROOT, width=1000)
    assert result.exit_code == 0, result.output
    assert f"csv: 2 rows → {out}" in result.output
    with out.open(encoding="utf-8-sig", newline="") as stream:
        return {row["student_id"]: row for row in csv.DictReader(stream)}


def test_report_review_and_export_a_graded_folder(graded_dir: Path, tmp_path: Path) -> None:
    config = load_config(ROOT / CONFIG_FILE)
    automatic = sum(q.points for q in config.questions)

    result = run("report", "--from", graded_dir, "--project", ROOT, width=1000)
    assert result.exit_code == 0, result.output
    assert f"instructor report: {graded_dir / 'report.html'}" in result.output
    report = (graded_dir / "report.html").read_text(encoding="utf-8")
    assert '<td class="num" id="count-graded">2</td>' in report
    sheet = graded_dir / "review" / "review_q2_1.csv"
    assert ANSWER in (graded_dir / "review" / "review_q2_1.html").read_text(encoding="utf-8")
    feedback = (graded_dir / "1002" / "feedback.html").read_text(encoding="utf-8")
    assert f"Score: <strong>{automatic / 2:g} / {config.max_score:g}</strong>" in feedback
    assert "q1_2: not quite" in feedback

    before = plain_export(graded_dir, tmp_path / "before.csv")
    assert before["1001"]["score"] == f"{automatic:g}" and before["1002"]["score"] == f"{automatic / 2:g}"

    fill_sheet(sheet, {"1001": ("1.5", "names saturation, not the 0.25 bound")})
    result = run("review", sheet, "--from", graded_dir, width=1000)
    assert result.exit_code == 0, result.output
    assert f"imported 1 manual scores into {graded_dir}" in result.output

    assert run("report", "--from", graded_dir, "--project", ROOT).exit_code == 0
    feedback = (graded_dir / "1001" / "feedback.html").read_text(encoding="utf-8")
    assert "<strong>Grader's comment:</strong> names saturation, not the 0.25 bound" in feedback
    with sheet.open(encoding="utf-8-sig", newline="") as stream:  # the entered points survive the rewrite
        assert [row["points"] for row in csv.DictReader(stream)] == ["1.5", ""]

    after = plain_export(graded_dir, tmp_path / "after.csv")
    assert after["1001"]["q2_1"] == "1.5" and after["1001"]["score"] == f"{automatic + 1.5:g}"
    assert after["1002"] == before["1002"]

    result = run("export", "--from", graded_dir, "--to", "canvas", "--out", tmp_path / "canvas.csv",
                 "--project", ROOT, width=1000)
    assert result.exit_code == 0, result.output
    assert "no roster: the ids from the submission file names are written as Canvas user ids" in result.output
    rows = list(csv.reader((tmp_path / "canvas.csv").open(encoding="utf-8", newline="")))
    assert [(row[1], row[-1]) for row in rows[2:]] == [("1001", f"{automatic + 1.5:g}"),
                                                       ("1002", f"{automatic / 2:g}")]


# ---------------------------------------------------------------- help


def test_gradelab_help_names_every_command() -> None:
    result = run("--help")
    assert result.exit_code == 0
    assert "release, grade, report and export an auto-graded PyTorch assignment" in result.output
    for name in main.commands:
        assert re.search(rf"^\s+{name}\s+\S", result.output, re.MULTILINE), f"{name} has no summary"


@pytest.mark.parametrize("name", sorted(main.commands))
def test_each_command_explains_itself(name: str) -> None:
    command: click.Command = main.commands[name]
    result = run(name, "--help")
    assert result.exit_code == 0
    assert result.output.startswith(f"Usage: gradelab {name} ")
    shown = " ".join(result.output.split())  # click rewraps the text
    summary = command.help.split("\n")[0].split() if command.help else []
    assert summary and " ".join(summary) in shown
    for option in command.params:
        if isinstance(option, click.Option):
            assert option.help and " ".join(option.help.split()) in shown, f"{name} {option.opts[0]}"
