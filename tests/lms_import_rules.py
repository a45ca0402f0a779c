"""Importers that apply the LMS import rules, written independently of gradelab.publish.exports.

Each parser reads a file the way the LMS does and refuses it where the LMS would, so a test that
round-trips an export through them checks the file against the LMS's rules, not against the
exporter's own idea of the format. Sources: canvas-lms `GradebookImporter` and
`Assignment.title_and_id`; Moodle `gradeimport_csv` and docs.moodle.org "Grade import"; Blackboard
Help "Uploading External Grade Center Items" (as summarised in anchors.md, section d).
"""

from __future__ import annotations

import csv
import io
import itertools
import re
from dataclasses import dataclass, field
from typing import Literal

Score = float | Literal["EX"] | None

# ---------------------------------------------------------------- Canvas

CANVAS_TITLE_AND_ID = re.compile(r"\A(.*)\s\((\d+)\)\Z")  # Ruby's /\A(.*)\s\((\d+)\)\z/, "." without newlines
CANVAS_READ_ONLY_HEADERS = re.compile(r"(Unposted )?(Current|Final) (Score|Points|Grade)|Override (Score|Grade|Status)")
_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)?")


@dataclass
class CanvasAssignment:
    header: str
    title: str
    assignment_id: int | None
    points_possible: float | None = None


@dataclass
class CanvasRow:
    student: str
    canvas_id: str
    sis_user_id: str
    sis_login_id: str
    section: str
    scores: list[Score]

    @property
    def key(self) -> str:
        """Canvas finds the student by ID, else SIS User ID, else SIS Login ID, else name."""
        for kind, value in (
            ("", self.canvas_id),
            ("sis_user_id:", self.sis_user_id),
            ("sis_login_id:", self.sis_login_id),
        ):
            if value:
                return kind + value
        return "name:" + self.student


@dataclass
class CanvasFile:
    delimiter: str
    assignments: list[CanvasAssignment]
    rows: list[CanvasRow] = field(default_factory=list)


def canvas_import(text: str) -> dict[str, Score]:
    """The one assignment's scores by Canvas user id (see CanvasRow.key for rows without one)."""
    parsed = parse_canvas(text)
    if len(parsed.assignments) != 1:
        raise ValueError(f"expected one assignment column, found {[a.header for a in parsed.assignments]}")
    return {row.key: row.scores[0] for row in parsed.rows}


def parse_canvas(text: str) -> CanvasFile:
    text = text.removeprefix("\ufeff")
    delimiter = _canvas_delimiter(text)
    records = [
        row for row in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter) if any(c.strip() for c in row)
    ]
    header, body = records[0], records[1:]
    info_columns = _canvas_student_columns(header)
    assignment_cells = [
        i for i in range(info_columns, len(header)) if not CANVAS_READ_ONLY_HEADERS.fullmatch(header[i])
    ]
    assignments = [_canvas_assignment(header[i]) for i in assignment_cells]
    parsed = CanvasFile(delimiter, assignments)
    if body and "Points Possible" in body[0][0]:
        for assignment, index in zip(assignments, assignment_cells, strict=True):
            value = _canvas_value(body[0][index]) if index < len(body[0]) else None
            assignment.points_possible = value if isinstance(value, float) else None
        body = body[1:]
    sis_user, sis_login = _optional_index(header, "SIS User ID"), _optional_index(header, "SIS Login ID")
    for row in body:
        cells = [row[i] if i < len(row) else "" for i in assignment_cells]
        if (
            all(cell.strip() in {"", "Muted"} or cell.startswith("Manual Posting") for cell in cells)
            and not row[1].strip()
        ):
            continue  # the "Muted" / "Manual Posting" marker rows
        parsed.rows.append(
            CanvasRow(
                student=row[0],
                canvas_id=row[1].strip(),
                sis_user_id=row[sis_user].strip() if sis_user is not None else "",
                sis_login_id=row[sis_login].strip() if sis_login is not None else "",
                section=row[info_columns - 1],
                scores=[_canvas_value(cell) for cell in cells],
            )
        )
    return parsed


def _canvas_delimiter(text: str) -> str:
    """`;` when the first 3 records split on it into one common field count above the comma split."""

    def widths(delimiter: str) -> list[int]:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        return [len(row) for row in itertools.islice(reader, 3)]

    semicolon, comma = widths(";"), widths(",")
    return ";" if len(set(semicolon)) == 1 and semicolon[0] > max(comma) else ","


def _canvas_student_columns(header: list[str]) -> int:
    if len(header) <= 3 or "Student" not in header[0] or "ID" not in header[1]:
        raise ValueError("Couldn't find header row")
    last = 2
    if "SIS Login ID" in header[2]:
        last = 3
    elif "SIS User ID" in header[2] and "SIS Login ID" in header[3]:
        last = 4
        for optional in ("Integration ID", "Root Account"):
            if last < len(header) and optional in header[last]:
                last += 1
    if last >= len(header) or "Section" not in header[last]:
        raise ValueError("Invalid header row")
    return last + 1


def _canvas_assignment(header: str) -> CanvasAssignment:
    found = CANVAS_TITLE_AND_ID.match(header)
    if found:
        return CanvasAssignment(header, found[1], int(found[2]))
    return CanvasAssignment(header, header, None)


def _canvas_value(cell: str) -> Score:
    value = cell.strip()
    if value in {"", "-"}:
        return None
    if value.upper() == "EX":
        return "EX"
    if _NUMBER.fullmatch(value):
        return float(value.replace(",", "."))
    raise ValueError(f"not a score Canvas accepts for a points assignment: {cell!r}")


def _optional_index(header: list[str], title: str) -> int | None:
    return next((i for i, cell in enumerate(header) if title in cell), None)


# ---------------------------------------------------------------- Moodle

MOODLE_MAP_TO = ("userid", "username", "useridnumber", "useremail")


@dataclass
class MoodleGrade:
    grade: float | None
    feedback: str | None


def moodle_import(
    text: str,
    map_from: str,
    map_to: str,
    known_users: set[str],
    *,
    grade_column: str,
    feedback_column: str | None = None,
    max_grade: float = 100.0,
) -> dict[str, MoodleGrade]:
    """Grades by user identifier. `known_users` holds the Moodle users' values of `map_to`."""
    if map_to not in MOODLE_MAP_TO:
        raise ValueError(f"Moodle cannot map to {map_to!r}")
    records = list(csv.reader(io.StringIO(text.removeprefix("\ufeff"), newline="")))
    header = [title.strip() for title in records[0]]  # Moodle trims the header only
    identifier_at, grade_at = header.index(map_from), header.index(grade_column)
    feedback_at = header.index(feedback_column) if feedback_column else None
    grades = {}
    for row in records[1:]:
        identifier = row[identifier_at]
        # A case-sensitive lookup, as Moodle's (MDL-29315); any miss aborts the whole import.
        if identifier not in known_users:
            raise ValueError(f"user mapping error: no user with {map_to} {identifier!r}")
        grades[identifier] = MoodleGrade(
            grade=_moodle_grade(row[grade_at], max_grade),
            feedback=row[feedback_at] if feedback_at is not None else None,
        )
    return grades


def _moodle_grade(cell: str, max_grade: float) -> float | None:
    value = cell.strip()
    if value in {"", "-"}:
        return None
    grade = float(value)
    if grade > max_grade:
        raise ValueError(f"grade {value} rejected: above {max_grade:g}")
    return grade


# ---------------------------------------------------------------- Blackboard

BLACKBOARD_USER_COLUMNS = ("Last Name", "First Name", "Username", "Student ID", "Last Access", "Availability")
# "<name> [Total Pts: <points> <display>] |<column id>", as a Grade Center download writes it.
BLACKBOARD_EXISTING_COLUMN = re.compile(r"(?P<name>.*?)(?: \[Total Pts: (?P<points>[\d.]+)(?: \w+)?\])? \|(?P<id>\d+)")


@dataclass
class BlackboardColumn:
    header: str
    name: str
    column_id: int | None  # None: the upload creates a new column
    points: float | None


@dataclass
class BlackboardRow:
    last_name: str
    first_name: str
    student_id: str
    scores: list[float | None]


@dataclass
class BlackboardFile:
    delimiter: str
    columns: list[BlackboardColumn]
    rows: dict[str, BlackboardRow]  # by Username


def blackboard_import(text: str) -> BlackboardFile:
    text = text.removeprefix("\ufeff")
    delimiter = "\t" if "\t" in text.partition("\n")[0] else ","
    records = [row for row in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter) if row]
    if delimiter == "," and text != _all_quoted(records, text):
        raise ValueError("comma-delimited Grade Center files must have every value inside double quotes")
    header = records[0]
    if "Username" not in header:
        raise ValueError("no Username column: the upload fails")
    username_at = header.index("Username")
    grade_at = [i for i, title in enumerate(header) if title not in BLACKBOARD_USER_COLUMNS]
    columns = [_blackboard_column(header[i]) for i in grade_at]
    rows = {}
    for record in records[1:]:
        cells = dict(zip(header, record, strict=False))  # Blackboard tolerates short rows
        username = record[username_at].strip()
        if not username:
            raise ValueError("a row without a username: the upload fails")
        rows[username] = BlackboardRow(
            last_name=cells.get("Last Name", ""),
            first_name=cells.get("First Name", ""),
            student_id=cells.get("Student ID", ""),
            scores=[float(record[i]) if record[i].strip() else None for i in grade_at],
        )
    return BlackboardFile(delimiter, columns, rows)


def _all_quoted(records: list[list[str]], text: str) -> str:
    buffer = io.StringIO()
    terminator = "\r\n" if "\r\n" in text else "\n"
    csv.writer(buffer, quoting=csv.QUOTE_ALL, lineterminator=terminator).writerows(records)
    return buffer.getvalue()


def _blackboard_column(header: str) -> BlackboardColumn:
    found = BLACKBOARD_EXISTING_COLUMN.fullmatch(header)
    if found is None:
        return BlackboardColumn(header, header, None, None)
    points = float(found["points"]) if found["points"] else None
    return BlackboardColumn(header, found["name"], int(found["id"]), points)
