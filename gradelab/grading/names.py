"""Who a submission file is: the ids an LMS bulk download writes into a name, which student a set
of names stands for, and the student ids and file names that fit a file system.

Names are student-controlled (a display name, the name of the uploaded file) and are read by
their fixed structure:
- Canvas `lastfirst[_LATE]_userid_fileid_original`, from the left. Canvas writes `_<digits>_`
  in a name as `<digits>`, so the first two number fields are the ids (Canvas reads its own names
  back that way); the uploaded name (`original`), student-chosen, may hold any digits: read from
  the right, `hw_2026_11_20.ipynb` would make user 2026.
- Moodle folders `Full Name_participantid_assignsubmission_file_` (Moodle 4: without the last
  "_") and files `Full Name_participantid_assignsubmission_file_original`, from the right: the
  participant id is the number before the last `_assignsubmission_<plugin>`, never a number
  inside the display name. (Moodle writes "_" in a display name as a space, so in a name it wrote
  the first and the last marker are one; where they differ, someone made the name.)
A name that can also be read another way lists the ids of those readings in `other_ids`.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal

# Canvas: `doejohn_LATE_12345_678901_vanishing_gradients-1.ipynb`. Canvas's lastfirst is the
# sortable name without non-word characters, lower-cased; a lastfirst without "_" is required,
# so a plain file like `s07_uniform_0_1_weights.ipynb` is not taken for user 0.
_CANVAS = re.compile(r"(?P<lastfirst>[^_]+)(?P<late>_LATE)?_(?P<user>\d+)_(?P<file>\d+)_(?P<original>.+)")
_CANVAS_IDS = re.compile(r"(?=_(\d+)_\d+_.)")  # every place the two ids of a Canvas name could be
# Moodle: the greedy name makes the last marker the one read.
_MOODLE_MARK = r"_(?P<participant>\d+)_assignsubmission_[a-z]+"
_MOODLE_FOLDER = re.compile(rf"(?P<name>.+){_MOODLE_MARK}_?")
_MOODLE_FILE = re.compile(rf"(?P<name>.+){_MOODLE_MARK}_(?P<original>.+)")
_MOODLE_IDS = re.compile(r"_(\d+)_assignsubmission_[a-z]+_")

SAFE_ID_LENGTH = 100  # characters of a student id, which names the student's results folder
NAME_MAX_BYTES = 255  # one path component, on the usual Linux and macOS file systems
_HASH_CHARS = 8  # of a sha256, added to a shortened name so that two long names stay two


@dataclass(frozen=True)
class LmsName:
    """What an LMS wrote into a file or folder name."""

    kind: Literal["canvas", "moodle"]
    student_id: str  # Canvas user id, Moodle participant id
    display_name: str  # Canvas lastfirst, Moodle full name
    original: str = ""  # the uploaded file's name ("" for a Moodle folder)
    marked_late: bool = False  # Canvas's _LATE
    submission_key: str = ""  # Canvas's file id, zero-padded so that text order is number order
    other_ids: tuple[str, ...] = ()  # what other readings of the name give


def moodle_folder(name: str) -> LmsName | None:
    """A Moodle submission folder's name, read; None for any other name."""
    if found := _MOODLE_FOLDER.fullmatch(name):
        return LmsName("moodle", found["participant"], found["name"])
    return None


def lms_file(name: str) -> LmsName | None:
    """A Moodle or Canvas bulk-download file name, read; None for a plain name."""
    if moodle := _MOODLE_FILE.fullmatch(name):
        return LmsName("moodle", moodle["participant"], moodle["name"], moodle["original"],
                       other_ids=_others(_MOODLE_IDS.findall(name), moodle["participant"]))
    if canvas := _CANVAS.fullmatch(name):
        return LmsName("canvas", canvas["user"], canvas["lastfirst"], canvas["original"],
                       marked_late=bool(canvas["late"]), submission_key=canvas["file"].zfill(20),
                       other_ids=_others(_CANVAS_IDS.findall(name), canvas["user"]))
    return None


def _others(ids: list[str], chosen: str) -> tuple[str, ...]:
    return tuple(sorted(set(ids) - {chosen}, key=ids.index))


@dataclass(frozen=True)
class Claim:
    """One file's claim to a student id."""

    student_id: str
    display_name: str | None  # None: the source names nobody (plain files, nbgrader folders)
    kind: str  # where the name comes from: canvas, moodle, folder, ...
    ambiguous: bool = False  # the name also reads as another id


def claimed_ids(claims: Sequence[Claim]) -> tuple[list[str], dict[str, list[str]]]:
    """The id each claim is graded under (in order), and for each disputed id the ids its names got.

    A student's files all carry one name: an LMS writes the same display name into every file of
    one id, and plain files and nbgrader folders carry none. Files that carry one id under
    different names (compared case-folded) are not one student's resubmissions, whatever their
    order: each name is graded on its own. The id stays with the one name that holds it without
    ambiguity, if exactly one does; every other name is graded as `<id>-<name>`.
    """
    by_name: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for index, claim in enumerate(claims):
        name = unicodedata.normalize("NFC", claim.display_name or "").casefold()
        by_name[claim.student_id][name].append(index)
    ids = [claim.student_id for claim in claims]
    disputes: dict[str, list[str]] = {}
    taken = set(by_name)
    for claimed, names in by_name.items():
        if len(names) == 1:
            continue
        clear = [name for name, indices in names.items() if not any(claims[i].ambiguous for i in indices)]
        disputes[claimed] = []
        for name, indices in names.items():
            group_id = claimed
            if clear != [name]:
                first = claims[indices[0]]
                base = group_id = f"{claimed}-{first.display_name or first.kind}"
                suffix = 2
                while group_id in taken:
                    group_id, suffix = f"{base}-{suffix}", suffix + 1
                taken.add(group_id)
            for index in indices:
                ids[index] = group_id
            disputes[claimed].append(group_id)
    return ids, disputes


def disk_name(name: str) -> str:
    """`name`, or for one the file system would refuse ("File name too long") its start, a hash
    of the whole name and its suffix, in NAME_MAX_BYTES."""
    encoded = name.encode()
    if len(encoded) <= NAME_MAX_BYTES:
        return name
    suffix = PurePosixPath(name).suffix
    tail = f"~{hashlib.sha256(encoded).hexdigest()[:_HASH_CHARS]}{suffix if len(suffix) <= 16 else ''}"
    return encoded[: NAME_MAX_BYTES - len(tail.encode())].decode(errors="ignore") + tail


def folder_safe_ids(raw_ids: Iterable[str], notes: list[str]) -> dict[str, str]:
    """A unique folder name per student id; ids that are already safe keep their name."""
    ordered = sorted(raw_ids, key=lambda raw: (folder_safe(raw) != raw, raw))
    taken: set[str] = set()  # case-folded: "Alice" and "alice" are one folder on macOS and Windows
    safe_ids: dict[str, str] = {}
    for raw in ordered:
        safe = base = folder_safe(raw)
        suffix = 2
        while safe.casefold() in taken:
            safe, suffix = f"{base}-{suffix}", suffix + 1
        taken.add(safe.casefold())
        safe_ids[raw] = safe
        if safe != raw:
            notes.append(
                f"student id {raw!r} is used as {safe!r}: ids name folders, so they keep only "
                f"A-Z a-z 0-9 . _ - (no leading dot), at most {SAFE_ID_LENGTH} characters, "
                "and are unique regardless of case"
            )
    return safe_ids


def folder_safe(text: str) -> str:
    """`text` as a portable folder name: accents dropped, other characters replaced by "_", and
    past SAFE_ID_LENGTH cut, with a hash of the whole text that keeps two long names apart."""
    decomposed = unicodedata.normalize("NFKD", text)
    plain = "".join(char for char in decomposed if not unicodedata.combining(char))
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", plain).lstrip(".") or "student"
    if len(safe) <= SAFE_ID_LENGTH:
        return safe
    digest = hashlib.sha256(text.encode()).hexdigest()[:_HASH_CHARS]
    return f"{safe[: SAFE_ID_LENGTH - _HASH_CHARS - 1]}-{digest}"
