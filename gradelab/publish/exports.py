"""LMS exports: turn a grading output folder into files that Canvas, Moodle, Blackboard and
Gradescope import, plus a plain CSV for the instructor.

LMS files carry the score after the late penalty (`late.apply_late`); the plain CSV shows raw
score, penalty and final score side by side. With a roster, submissions are matched to students
(`roster.match`); whatever cannot be placed in an LMS file is listed in the report, never lost.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gradelab.config import LatePolicy, LmsSettings
from gradelab.errors import GradelabError
from gradelab.project import RESULTS_FILE, SUBMISSION_FILE, ResultsDir
from gradelab.boundary.records import LateInfo, SubmissionResult
from gradelab.publish.csvfiles import spreadsheet_text
from gradelab.publish.late import apply_late, assess, format_points
from gradelab.publish.roster import MatchRule, RosterEntry, match

ExportTarget = Literal["canvas", "moodle", "blackboard", "gradescope", "csv"]

CANVAS_STUDENT_COLUMNS = ["Student", "ID", "SIS User ID", "SIS Login ID", "Section"]
# Canvas's Assignment.title_and_id: a header "<title> (<digits>)" names the assignment by id.
_CANVAS_TITLE_AND_ID = re.compile(r"(.*)\s\((\d+)\)")
MOODLE_IDENTIFIER_COLUMNS = {"email": "Email address", "id_number": "ID number"}
MOODLE_FEEDBACK_COLUMN = "Feedback comments"
MOODLE_DEFAULT_MAX_GRADE = 100.0  # Moodle rejects larger grades unless the site allows them

# Blackboard Learn Grade Center, "Work Offline > Upload". Source: Blackboard Help, "Uploading
# External Grade Center Items" (library.blackboard.com/ref/36ba3329-e441-488a-93ce-7a55543cc999/
# Content/Grade Center/Uploading External Grade Center Items.htm): a header row, then one record
# per line; students are identified by Username; a column by the column ID after "|" in its
# header, and a header without one creates a new text column with 0 points possible; tab- or
# comma-delimited, and in a comma-delimited file every value sits inside double quotes. The
# header shapes are those of Blackboard's own download, e.g. "Quiz 3 [Total Pts: 10] |664617"
# (github.com/nbeaver/offline-grades-upload). Name columns are not processed on upload.
BLACKBOARD_STUDENT_COLUMNS = ["Last Name", "First Name", "Username", "Student ID"]
_BLACKBOARD_COLUMN_ID = re.compile(r"\|\d+\Z")
# What a submission's id stands in for when there is no roster to look the student up in.
_WITHOUT_ROSTER = {"canvas": "Canvas user ids", "blackboard": "Blackboard usernames"}


class ExportError(GradelabError, ValueError):
    """The export cannot be written as asked (a roster is missing, a title would be misread)."""


@dataclass
class ExportReport:
    """What an export wrote, and every submission or student it could not place."""

    target: ExportTarget
    files: list[Path] = field(default_factory=list)
    rows: int = 0  # student rows (or results.json files) written
    unmatched_submissions: list[SubmissionResult] = field(default_factory=list)
    missing_students: list[RosterEntry] = field(default_factory=list)
    matched_by: dict[str, MatchRule] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # rows that were left out, and why


def load_results(out_dir: Path) -> list[SubmissionResult]:
    """Every `<student_id>/submission.json` of a `gradelab grade --out` folder, by folder name."""
    files = ResultsDir(out_dir).submission_files()
    if not files:
        raise FileNotFoundError(f"{out_dir}: no <student_id>/{SUBMISSION_FILE}; is it a `gradelab grade --out` folder?")
    return [SubmissionResult.model_validate_json(path.read_text(encoding="utf-8")) for path in files]


@dataclass(frozen=True)
class _Line:
    """One student's line: who (if the roster says), what they submitted (if anything), how late."""

    entry: RosterEntry | None
    result: SubmissionResult | None
    late: LateInfo | None
    unmatched: bool = False  # a submission no roster student claims

    @property
    def final(self) -> float:
        assert self.result is not None
        return apply_late(self.result, self.late)

    @property
    def final_text(self) -> str:
        return format_points(self.final) if self.result else ""


def export(
    results: list[SubmissionResult],
    *,
    target: ExportTarget,
    out: Path,
    settings: LmsSettings,
    roster: list[RosterEntry] | None = None,
    late_policy: LatePolicy | None = None,
    question_ids: list[str] | None = None,
) -> ExportReport:
    """Write `out` in the target's format. `gradescope` writes `out/<student_id>/results.json`.

    Without `late_policy` the penalty stored in each result's LateInfo is used. `question_ids`
    orders the plain CSV's question columns (default: as first seen in the results).
    """
    report = ExportReport(target=target)
    if target == "moodle" and roster is None:
        raise ExportError(
            "the moodle export needs a roster: Moodle places grades by email address or ID number, "
            "and submissions carry neither"
        )
    if roster is None and target in _WITHOUT_ROSTER:
        report.notes.append(
            f"no roster: the ids from the submission file names are written as {_WITHOUT_ROSTER[target]}"
        )
    lines = _lines(results, roster, late_policy, report)
    if target == "gradescope":
        _write_gradescope(lines, out, report)
    elif target == "canvas":
        _write_canvas(lines, out, settings, report)
    elif target == "moodle":
        _write_moodle(lines, out, settings, report)
    elif target == "blackboard":
        _write_blackboard(lines, out, settings, report)
    else:
        seen = dict.fromkeys(question.id for result in results for question in result.questions)
        _write_plain(lines, out, question_ids if question_ids is not None else list(seen), report)
    return report


def _lines(
    results: list[SubmissionResult],
    roster: list[RosterEntry] | None,
    late_policy: LatePolicy | None,
    report: ExportReport,
) -> list[_Line]:
    """Roster students in roster order (with their submission, if any), then unmatched submissions."""

    def line(entry: RosterEntry | None, result: SubmissionResult | None, unmatched: bool = False) -> _Line:
        late = _late_for(result, late_policy) if result else None
        return _Line(entry, result, late, unmatched)

    if roster is None:
        return [line(None, result) for result in results]
    matching = match(results, roster)
    report.matched_by = matching.matched_by
    report.unmatched_submissions = list(matching.unmatched_submissions)
    report.missing_students = matching.missing_students
    report.notes += [
        f"submission {sid} matches no roster student: {why}" for sid, why in matching.why_unmatched.items()
    ]
    paired = {id(entry): result for entry, result in matching.pairs}
    return [line(entry, paired.get(id(entry))) for entry in roster] + [
        line(None, result, unmatched=True) for result in matching.unmatched_submissions
    ]


def _late_for(result: SubmissionResult, policy: LatePolicy | None) -> LateInfo | None:
    """The policy's verdict on the recorded submission time / LMS marker, or the stored one."""
    if policy is None:
        return result.late
    recorded = result.late or LateInfo()
    return assess(
        policy,
        student_id=result.student_id,
        submitted_at=recorded.submitted_at,
        marked_late=recorded.marked_late,
        max_score=result.max_score,
    )


def _write_canvas(lines: list[_Line], out: Path, settings: LmsSettings, report: ExportReport) -> None:
    title = settings.assignment_title
    if settings.canvas_assignment_id is not None:
        column = f"{title} ({settings.canvas_assignment_id})"
    elif _CANVAS_TITLE_AND_ID.fullmatch(title):
        raise ExportError(
            f"Canvas would read the title {title!r} as '<title> (<assignment id>)'; set canvas_assignment_id"
        )
    else:
        column = title
    points = settings.points_possible or max((line.result.max_score for line in lines if line.result), default=0.0)
    # A "Points Possible" second row is what Canvas's own export writes; it sets a new column's points.
    points_row = ["Points Possible", "", "", "", "", format_points(points)]
    rows = []
    for line in lines:
        if line.unmatched:
            continue  # Canvas has no row for them: listed in report.unmatched_submissions
        entry = line.entry
        if entry is None:
            assert line.result is not None
            student_id = line.result.student_id
            if not student_id.isdigit():
                report.unmatched_submissions.append(line.result)
                report.errors.append(f"{student_id}: not a Canvas user id; give a roster to place it")
                continue
            entry = RosterEntry(name=student_id, canvas_id=student_id)
        # A student without a submission gets a blank cell, which Canvas leaves alone (0 would grade).
        rows.append(
            [
                entry.sortable_name or entry.name,
                entry.canvas_id or "",
                entry.sis_user_id or "",
                entry.sis_login_id or "",
                entry.section or "",
                line.final_text,
            ]
        )
    _write_table(out, [[*CANVAS_STUDENT_COLUMNS, column], points_row], rows, report)


def _write_moodle(lines: list[_Line], out: Path, settings: LmsSettings, report: ExportReport) -> None:
    identifier_column = MOODLE_IDENTIFIER_COLUMNS[settings.moodle_identifier]
    max_grade = settings.points_possible or MOODLE_DEFAULT_MAX_GRADE
    rows = []
    for line in lines:
        if line.entry is None or line.result is None:
            continue  # unmatched or missing: listed in the report
        identifier = getattr(line.entry, settings.moodle_identifier)
        if not identifier:
            report.errors.append(f"{line.entry.name}: no {identifier_column} in the roster, so Moodle cannot place it")
            continue
        if problem := _formula_key(identifier, identifier_column, "Moodle"):
            report.errors.append(problem)
            continue
        if line.final > max_grade:
            report.errors.append(
                f"{identifier}: {format_points(line.final)} is above {format_points(max_grade)}, which Moodle "
                "rejects; set points_possible to the grade item's maximum if it is higher"
            )
            continue
        rows.append([identifier, line.final_text, _feedback(line)])
    _write_table(out, [[identifier_column, settings.assignment_title, MOODLE_FEEDBACK_COLUMN]], rows, report)


def _feedback(line: _Line) -> str:
    """The short text a student sees in Moodle next to the grade."""
    assert line.result is not None
    result = line.result
    text = f"Score {line.final_text}/{format_points(result.max_score)}"
    if result.status != "graded":
        text += f" (grading status: {result.status})"
    if line.late and line.final < result.score:
        text += f", after a late penalty of {format_points(result.score - line.final)}: {line.late.reason}"
    questions = "; ".join(f"{q.id} {format_points(q.score)}/{format_points(q.max_score)}" for q in result.questions)
    return f"{text}. {questions}" if questions else text


def _write_blackboard(lines: list[_Line], out: Path, settings: LmsSettings, report: ExportReport) -> None:
    column = settings.blackboard_column or settings.assignment_title
    if not _BLACKBOARD_COLUMN_ID.search(column):
        report.notes.append(
            f"Blackboard column {column!r} has no '|<column id>': the upload creates a new text column "
            "with 0 points possible. To fill an existing column, use its header from a Grade Center "
            "download, e.g. 'HW3 [Total Pts: 20 Score] |123456'."
        )
    rows = []
    for line in lines:
        if line.result is None or line.unmatched:
            continue  # listed in the report
        entry = line.entry or RosterEntry(name="", sis_login_id=line.result.student_id)
        if not entry.sis_login_id:
            report.errors.append(
                f"{entry.name}: no username (SIS Login ID) in the roster, so Blackboard cannot place it"
            )
            continue
        if problem := _formula_key(entry.sis_login_id, "username", "Blackboard"):
            report.errors.append(problem)
            continue
        last, first = _last_and_first(entry)
        rows.append([last, first, entry.sis_login_id, entry.sis_user_id or entry.id_number or "", line.final_text])
    _write_table(out, [[*BLACKBOARD_STUDENT_COLUMNS, column]], rows, report, quote_all=True)


def _formula_key(key: str, column: str, lms: str) -> str | None:
    """Why a row cannot carry `key`, the value the LMS finds the student by: a spreadsheet would
    run it as a formula, and with the apostrophe that stops it the LMS finds nobody."""
    if spreadsheet_text(key) == key:
        return None
    return f"{key!r}: the {column} starts with a formula character, so {lms} cannot place it; enter this grade by hand"


def _last_and_first(entry: RosterEntry) -> tuple[str, str]:
    if entry.sortable_name and "," in entry.sortable_name:
        last, _, first = entry.sortable_name.partition(",")
        return last.strip(), first.strip()
    first, _, last = entry.name.rpartition(" ")
    return last, first


def _write_gradescope(lines: list[_Line], out: Path, report: ExportReport) -> None:
    penalised = 0
    for line in lines:
        if line.result is None:
            continue
        student_id = line.result.student_id
        if student_id in {"", ".", ".."} or Path(student_id).name != student_id:
            report.errors.append(f"{student_id!r}: not usable as a folder name")
            continue
        path = out / student_id / RESULTS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(line.result.to_gradescope(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        report.files.append(path)
        penalised += line.final < line.result.score
    report.rows = len(report.files)
    if penalised:
        # Gradescope applies its own late policy; subtracting ours too would count lateness twice.
        report.notes.append(
            f"results.json carry the raw autograder score; {penalised} submission(s) would lose points "
            "under the late policy, so set the same policy in Gradescope"
        )


def _write_plain(lines: list[_Line], out: Path, question_ids: list[str], report: ExportReport) -> None:
    header = ["student_id", "name", "email", *question_ids, "raw_score", "late_penalty", "score", "max_score", "status"]
    rows = []
    for line in lines:
        entry, result = line.entry, line.result
        name, email = (entry.name, entry.email or "") if entry else ("", "")
        if result is None:
            assert entry is not None
            rows.append([_roster_id(entry), name, email, *[""] * len(question_ids), "", "", "", "", "missing"])
            continue
        scores = {question.id: format_points(question.score) for question in result.questions}
        rows.append(
            [
                result.student_id,
                name,
                email,
                *[scores.get(question_id, "") for question_id in question_ids],
                format_points(result.score),
                format_points(result.score - line.final),
                line.final_text,
                format_points(result.max_score),
                result.status,
            ]
        )
    # A BOM so that Excel, where instructors open this file, reads the names as UTF-8.
    _write_table(out, [header], rows, report, encoding="utf-8-sig")


def _roster_id(entry: RosterEntry) -> str:
    identifiers = (entry.canvas_id, entry.sis_user_id, entry.moodle_id, entry.email, entry.id_number)
    return next((value for value in identifiers if value), "")


def _write_table(
    out: Path,
    head: list[list[str]],
    rows: list[list[str]],
    report: ExportReport,
    *,
    encoding: str = "utf-8",
    quote_all: bool = False,
) -> None:
    """Write header row(s) and student rows as CSV (RFC 4180: comma, CRLF, quotes doubled), every
    cell through `spreadsheet_text`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding=encoding, newline="") as handle:
        writer = csv.writer(handle, quoting=csv.QUOTE_ALL if quote_all else csv.QUOTE_MINIMAL)
        writer.writerows([spreadsheet_text(cell) for cell in row] for row in [*head, *rows])
    report.files.append(out)
    report.rows = len(rows)
