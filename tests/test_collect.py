"""collect(): every source layout, duplicate handling, and hostile zip archives.

All inputs are built here in tmp_path from tiny notebooks; the 1 GiB bomb is streamed into a
~5 MB archive once per module.
"""

from __future__ import annotations

import io
import stat
import struct
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import nbformat
import pytest

from gradelab.grading import collect as collect_module
from gradelab.grading import names
from gradelab.grading.collect import CollectReport, collect

NOTEBOOK_NAME = "vanishing_gradients.ipynb"


def notebook(marker: str = "") -> bytes:
    cell = nbformat.v4.new_code_cell(f"answer = {marker!r}")
    return nbformat.writes(nbformat.v4.new_notebook(cells=[cell])).encode()


def write_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


def patch_entry(path: Path, name: str, *, flag_bits: int | None = None, file_size: int | None = None) -> None:
    """Rewrite an entry's header fields in place, as a hand-crafted hostile archive would have them.

    Flags are patched in the central directory and the local header (zipfile checks that both
    agree on the name's encoding); the size only in the central directory, which zipfile trusts.
    """
    data = bytearray(path.read_bytes())
    raw_name = name.encode("utf-8")
    position = data.find(b"PK\x01\x02")
    while position != -1:
        name_length = struct.unpack_from("<H", data, position + 28)[0]
        if data[position + 46 : position + 46 + name_length] == raw_name:
            break
        position = data.find(b"PK\x01\x02", position + 4)
    assert position != -1, f"{name} not in {path}"
    if flag_bits is not None:
        local_header = struct.unpack_from("<L", data, position + 42)[0]
        struct.pack_into("<H", data, position + 8, flag_bits)
        struct.pack_into("<H", data, local_header + 6, flag_bits)
    if file_size is not None:
        struct.pack_into("<L", data, position + 24, file_size)
    path.write_bytes(bytes(data))


def files_under(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*") if path.is_file()}


def reasons(report: CollectReport) -> dict[str, str]:
    return dict(report.skipped)


# ---------------------------------------------------------------- layouts


def test_single_notebook_file(tmp_path: Path) -> None:
    source = tmp_path / "alice.ipynb"
    source.write_bytes(notebook())

    report = collect(source, tmp_path / "work")

    [submission] = report.submissions
    assert (submission.student_id, submission.source_kind, submission.path) == ("alice", "file", source)
    assert submission.submitted_at is None and not report.skipped and not report.superseded


def test_folder_of_notebooks_reads_top_level_only(tmp_path: Path) -> None:
    folder = tmp_path / "batch"
    (folder / ".ipynb_checkpoints").mkdir(parents=True)
    (folder / "by_student" / "carol").mkdir(parents=True)
    for name in ["bob.ipynb", "alice.ipynb", ".ipynb_checkpoints/alice-checkpoint.ipynb", "by_student/carol/x.ipynb"]:
        (folder / name).write_bytes(notebook(name))
    (folder / "helpers.py").write_text("x = 1\n")
    (folder / "report.pdf").write_bytes(b"%PDF-1.4")
    (folder / ".DS_Store").write_bytes(b"\0")
    write_zip(folder / "more.zip", {"dave.ipynb": notebook()})

    report = collect(folder, tmp_path / "work")

    assert [(s.student_id, s.source_kind) for s in report.submissions] == [("alice", "folder"), ("bob", "folder")]
    assert report.submissions[0].path == folder / "alice.ipynb"
    skipped = reasons(report)
    assert skipped["helpers.py"] == skipped["report.pdf"] == "not a notebook"
    assert skipped[".DS_Store"] == skipped[".ipynb_checkpoints/"] == "not a notebook (system or hidden file)"
    assert skipped["more.zip"] == "nested archive, not opened"
    assert "no known layout" in skipped["by_student/"]
    assert not (tmp_path / "work").exists()  # nothing to extract: the workdir is left alone


def test_canvas_zip_late_marker_and_resubmission(tmp_path: Path) -> None:
    first = "doejohn_12345_99999_vanishing_gradients.ipynb"
    resubmitted = "doejohn_LATE_12345_100001_vanishing_gradients-1.ipynb"  # a higher id, fewer digits first
    source = write_zip(tmp_path / "submissions.zip", {
        first: notebook("first"),
        resubmitted: notebook("second"),
        "roemary_23456_678902_my_vanishing_gradients_v2.ipynb": notebook(),  # "_" in name and original
    })
    workdir = tmp_path / "work"

    report = collect(source, workdir)

    john, mary = report.submissions
    assert (john.student_id, john.source_kind, john.display_name) == ("12345", "canvas", "doejohn")
    assert john.original_name == "vanishing_gradients-1.ipynb" and john.marked_late
    assert nbformat.reads(john.path.read_text(), as_version=4).cells[0].source == "answer = 'second'"
    assert john.path.is_relative_to(workdir)
    [(older, kept)] = report.superseded
    assert kept == john and older.path.name == first and not older.marked_late
    assert (mary.student_id, mary.display_name) == ("23456", "roemary")
    assert mary.original_name == "my_vanishing_gradients_v2.ipynb"
    assert not report.skipped


def test_notebook_name_prefers_the_assignment_notebook(tmp_path: Path) -> None:
    folder = tmp_path / "canvas"
    folder.mkdir()
    for name in ["doejohn_12345_678901_scratch.ipynb", "doejohn_12345_678901_Vanishing_Gradients-2.ipynb"]:
        (folder / name).write_bytes(notebook())

    report = collect(folder, tmp_path / "work", notebook_name=NOTEBOOK_NAME)

    [john] = report.submissions
    assert john.original_name == "Vanishing_Gradients-2.ipynb" and not report.superseded
    assert reasons(report) == {
        "doejohn_12345_678901_scratch.ipynb": f"not {NOTEBOOK_NAME}, which the student also handed in",
    }


def test_moodle_zip_with_folders_flat_files_and_non_ascii_names(tmp_path: Path) -> None:
    ase = "Åse Ødegård_4711_assignsubmission_file_"
    zoe = "Zoë Ünal_4713_assignsubmission_file_"
    source = write_zip(tmp_path / "moodle.zip", {
        f"{ase}/{NOTEBOOK_NAME}": notebook("ase"),
        f"{ase}/report.pdf": b"%PDF-1.4",
        f"__MACOSX/{ase}/._{NOTEBOOK_NAME}": b"\0",
        f"Bob Builder_4712_assignsubmission_file_{NOTEBOOK_NAME}": notebook("bob"),
        f"{zoe}/{NOTEBOOK_NAME}": notebook("zoe"),
    })
    # Zoë's entry as macOS archivers write it: UTF-8 bytes without the UTF-8 flag.
    patch_entry(source, f"{zoe}/{NOTEBOOK_NAME}", flag_bits=0)

    report = collect(source, tmp_path / "work")

    assert [(s.student_id, s.display_name, s.original_name, s.source_kind) for s in report.submissions] == [
        ("4711", "Åse Ødegård", NOTEBOOK_NAME, "moodle"),
        ("4712", "Bob Builder", NOTEBOOK_NAME, "moodle"),
        ("4713", "Zoë Ünal", NOTEBOOK_NAME, "moodle"),
    ]
    assert reasons(report) == {
        f"{ase}/report.pdf": "not a notebook",
        f"__MACOSX/{ase}/._{NOTEBOOK_NAME}": "not a notebook (system or hidden file)",
    }


def build_nbgrader_course(course: Path) -> None:
    def submit(student: str, files: dict[str, bytes]) -> None:
        folder = course / "submitted" / student / "ps1"
        folder.mkdir(parents=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)

    submit("alice", {NOTEBOOK_NAME: notebook(), "timestamp.txt": b"2026-11-20 14:03:11.123456 UTC\n"})
    submit("bob", {NOTEBOOK_NAME: notebook(), "scratch.ipynb": notebook(), "timestamp.txt": b"2026-11-21 09:00 +0100"})
    submit("carol", {NOTEBOOK_NAME: notebook(), "timestamp.txt": b"yesterday-ish"})


@pytest.mark.parametrize("given", ["course folder", "submitted folder", "zip"])
def test_nbgrader_tree_with_timestamps(tmp_path: Path, given: str) -> None:
    course = tmp_path / "course"
    build_nbgrader_course(course)
    if given == "zip":
        source = write_zip(tmp_path / "course.zip", {
            path.relative_to(course).as_posix(): path.read_bytes() for path in files_under(course)
        })
    else:
        source = course if given == "course folder" else course / "submitted"

    report = collect(source, tmp_path / "work", notebook_name=NOTEBOOK_NAME)

    alice, bob, carol = report.submissions
    assert [s.student_id for s in report.submissions] == ["alice", "bob", "carol"]
    assert {s.source_kind for s in report.submissions} == {"nbgrader"}
    assert alice.submitted_at == datetime(2026, 11, 20, 14, 3, 11, 123456, tzinfo=timezone.utc)
    assert bob.submitted_at == datetime(2026, 11, 21, 8, 0, tzinfo=timezone.utc)
    assert alice.submission_key == alice.submitted_at.isoformat()
    assert carol.submitted_at is None and carol.submission_key == ""
    assert [note for note in report.notes if "unreadable timestamp 'yesterday-ish'" in note]
    scratch = "bob/ps1/scratch.ipynb" if given == "submitted folder" else "submitted/bob/ps1/scratch.ipynb"
    assert reasons(report) == {scratch: f"not {NOTEBOOK_NAME}, which the student also handed in"}


def test_student_ids_are_made_folder_safe_and_unique(tmp_path: Path) -> None:
    folder = tmp_path / "batch"
    folder.mkdir()
    for name in ["a b.ipynb", "a_b.ipynb", "Åse Ødegård.ipynb", "Alice.ipynb", "alice.ipynb"]:
        (folder / name).write_bytes(notebook(name))

    report = collect(folder, tmp_path / "work")

    by_file = {s.path.name: s.student_id for s in report.submissions}
    assert by_file == {
        "a_b.ipynb": "a_b", "a b.ipynb": "a_b-2", "Åse Ødegård.ipynb": "Ase_degard",
        "Alice.ipynb": "Alice", "alice.ipynb": "alice-2",
    }
    assert len(report.notes) == 3 and all("is used as" in note for note in report.notes)


# ---------------------------------------------------------------- hostile archives


def test_paths_out_of_the_workdir_are_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    absolute = (outside / "abs.ipynb").as_posix()
    source = write_zip(tmp_path / "evil.zip", {
        "../evil.ipynb": notebook(),
        "sub/../../evil2.ipynb": notebook(),
        "..\\evil3.ipynb": notebook(),
        absolute: notebook(),
        "C:/evil4.ipynb": notebook(),
        "good.ipynb": notebook(),
    })
    workdir = tmp_path / "work"
    before = files_under(tmp_path)

    report = collect(source, workdir)

    assert files_under(tmp_path) - before == files_under(workdir)
    assert [path.name for path in files_under(workdir)] == ["good.ipynb"]
    assert [s.student_id for s in report.submissions] == ["good"]
    skipped = reasons(report)
    for name in ["../evil.ipynb", "sub/../../evil2.ipynb", "..\\evil3.ipynb"]:
        assert skipped[name].startswith("path leads out of the extraction folder")
    assert skipped[absolute] == skipped["C:/evil4.ipynb"] == "absolute path, not extracted"


def test_symlink_and_encrypted_entries_are_refused(tmp_path: Path) -> None:
    link = zipfile.ZipInfo("link.ipynb")
    link.create_system = 3  # Unix: the mode bits in external_attr count
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    source = tmp_path / "tricks.zip"
    with zipfile.ZipFile(source, "w") as archive:
        archive.writestr(link, "/etc/passwd")
        archive.writestr("locked.ipynb", notebook())
    patch_entry(source, "locked.ipynb", flag_bits=0x1)
    workdir = tmp_path / "work"

    report = collect(source, workdir)

    assert report.submissions == [] and files_under(workdir) == set()
    assert reasons(report) == {
        "link.ipynb": "symbolic link, not extracted",
        "locked.ipynb": "encrypted, not extracted",
    }


@pytest.fixture(scope="module")
def gigabyte_of_zeros(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~5 MB archive whose one entry inflates to 1 GiB, streamed so that no GiB is ever held."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("bomb.ipynb", "w") as entry:
            zeros = bytes(2**20)
            for _ in range(1024):
                entry.write(zeros)
    return path


def test_bomb_refused_by_its_header(tmp_path: Path, gigabyte_of_zeros: Path) -> None:
    workdir = tmp_path / "work"

    report = collect(gigabyte_of_zeros, workdir)

    assert report.submissions == [] and files_under(workdir) == set()
    assert reasons(report) == {"bomb.ipynb": "over the 50 MiB limit for one file, not extracted"}


def test_bomb_whose_header_lies_about_its_size(tmp_path: Path, gigabyte_of_zeros: Path) -> None:
    source = tmp_path / "liar.zip"
    source.write_bytes(gigabyte_of_zeros.read_bytes())
    patch_entry(source, "bomb.ipynb", file_size=1000)  # claims a 1000-byte notebook
    workdir = tmp_path / "work"

    report = collect(source, workdir)

    assert report.submissions == [] and files_under(workdir) == set()
    assert reasons(report)["bomb.ipynb"].startswith("could not be extracted")


class EndlessZeros(io.RawIOBase):
    """A decompressor that does not stop where the header says, counting what it hands out."""

    handed_out = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        buffer[:] = bytes(len(buffer))
        EndlessZeros.handed_out += len(buffer)
        return len(buffer)


def test_actual_bytes_are_counted_not_the_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = write_zip(tmp_path / "small.zip", {"tiny.ipynb": notebook()})
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, info, mode="r": EndlessZeros())
    workdir = tmp_path / "work"

    report = collect(source, workdir)

    assert report.submissions == [] and files_under(workdir) == set()
    assert reasons(report)["tiny.ipynb"] == "compressed more than 100:1 (a zip bomb?), not extracted"
    assert EndlessZeros.handed_out <= collect_module.RATIO_FLOOR_BYTES + 2 * 64 * 1024


def test_total_size_and_entry_count_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entries = {f"student{n}.ipynb": notebook(str(n)) for n in range(4)}
    source = write_zip(tmp_path / "many.zip", entries)
    size = len(entries["student0.ipynb"])
    monkeypatch.setattr(collect_module, "MAX_TOTAL_BYTES", 2 * size + size // 2)
    monkeypatch.setattr(collect_module, "MAX_ENTRIES", 3)

    report = collect(source, tmp_path / "work")

    assert [s.student_id for s in report.submissions] == ["student0", "student1"]
    skipped = reasons(report)
    assert skipped.keys() == {"student2.ipynb", "1 more entries"}
    assert skipped["student2.ipynb"].startswith("would take the archive over its")
    assert skipped["1 more entries"] == "not read: the archive has over 3 entries"


def test_nested_zip_and_junk_are_skipped(tmp_path: Path) -> None:
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as archive:
        archive.writestr("hidden.ipynb", notebook())
    source = write_zip(tmp_path / "outer.zip", {
        "inner.zip": inner.getvalue(),
        "__MACOSX/._alice.ipynb": b"\0",
        "slides.pdf": b"%PDF-1.4",
        "alice.ipynb": notebook(),
    })

    report = collect(source, tmp_path / "work")

    assert [s.student_id for s in report.submissions] == ["alice"]
    assert reasons(report) == {
        "inner.zip": "nested archive, not opened",
        "__MACOSX/._alice.ipynb": "not a notebook (system or hidden file)",
        "slides.pdf": "not a notebook",
    }


@pytest.mark.parametrize("content", [b"this is not a zip file", b"PK\x03\x04 truncated"], ids=["text", "truncated"])
def test_unreadable_archive_is_reported_not_raised(tmp_path: Path, content: bytes) -> None:
    source = tmp_path / "submissions.zip"
    source.write_bytes(content)

    report = collect(source, tmp_path / "work")

    assert report.submissions == []
    [(entry, reason)] = report.skipped
    assert entry == "submissions.zip" and reason.startswith("not a readable zip archive")


def test_missing_source_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        collect(tmp_path / "nowhere", tmp_path / "work")


def test_plain_names_with_digit_runs_are_not_canvas_names(tmp_path):
    """Regression: `_0_1_` inside a plain file name once made two students one Canvas user 0."""
    folder = tmp_path / "batch"
    folder.mkdir()
    for name in ("s0007_wrong_uniform_0_1_weights_only", "s0038_wrong_uniform_0_1_weights_only"):
        (folder / f"{name}.ipynb").write_text('{"cells": []}')
    report = collect_module.collect(folder, tmp_path / "work")
    assert sorted(s.student_id for s in report.submissions) == ["s0007_wrong_uniform_0_1_weights_only",
                                                                 "s0038_wrong_uniform_0_1_weights_only"]
    assert not report.superseded


# ---------------------------------------------------------------- identity from student-controlled names


def test_moodle_display_name_holding_the_marker_is_read_from_the_right(tmp_path: Path) -> None:
    """A display name shaped like a Moodle name does not make its notebook another student's."""
    eve_name = "Eve_4711_assignsubmission_file_zzz"
    source = write_zip(tmp_path / "moodle.zip", {
        f"{eve_name}_12345_assignsubmission_file_{NOTEBOOK_NAME}": notebook("eve"),
        f"Bob Builder_4711_assignsubmission_file_{NOTEBOOK_NAME}": notebook("bob, perfect"),
        f"{eve_name}_12346_assignsubmission_file_/{NOTEBOOK_NAME}": notebook("eve's twin, a folder"),
        f"Carol Diaz_4713_assignsubmission_file/{NOTEBOOK_NAME}": notebook("carol"),  # Moodle 4: no last "_"
    })

    report = collect(source, tmp_path / "work", notebook_name=NOTEBOOK_NAME)

    by_id = {s.student_id: s for s in report.submissions}
    assert sorted(by_id) == ["12345", "12346", "4711", "4713"]
    assert (by_id["12345"].display_name, by_id["12345"].original_name) == (eve_name, NOTEBOOK_NAME)
    assert by_id["12345"].other_ids == ["4711"]  # the flat name also reads as 4711: said, not used
    assert by_id["12346"].display_name == eve_name and by_id["12346"].other_ids == []  # a folder name is exact
    assert nbformat.reads(by_id["4711"].path.read_text(), as_version=4).cells[0].source == "answer = 'bob, perfect'"
    assert by_id["4713"].display_name == "Carol Diaz"
    assert not report.superseded and not report.disputed and not report.skipped
    [note] = report.notes
    assert note.startswith(f"{eve_name}_12345_") and "also reads as id 4711; read as 12345," in note


def test_canvas_ids_come_from_the_fixed_structure_not_from_the_uploaded_name(tmp_path: Path) -> None:
    """Canvas writes `lastfirst[_LATE]_userid_fileid_` before the student's own file name and
    strips `_<digits>_` from lastfirst: numbers in the uploaded name never become the ids."""
    folder = tmp_path / "canvas"
    folder.mkdir()
    names = {
        "eve4711_12345_678901_x_4711_99_vanishing_gradients.ipynb": "forged",  # the upload claims user 4711
        "doejohn_LATE_23456_678902_vanishing_gradients_2026_11_20.ipynb": "dated",  # digit runs, innocently
        "roe4711mary_34567_678903_vanishing_gradients.ipynb": "digits in lastfirst",
    }
    for name, marker in names.items():
        (folder / name).write_bytes(notebook(marker))

    report = collect(folder, tmp_path / "work")

    readings = {s.student_id: (s.display_name, s.original_name, s.other_ids, s.marked_late) for s in report.submissions}
    assert readings == {
        "12345": ("eve4711", "x_4711_99_vanishing_gradients.ipynb", ["4711"], False),
        "23456": ("doejohn", "vanishing_gradients_2026_11_20.ipynb", ["2026"], True),
        "34567": ("roe4711mary", "vanishing_gradients.ipynb", [], False),
    }
    assert len(report.notes) == 2 and all("check who handed it in" in note for note in report.notes)
    assert not report.superseded and not report.disputed


def test_one_id_under_two_names_is_reported_not_superseded(tmp_path: Path) -> None:
    """Two Moodle downloads merged (participant ids are per assignment) and a forged upload name:
    nobody's notebook is superseded by another student's; a resubmission still is."""
    source = write_zip(tmp_path / "moodle.zip", {
        f"Ann Lee_4711_assignsubmission_file_/{NOTEBOOK_NAME}": notebook("ann"),
        f"Bo Chen_4711_assignsubmission_file_/{NOTEBOOK_NAME}": notebook("bo"),
        f"Dee Fox_4712_assignsubmission_file_{NOTEBOOK_NAME}": notebook("dee"),
        # Eve (participant 12345) named her upload so that it reads as Dee's from the right.
        f"Eve Ray_12345_assignsubmission_file_zzz_4712_assignsubmission_file_{NOTEBOOK_NAME}": notebook("eve"),
        f"Gus Ho_4714_assignsubmission_file_{NOTEBOOK_NAME}": notebook("gus, first"),
        "Gus Ho_4714_assignsubmission_file_vanishing_gradients-1.ipynb": notebook("gus, again"),
    })

    report = collect(source, tmp_path / "work", notebook_name=NOTEBOOK_NAME)

    by_id = {s.student_id: s.display_name for s in report.submissions}
    assert by_id == {
        "4711-Ann_Lee": "Ann Lee", "4711-Bo_Chen": "Bo Chen",  # neither holds 4711 better than the other
        "4712": "Dee Fox",  # the one name that carries 4712 unambiguously keeps it
        "4712-Eve_Ray_12345_assignsubmission_file_zzz": "Eve Ray_12345_assignsubmission_file_zzz",
        "4714": "Gus Ho",
    }
    assert {claimed: sorted(f.student_id for f in files) for claimed, files in report.disputed} == {
        "4711": ["4711-Ann_Lee", "4711-Bo_Chen"],
        "4712": ["4712", "4712-Eve_Ray_12345_assignsubmission_file_zzz"],
    }
    [(older, kept)] = report.superseded  # Gus's resubmission: one name, one student
    assert (older.original_name, kept.original_name) == (NOTEBOOK_NAME, "vanishing_gradients-1.ipynb")
    disputes = [note for note in report.notes if "different names" in note]
    assert len(disputes) == 2 and "as 4711-Ann_Lee" in disputes[0] and "as 4711-Bo_Chen" in disputes[0]


def test_over_long_names_are_shortened_not_skipped(tmp_path: Path) -> None:
    """Names past the file system's 255 bytes, and ids past 100 characters, still get graded."""
    upload = "v" * 240 + ".ipynb"  # what the student uploaded; Canvas puts its prefix in front
    long_folder = "Åse Ødegård " * 12 + "_4711_assignsubmission_file_"  # 2-byte letters: past 255 bytes
    source = write_zip(tmp_path / "lms.zip", {
        f"doejohn_12345_678901_{upload}": notebook("canvas"),
        f"{long_folder}/{upload}": notebook("moodle"),
    })
    plain = tmp_path / "plain"
    plain.mkdir()
    for tail in ("a", "b"):  # the same first 100 characters
        (plain / f"{'s' * 200}{tail}.ipynb").write_bytes(notebook(tail))

    lms = collect(source, tmp_path / "work")
    flat = collect(plain, tmp_path / "work")

    assert not lms.skipped and not flat.skipped
    canvas, moodle = lms.submissions
    assert (canvas.student_id, canvas.original_name) == ("12345", upload)
    assert (moodle.student_id, moodle.display_name, moodle.original_name) == ("4711", long_folder[:-28], upload)
    for submission in lms.submissions:
        assert submission.path.is_file() and submission.path.suffix == ".ipynb"
        assert all(len(part.encode()) <= names.NAME_MAX_BYTES for part in submission.path.parts)
    ids = [s.student_id for s in flat.submissions]
    assert len(set(ids)) == 2 and all(len(i) == 100 and i.startswith("s" * 90) for i in ids)
    assert set(ids) == {names.folder_safe(f"{'s' * 200}{tail}") for tail in ("a", "b")}  # stable: a hash
    for student_id in ids:  # where the results go: <out>/<student_id>/
        (tmp_path / "out" / student_id).mkdir(parents=True)


def test_a_forged_canvas_name_does_not_take_a_students_id(tmp_path: Path) -> None:
    """Canvas turns "_<digits>_" in a name into digits, but "Eve__4711__1__x" comes out as
    eve_4711_1_x: read from the left, Eve's file claims Bob's id, and is ambiguous. Bob's
    unambiguous name keeps the id; Eve's file is graded under its own."""
    folder = tmp_path / "canvas"
    folder.mkdir()
    (folder / "eve_4711_1_x_12345_678901_vanishing_gradients.ipynb").write_bytes(notebook("eve"))
    (folder / "builderbob_4711_678902_vanishing_gradients.ipynb").write_bytes(notebook("bob"))

    report = collect(folder, tmp_path / "work")

    by_id = {s.student_id: (s.display_name, s.other_ids) for s in report.submissions}
    assert by_id == {"4711": ("builderbob", []), "4711-eve": ("eve", ["12345"])}
    assert [(claimed, sorted(f.student_id for f in files)) for claimed, files in report.disputed] == [
        ("4711", ["4711", "4711-eve"])]
    assert not report.superseded
