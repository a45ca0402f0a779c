"""Course rosters: load an LMS roster export and match graded submissions to its students.

A submission knows only the id taken from its file name (Canvas user id, Moodle participant id,
or whatever the file was called); exports need the LMS's own identifiers and the student's name.
Matching never drops anything: each submission is paired, or reported as unmatched, and each
roster student without a submission is reported as missing.
"""

from __future__ import annotations

import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from gradelab.errors import GradelabError
from gradelab.boundary.records import SubmissionResult
from gradelab.grading.names import lms_file, moodle_folder
from gradelab.publish.csvfiles import read_records

MatchRule = Literal["canvas_id", "sis_user_id", "moodle_id", "email", "id_number", "name"]
# Most specific first: an LMS id beats an email, which beats a name.
MATCH_RULES: tuple[MatchRule, ...] = ("canvas_id", "sis_user_id", "moodle_id", "email", "id_number", "name")


class RosterError(GradelabError, ValueError):
    """A roster file that cannot be read or is in no known format; the message names the file."""


class RosterEntry(BaseModel):
    """One enrolled student, with every identifier the roster file carried."""

    name: str
    sortable_name: str | None = None  # "Last, First"
    canvas_id: str | None = None
    sis_user_id: str | None = None
    sis_login_id: str | None = None
    section: str | None = None
    moodle_id: str | None = None
    email: str | None = None
    id_number: str | None = None


@dataclass
class Matching:
    """Submissions paired with roster students; every input lands in exactly one list."""

    pairs: list[tuple[RosterEntry, SubmissionResult]] = field(default_factory=list)
    unmatched_submissions: list[SubmissionResult] = field(default_factory=list)
    missing_students: list[RosterEntry] = field(default_factory=list)
    matched_by: dict[str, MatchRule] = field(default_factory=dict)  # student_id -> rule that paired it
    why_unmatched: dict[str, str] = field(default_factory=dict)  # student_id -> reason, when known


# ---------------------------------------------------------------- loading

_CANVAS_COLUMNS = {
    "ID": "canvas_id",
    "SIS User ID": "sis_user_id",
    "SIS Login ID": "sis_login_id",
    "Section": "section",
}
# Moodle participants/gradebook exports, the assignment grading worksheet, a Blackboard Grade
# Center download and hand-made CSVs all name the same facts differently (compared lower-cased).
_COLUMN_ALIASES = {
    "name": "name",
    "full name": "name",
    "first name": "first_name",
    "last name": "last_name",
    "email": "email",
    "email address": "email",
    "id": "id_number",
    "student_id": "id_number",
    "student id": "id_number",
    "id number": "id_number",
    "username": "sis_login_id",
    "canvas_id": "canvas_id",
    "canvas id": "canvas_id",
    "canvas user id": "canvas_id",
    "sis user id": "sis_user_id",
    "section": "section",
    # The worksheet's "Identifier" ("Participant 123") is the id in Moodle's download folder names.
    "identifier": "moodle_id",
    "participant id": "moodle_id",
}


def load_roster(path: Path) -> list[RosterEntry]:
    """Read a Canvas gradebook export, a Moodle participants export or a plain roster CSV."""
    rows = [row for row in read_records(path, RosterError) if any(cell.strip() for cell in row)]  # drops ",,,,"
    if not rows:
        raise RosterError(f"{path}: empty roster file")
    header = [cell.strip() for cell in rows[0]]
    if len(header) > 1 and header[0] == "Student" and header[1] == "ID":
        return _canvas_entries(header, rows[1:])
    known = [_COLUMN_ALIASES.get(column.lower()) for column in header]
    if not any(known):
        raise RosterError(
            f"{path}: unknown roster format; columns found: {', '.join(header)}. Expected a Canvas "
            "gradebook export (Student, ID, SIS User ID, SIS Login ID, Section, ...), a Moodle "
            "participants export (First name, Last name or Full name, Email address, ID number) "
            "or a CSV with id, student_id, email or name columns."
        )
    return [entry for row in rows[1:] if (entry := _aliased_entry(known, row)) is not None]


def _canvas_entries(header: list[str], rows: list[list[str]]) -> list[RosterEntry]:
    columns = {field_name: header.index(title) for title, field_name in _CANVAS_COLUMNS.items() if title in header}
    entries = []
    for row in rows:
        student = row[0].strip()
        values = {name: _cell(row, index) for name, index in columns.items()}
        # Skip the "Points Possible" row, Canvas's test student and rows without a user id
        # (older exports add a "Muted" row).
        if "Points Possible" in student or student == "Student, Test" or not values.get("canvas_id"):
            continue
        entries.append(RosterEntry(name=_first_last(student), sortable_name=student or None, **values))
    return entries


def _aliased_entry(known: list[str | None], row: list[str]) -> RosterEntry | None:
    values: dict[str, str] = {}
    for index, field_name in enumerate(known):
        if field_name and (value := _cell(row, index)):
            values.setdefault(field_name, value)
    if not values:
        return None
    first, last = values.pop("first_name", ""), values.pop("last_name", "")
    if first or last:
        values.setdefault("name", f"{first} {last}".strip())
        values["sortable_name"] = f"{last}, {first}" if first and last else first or last
    if "moodle_id" in values:
        values["moodle_id"] = values["moodle_id"].removeprefix("Participant ").strip()
    return RosterEntry(**{"name": "", **values})


def _cell(row: list[str], index: int) -> str | None:
    return (row[index].strip() or None) if index < len(row) else None


def _first_last(sortable: str) -> str:
    last, comma, first = sortable.partition(",")
    return f"{first.strip()} {last.strip()}" if comma else sortable


# ---------------------------------------------------------------- matching


def match(results: list[SubmissionResult], roster: list[RosterEntry]) -> Matching:
    """Pair submissions with roster students, trying the rules of MATCH_RULES in order.

    A rule pairs a submission only when it points at exactly one roster student; a key shared by
    several students (two people called the same) falls through to the next rule. Each rule runs
    over all submissions before the next one starts, so a looser rule never takes a student that
    a more precise one would pair. A submission landing on an already paired student is a
    conflict (two submissions, one student) and stays unmatched.
    """
    owner: dict[int, SubmissionResult] = {}  # roster position -> its paired submission
    matched_by: dict[str, MatchRule] = {}
    reasons: dict[str, str] = {}
    pending = list(results)
    for rule in MATCH_RULES:
        index: defaultdict[str, set[int]] = defaultdict(set)
        for position, entry in enumerate(roster):
            for key in _entry_keys(entry, rule):
                index[key].add(position)
        still_pending = []
        for result in pending:
            hits = set().union(*(index.get(key, set()) for key in _submission_keys(result, rule)))
            if len(hits) == 1:
                (position,) = hits
                if position in owner:
                    reasons[result.student_id] = (
                        f"{rule} points at {roster[position].name!r}, "
                        f"who is already paired with submission {owner[position].student_id}"
                    )
                else:
                    owner[position] = result
                    matched_by[result.student_id] = rule
                continue
            if hits:
                names = ", ".join(sorted(repr(roster[p].name) for p in hits))
                reasons.setdefault(result.student_id, f"{rule} is ambiguous: {names}")
            still_pending.append(result)
        pending = still_pending

    unmatched = [result for result in results if result.student_id not in matched_by]
    return Matching(
        pairs=[(roster[position], owner[position]) for position in sorted(owner)],
        unmatched_submissions=unmatched,
        missing_students=[entry for position, entry in enumerate(roster) if position not in owner],
        matched_by=matched_by,
        why_unmatched={
            result.student_id: reasons.get(result.student_id, "no roster student has this id, email or name")
            for result in unmatched
        },
    )


def _entry_keys(entry: RosterEntry, rule: MatchRule) -> set[str]:
    if rule == "name":
        return name_keys(entry.name) | name_keys(entry.sortable_name or "")
    return _id_keys(getattr(entry, rule), rule)


def _submission_keys(result: SubmissionResult, rule: MatchRule) -> set[str]:
    if rule == "name":
        return set().union(*(name_keys(name) for name in (result.student_id, *names_in_source(result.source))))
    return _id_keys(result.student_id, rule)


def _id_keys(value: str | None, rule: MatchRule) -> set[str]:
    value = (value or "").strip()
    if not value:
        return set()
    return {value.casefold() if rule == "email" else value}


def name_keys(name: str) -> set[str]:
    """Comparable forms of a person's name: accents and case folded, "Last, First" turned round.

    Two forms: the words in first-last order ("ase ace odegard"), and the letters run together
    as written, which is how Canvas spells a sortable name in download file names
    ("odegardaseace").
    """
    last, comma, first = name.partition(",")
    ordered = f"{first} {last}" if comma else name
    spaced = " ".join(word for word in map(_letters, ordered.split()) if word)
    return {key for key in (spaced, _letters(name)) if key}


# Letters that Unicode does not decompose into a base letter plus accent, spelled as people
# without the key type them ("Odegard" for "Ødegård").
_UNDECOMPOSED_LETTERS = str.maketrans({"ø": "o", "æ": "ae", "œ": "oe", "đ": "d", "ł": "l", "þ": "th", "\u0131": "i"})


def _letters(text: str) -> str:
    """The case-folded letters of `text` without accents."""
    # NFKD splits "å" into "a" and a combining ring, which is not a letter and so is dropped.
    decomposed = unicodedata.normalize("NFKD", text.casefold()).translate(_UNDECOMPOSED_LETTERS)
    return "".join(ch for ch in decomposed if ch.isalpha())


def names_in_source(source: str) -> list[str]:
    """Student names that an LMS bulk download wrote into the submission's path, read as
    `gradelab.grading.names` reads them when the download is collected."""
    path = Path(source)
    found = [*(moodle_folder(part) for part in path.parent.parts), lms_file(path.name)]
    return [hit.display_name for hit in found if hit]
