"""Collect: turn what an instructor downloaded into one notebook per student.

`collect` accepts, auto-detected:
- one `.ipynb` file (student id = the file name without `.ipynb`);
- a folder of notebooks (top level only; student id = file stem);
- a Canvas bulk download, zipped or extracted: `lastfirst[_LATE]_userid_submissionid_original`
  (student id = userid; the highest submission id wins);
- a Moodle download, zipped or extracted: folders `Full Name_participantid_assignsubmission_file_/`
  (Moodle 4: without the last "_") or flat files `Full Name_participantid_assignsubmission_file_original`
  (student id = participantid);
- an nbgrader tree `submitted/<student>/<assignment>/<notebook>.ipynb` with optional
  `timestamp.txt`, given as `submitted/` or the folder holding it.
A zip holding a single folder (what "Compress folder" makes) is read as that folder.

Zip archives are student-controlled data: entries are extracted one by one into a fresh folder
under `workdir`, and only notebooks (and nbgrader's `timestamp.txt`) are written. Absolute or
`..` paths, symbolic links, encrypted entries, nested archives and anything past the size limits
are refused, counting the bytes actually decompressed rather than trusting the headers. Nothing
raises on bad input: every entry that is not graded is listed in `CollectReport.skipped`.

Names are student-controlled too; `names` reads them. A name that also reads as another student's
id is noted; one id under two names (two display names, or an LMS name and a plain one) is no
resubmission, and is reported in `CollectReport.disputed`. A name too long for the file system
is shortened on extraction (the real name is kept) and an over-long student id is cut with a
hash: neither is skipped.
"""

from __future__ import annotations

import lzma
import re
import stat
import tempfile
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone, tzinfo
from pathlib import Path, PurePosixPath
from typing import IO, Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, Field

from gradelab.grading.names import Claim, claimed_ids, disk_name, folder_safe, folder_safe_ids, lms_file, moodle_folder

SourceKind = Literal["canvas", "moodle", "nbgrader", "folder", "file"]

MIB = 2**20
# Zip limits. A notebook with embedded plots is a few MiB; a whole course's download a few hundred.
MAX_ENTRIES = 10_000  # entries looked at in one archive
MAX_ENTRY_BYTES = 50 * MIB  # one extracted file
MAX_TOTAL_BYTES = 512 * MIB  # everything extracted from one archive
MAX_RATIO = 100  # uncompressed:compressed; JSON notebooks stay far below, zip bombs far above
RATIO_FLOOR_BYTES = MIB  # the ratio is only judged past this size: tiny files compress well
_CHUNK = 64 * 1024

NOTEBOOK_SUFFIX = ".ipynb"
NBGRADER_TIMESTAMP = "timestamp.txt"
_ARCHIVE_SUFFIXES = {".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar"}
_SYSTEM_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}  # plus every name starting with "."
_UTF8_NAME_FLAG = 0x800
_ENCRYPTED_FLAG = 0x1
# What a damaged or unsupported entry raises while it is read or written.
_UNREADABLE = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, NotImplementedError, OSError)

# Canvas renames a resubmitted file `name-1.ipynb`, `name-2.ipynb`, ...
_RESUBMISSION = re.compile(r"(?P<base>.*?)-(?P<number>\d+)")


class SubmissionFile(BaseModel):
    """One student's notebook, as found in the source."""

    student_id: str  # Canvas user id / Moodle participant id / nbgrader student / file stem
    path: Path  # the notebook on disk (extracted into workdir for zips)
    original_name: str  # name as the student/LMS gave it
    display_name: str | None = None  # e.g. Moodle "Full Name", Canvas "lastfirst"
    source_kind: SourceKind
    submitted_at: datetime | None = None  # nbgrader timestamp.txt, else None (zip mtimes are not evidence)
    marked_late: bool = False  # Canvas _LATE marker
    submission_key: str = ""  # orders resubmissions: Canvas submission id, nbgrader timestamp
    other_ids: list[str] = Field(default_factory=list)  # ids another reading of the LMS name gives


class CollectReport(BaseModel):
    """Everything found in a source: graded, superseded, skipped, with the reasons."""

    submissions: list[SubmissionFile] = Field(default_factory=list)  # one per student, by student_id
    # (older one, not graded; the one kept) for each extra submission of one student
    superseded: list[tuple[SubmissionFile, SubmissionFile]] = Field(default_factory=list)
    skipped: list[tuple[str, str]] = Field(default_factory=list)  # (entry name, reason)
    notes: list[str] = Field(default_factory=list)  # changed student ids, unreadable timestamps, disputes
    # (id in the names, the graded file of each name) for an id that files under different names carry
    disputed: list[tuple[str, list[SubmissionFile]]] = Field(default_factory=list)


class _Refused(Exception):
    """An archive entry that is not extracted; the message is the reason shown to the instructor."""


@dataclass
class _Found:
    file: SubmissionFile
    entry: str  # path relative to the source, as reported


@dataclass
class _Scan:
    """What a walk over the source found, before duplicates are resolved."""

    root: Path  # entries are named relative to this folder
    found: list[_Found] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    true_names: dict[Path, str] = field(default_factory=dict)  # extracted under a shortened name

    def name(self, path: Path) -> str:
        """The name as the source has it (zip entries too long for the disk were shortened)."""
        return self.true_names.get(path, path.name)

    def label(self, path: Path) -> str:
        depth = len(path.relative_to(self.root).parts)
        name = "/".join(self.name(each) for each in reversed([path, *path.parents][:depth])) or "."
        return f"{name}/" if path.is_dir() and not path.is_symlink() else name

    def skip(self, path: Path, reason: str) -> None:
        self.skipped.append((self.label(path), reason))

    def add(self, file: SubmissionFile) -> None:
        entry = self.label(file.path)
        self.found.append(_Found(file, entry))
        if file.other_ids:
            self.notes.append(
                f"{entry}: the {file.source_kind} name also reads as id {', '.join(file.other_ids)}; read as "
                f"{file.student_id}, the id its fixed structure gives: check who handed it in"
            )


def collect(source: Path, workdir: Path, *, notebook_name: str | None = None) -> CollectReport:
    """Find one notebook per student in `source`; zips are extracted into a new folder in `workdir`.

    With `notebook_name`, a student who handed in several notebooks is graded on the one with
    that name (Canvas's `-1` resubmission suffix and case ignored); the others are skipped.
    Among what remains, the latest submission counts (submission id, then timestamp, then
    name order) and the rest are listed as superseded. Raises FileNotFoundError only when
    `source` does not exist; an unreadable archive is reported in `skipped`.
    """
    source = Path(source).resolve()
    if source.is_dir():
        scan = _Scan(source)
        _scan_folder(source, scan)
    elif not source.is_file():
        raise FileNotFoundError(f"{source}: no such file or folder")
    elif source.suffix.lower() == NOTEBOOK_SUFFIX:
        scan = _Scan(source.parent)
        scan.add(SubmissionFile(student_id=source.stem, path=source, original_name=source.name, source_kind="file"))
    else:
        scan = _Scan(source.parent)
        extracted = _extract_zip(source, Path(workdir), scan)
        if extracted is not None:
            scan.root = extracted
            _scan_folder(extracted, scan)
    return _choose(scan, notebook_name)


# ---------------------------------------------------------------- zip extraction


def _extract_zip(archive_path: Path, workdir: Path, scan: _Scan) -> Path | None:
    """Extract the archive's notebooks into a new folder in `workdir`; None if it is not a zip."""
    try:
        archive = zipfile.ZipFile(archive_path)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        scan.skipped.append((archive_path.name, f"not a readable zip archive: {exc}"))
        return None
    workdir.mkdir(parents=True, exist_ok=True)
    # A fresh folder per run: nothing left from an earlier run is mixed in, nothing is overwritten.
    dest = Path(tempfile.mkdtemp(prefix=f"{folder_safe(archive_path.stem)}-", dir=workdir)).resolve()
    total = 0
    with archive:
        entries = archive.infolist()
        for info in entries[:MAX_ENTRIES]:
            if info.is_dir():
                continue  # folders are made as the files inside them need them
            name = _entry_name(info)
            try:
                target = _disk_path(dest, _checked_parts(info, name), scan)
                total += _extract_entry(archive, info, target, room=MAX_TOTAL_BYTES - total)
            except _Refused as refused:
                scan.skipped.append((name, str(refused)))
            except _UNREADABLE as exc:
                scan.skipped.append((name, f"could not be extracted: {exc}"))
    if len(entries) > MAX_ENTRIES:
        scan.skipped.append(
            (f"{len(entries) - MAX_ENTRIES} more entries", f"not read: the archive has over {MAX_ENTRIES} entries")
        )
    return dest


def _entry_name(info: zipfile.ZipInfo) -> str:
    """The entry's name. Without the UTF-8 flag zipfile decodes cp437, but macOS and Windows
    archivers write UTF-8 without setting it, so UTF-8 is tried first."""
    if info.flag_bits & _UTF8_NAME_FLAG:
        return info.filename
    try:
        return info.filename.encode("cp437").decode("utf-8")
    except UnicodeError:
        return info.filename


def _checked_parts(info: zipfile.ZipInfo, name: str) -> tuple[str, ...]:
    """The entry's path components below the extraction folder, or _Refused with the reason."""
    normalised = name.replace("\\", "/")  # Windows archivers may use backslashes
    if normalised.startswith("/") or re.match(r"[A-Za-z]:", normalised):
        raise _Refused("absolute path, not extracted")
    parts = tuple(part for part in PurePosixPath(normalised).parts if part != ".")
    if not parts:
        raise _Refused("empty name, not extracted")
    if ".." in parts:
        raise _Refused("path leads out of the extraction folder (..), not extracted")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise _Refused("symbolic link, not extracted")
    if info.flag_bits & _ENCRYPTED_FLAG:
        raise _Refused("encrypted, not extracted")
    if parts[-1] != NBGRADER_TIMESTAMP and (reason := _file_reason(parts)):
        raise _Refused(reason)
    return parts


def _disk_path(dest: Path, parts: tuple[str, ...], scan: _Scan) -> Path:
    """Where an entry is written: each name as it is, or shortened when the file system would
    refuse it (`disk_name`); the scan keeps the real names, which identify the student."""
    target = dest
    for part in parts:
        target = target / disk_name(part)
        if target.name != part:
            scan.true_names[target] = part
    return target


def _extract_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, *, room: int) -> int:
    """Write one entry to `target` and return its size; refuse it (and leave nothing behind)
    when its header or its actual decompressed bytes break a limit."""
    if problem := _size_problem(info.file_size, info.compress_size, room):
        raise _Refused(problem)
    if target.exists():
        raise _Refused("a second entry with the same name, not extracted")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(info) as source, target.open("xb") as sink:
            return _copy_capped(source, sink, info.compress_size, room)
    except BaseException:
        target.unlink(missing_ok=True)  # a partial notebook must never be graded
        raise


def _copy_capped(source: IO[bytes], sink: IO[bytes], compressed: int, room: int) -> int:
    written = 0
    while chunk := source.read(_CHUNK):
        written += len(chunk)
        if problem := _size_problem(written, compressed, room):
            raise _Refused(problem)
        sink.write(chunk)
    return written


def _size_problem(size: int, compressed: int, room: int) -> str | None:
    """Why `size` uncompressed bytes (claimed or actually read) are too many, if they are."""
    if size > MAX_ENTRY_BYTES:
        return f"over the {MAX_ENTRY_BYTES // MIB} MiB limit for one file, not extracted"
    if size > room:
        return f"would take the archive over its {MAX_TOTAL_BYTES // MIB} MiB limit, not extracted"
    if size > RATIO_FLOOR_BYTES and size > MAX_RATIO * max(compressed, 1):
        return f"compressed more than {MAX_RATIO}:1 (a zip bomb?), not extracted"
    return None


# ---------------------------------------------------------------- layouts


def _scan_folder(root: Path, scan: _Scan) -> None:
    folder = _unwrap(root, scan)
    if (folder / "submitted").is_dir():
        _scan_nbgrader(folder / "submitted", scan)
    elif folder.name == "submitted" and not any(folder.glob(f"*{NOTEBOOK_SUFFIX}")):
        _scan_nbgrader(folder, scan)
    else:
        _scan_flat(folder, scan)


def _unwrap(folder: Path, scan: _Scan) -> Path:
    """Look inside a folder that holds nothing but one plain folder (a compressed folder)."""
    while folder.name != "submitted":
        entries = list(folder.iterdir())
        if len(entries) != 1:
            break
        [only] = entries
        if only.is_symlink() or not only.is_dir() or moodle_folder(scan.name(only)):
            break
        folder = only
    return folder


def _scan_flat(folder: Path, scan: _Scan) -> None:
    """Top-level notebooks (plain, Canvas or flat Moodle names) and Moodle submission folders."""
    for entry in sorted(folder.iterdir()):
        name = scan.name(entry)
        if entry.is_symlink():
            scan.skip(entry, "symbolic link, not followed")
        elif entry.is_dir() and (moodle := moodle_folder(name)):
            for notebook in _notebooks(entry, scan):
                scan.add(SubmissionFile(
                    student_id=moodle.student_id, path=notebook, original_name=scan.name(notebook),
                    display_name=moodle.display_name, source_kind="moodle",
                ))
        elif entry.is_dir():
            scan.skip(entry, _system_reason(name) or "folder in no known layout (Moodle, nbgrader), not read")
        elif reason := _file_reason((name,)):
            scan.skip(entry, reason)
        else:
            scan.add(_named_file(entry, name))


def _named_file(path: Path, name: str) -> SubmissionFile:
    """A top-level notebook called `name`: whose it is comes from a Moodle or Canvas name, else the stem."""
    if lms := lms_file(name):
        return SubmissionFile(
            student_id=lms.student_id, path=path, original_name=lms.original, display_name=lms.display_name,
            source_kind=lms.kind, marked_late=lms.marked_late, submission_key=lms.submission_key,
            other_ids=list(lms.other_ids),
        )
    return SubmissionFile(student_id=PurePosixPath(name).stem, path=path, original_name=name, source_kind="folder")


def _scan_nbgrader(submitted: Path, scan: _Scan) -> None:
    """`submitted/<student>/<assignment>/<notebook>.ipynb`, timed by `<assignment>/timestamp.txt`."""
    for student in _layout_folders(submitted, scan):
        for assignment in _layout_folders(student, scan):
            submitted_at = _read_timestamp(assignment / NBGRADER_TIMESTAMP, scan)
            for notebook in _notebooks(assignment, scan, metadata=NBGRADER_TIMESTAMP):
                scan.add(SubmissionFile(
                    student_id=scan.name(student), path=notebook, original_name=scan.name(notebook),
                    source_kind="nbgrader", submitted_at=submitted_at,
                    submission_key=submitted_at.isoformat() if submitted_at else "",
                ))


def _layout_folders(folder: Path, scan: _Scan) -> Iterator[Path]:
    """The plain subfolders of an nbgrader level; anything else there is reported."""
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink():
            scan.skip(entry, "symbolic link, not followed")
        elif reason := _system_reason(entry.name):
            scan.skip(entry, reason)
        elif entry.is_dir():
            yield entry
        else:
            scan.skip(entry, "outside the nbgrader layout submitted/<student>/<assignment>/, not read")


def _notebooks(folder: Path, scan: _Scan, *, metadata: str | None = None) -> Iterator[Path]:
    """The notebooks anywhere below one student's folder; `metadata` names a file read elsewhere."""
    for entry in sorted(folder.iterdir()):
        if entry.name == metadata:
            continue
        if entry.is_symlink():
            scan.skip(entry, "symbolic link, not followed")
        elif entry.is_dir() and not _system_reason(entry.name):
            yield from _notebooks(entry, scan)
        elif reason := _file_reason((entry.name,)):
            scan.skip(entry, reason)
        else:
            yield entry


def _system_reason(name: str) -> str | None:
    if name in _SYSTEM_NAMES or name.startswith("."):  # .DS_Store, .ipynb_checkpoints, ._AppleDouble
        return "not a notebook (system or hidden file)"
    return None


def _file_reason(parts: tuple[str, ...]) -> str | None:
    """Why a file at this path is not graded, or None for a notebook."""
    for part in parts:
        if reason := _system_reason(part):
            return reason
    suffix = PurePosixPath(parts[-1]).suffix.lower()
    if suffix in _ARCHIVE_SUFFIXES:
        return "nested archive, not opened"
    if suffix != NOTEBOOK_SUFFIX:
        return "not a notebook"
    return None


def _read_timestamp(path: Path, scan: _Scan) -> datetime | None:
    if path.is_symlink() or not path.is_file():
        return None
    with path.open(encoding="utf-8", errors="replace") as handle:
        text = handle.read(200).strip()  # a timestamp is short; the file is the student's
    when = _parse_timestamp(text)
    if when is None:
        scan.notes.append(f"{scan.label(path)}: unreadable timestamp {text[:60]!r}; submission time unknown")
    return when


def _parse_timestamp(text: str) -> datetime | None:
    """nbgrader writes `%Y-%m-%d %H:%M:%S.%f %Z` (zone UTC unless configured); ISO 8601 is read
    too. Naive times are UTC, as nbgrader takes them. The result is in UTC."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        stamp, _, zone = text.rpartition(" ")
        try:
            when = datetime.fromisoformat(stamp).replace(tzinfo=_zone(zone))
        except (ValueError, KeyError):  # ZoneInfoNotFoundError is a KeyError
            return None
    return when.replace(tzinfo=when.tzinfo or timezone.utc).astimezone(timezone.utc)


def _zone(name: str) -> tzinfo:
    if name.upper() in {"UTC", "GMT", "Z"}:
        return timezone.utc
    if re.fullmatch(r"[+-]\d\d:?\d\d", name):
        return datetime.strptime(name, "%z").tzinfo or timezone.utc
    return ZoneInfo(name)


# ---------------------------------------------------------------- one submission per student


def _choose(scan: _Scan, notebook_name: str | None) -> CollectReport:
    graded_as, disputes = claimed_ids([
        Claim(f.file.student_id, f.file.display_name, f.file.source_kind, bool(f.file.other_ids)) for f in scan.found
    ])
    by_student: dict[str, list[_Found]] = defaultdict(list)
    for found, group_id in zip(scan.found, graded_as, strict=True):
        by_student[group_id].append(found)
    safe_ids = folder_safe_ids(by_student, scan.notes)
    report = CollectReport(skipped=scan.skipped, notes=scan.notes)
    kept_found: dict[str, _Found] = {}
    for raw_id, group in by_student.items():
        for found in group:
            found.file = found.file.model_copy(update={"student_id": safe_ids[raw_id]})
        if notebook_name and (wanted := [f for f in group if _same_notebook(f.file.original_name, notebook_name)]):
            reason = f"not {notebook_name}, which the student also handed in"
            report.skipped.extend((other.entry, reason) for other in group if other not in wanted)
            group = wanted
        group.sort(key=_recency)
        kept = group[-1].file
        report.superseded.extend((older.file, kept) for older in group[:-1])
        report.submissions.append(kept)
        kept_found[raw_id] = group[-1]
    for claimed, group_ids in disputes.items():
        graded = [kept_found[group_id] for group_id in group_ids]
        report.disputed.append((claimed, [found.file for found in graded]))
        report.notes.append(
            f"student id {claimed} is claimed by files under {len(graded)} different names, so none supersedes "
            "another; each is graded, under its own id: "
            + "; ".join(f"{found.entry} ({found.file.display_name or 'no name'}) as {found.file.student_id}"
                        for found in graded)
        )
    report.submissions.sort(key=lambda file: file.student_id)
    return report


def _recency(found: _Found) -> tuple[str, str, int, str]:
    """Later submissions sort last: submission id or timestamp, then Canvas's `-N` suffix, then name."""
    base, resubmission = _name_order(found.file.original_name)
    return found.file.submission_key, base, resubmission, found.entry


def _name_order(name: str) -> tuple[str, int]:
    stem = name[: -len(NOTEBOOK_SUFFIX)] if name.lower().endswith(NOTEBOOK_SUFFIX) else name
    if match := _RESUBMISSION.fullmatch(stem):
        return match["base"].casefold(), int(match["number"])
    return stem.casefold(), 0


def _same_notebook(name: str, wanted: str) -> bool:
    return _name_order(name)[0] == _name_order(wanted)[0]
