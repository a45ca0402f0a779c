"""Reading a submitted notebook: what to execute, and what is missing or was tampered with.

The file is untrusted input, but reading it is only JSON parsing: no code runs here. A file that
is not a notebook gets one clear message; a mangled notebook (cells deleted, reordered,
duplicated, retyped) is executed as far as it goes, and every deviation from the release is
reported in plain words.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

MAX_NOTEBOOK_BYTES = 20 << 20


class BrokenNotebook(ValueError):
    """The file cannot be graded at all; the message says why, for the student."""


@dataclass
class CodeCell:
    index: int               # position in the submitted notebook
    source: str
    grade_id: str | None     # nbgrader's id, when the metadata survived
    kind: str                # "solution", "tests" (public checks), "locked", "student" (added by the student)


@dataclass
class Submission:
    cells: list[CodeCell]
    problems: list[str] = field(default_factory=list)
    answers: dict[str, str] = field(default_factory=dict)  # grade_id of a manual cell -> its text
    # Other students' files and the results beside this one: the sandbox must not read them.
    private_paths: list[Path] = field(default_factory=list)

    def to_execute(self, skip: set[str] | frozenset[str] = frozenset()) -> list[tuple[int, str]]:
        """Cells the grader runs: everything but the public-check cells, whose verdicts do not count,
        and the locked demonstrations in `skip` (grade_ids)."""
        return [(c.index, c.source) for c in self.cells
                if c.kind != "tests" and not (c.kind == "locked" and c.grade_id in skip)]


def _cell_kind(meta: dict) -> str:
    if meta.get("grade") and not meta.get("solution"):
        return "tests"
    if meta.get("solution"):
        return "solution"
    if meta.get("locked"):
        return "locked"
    return "student"


def read_notebook(path: Path) -> nbformat.NotebookNode:
    """Parse and upgrade to nbformat 4, or raise BrokenNotebook."""
    try:
        size = path.stat().st_size
        if size > MAX_NOTEBOOK_BYTES:
            raise BrokenNotebook(f"the file is {size >> 20} MiB; a notebook for this assignment is far smaller "
                                 f"(limit {MAX_NOTEBOOK_BYTES >> 20} MiB): clear the outputs and resubmit")
        raw = path.read_bytes()
    except OSError as exc:
        raise BrokenNotebook(f"the file cannot be read: {exc.strerror}") from None
    if not raw.strip():
        raise BrokenNotebook("the file is empty")
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise BrokenNotebook("the file is not text (is it a notebook? a zip or PDF was perhaps uploaded)") from None
    except json.JSONDecodeError as exc:
        # A notebook is one JSON object: one that does not end with "}" was cut off.
        hint = "" if raw.rstrip().endswith(b"}") else " (it looks cut off: was the upload interrupted?)"
        raise BrokenNotebook(f"the file is not valid notebook JSON: {exc.msg} at line {exc.lineno}{hint}") from None
    if not isinstance(data, dict) or "cells" not in data and "worksheets" not in data:
        raise BrokenNotebook("the file is JSON but not a Jupyter notebook (no cells)")
    try:
        # nbformat.reads on the dict parsed above, without its schema validation: that only logs
        # (cells are read defensively below) and took as long as everything else here.
        major, minor = nbformat.reader.get_version(data)
        if type(major) is int and major > 4:
            raise BrokenNotebook(f"the notebook has format version {major}, newer than this grader reads (4)")
        if major not in nbformat.versions:
            raise BrokenNotebook(f"the notebook has an unknown format version ({str(major)[:20]})")
        nb = nbformat.versions[major].to_notebook_json(data, minor=minor)
        if major < 4:
            nb = nbformat.convert(nb, 4)
    except BrokenNotebook:
        raise
    except Exception as exc:  # nbformat raises many kinds of errors on malformed documents
        raise BrokenNotebook(f"the notebook structure is invalid: {str(exc).splitlines()[0][:200]}") from None
    return nb


def load_submission(path: Path, release: nbformat.NotebookNode) -> Submission:
    """The submitted notebook's code cells, compared with the released notebook's."""
    nb = read_notebook(path)
    expected = {c.metadata["nbgrader"]["grade_id"]: c for c in release.cells if "nbgrader" in c.metadata}
    cells: list[CodeCell] = []
    seen: dict[str, int] = {}
    problems: list[str] = []
    answers: dict[str, str] = {}
    for index, cell in enumerate(nb.get("cells", [])):
        meta = cell.get("metadata", {}).get("nbgrader", {}) if isinstance(cell.get("metadata"), dict) else {}
        grade_id = meta.get("grade_id") if isinstance(meta.get("grade_id"), str) else None
        source = cell.get("source", "")
        if isinstance(source, list):
            source = "".join(str(s) for s in source)
        if grade_id:
            seen[grade_id] = seen.get(grade_id, 0) + 1
        if cell.get("cell_type") == "markdown" and meta.get("grade") and meta.get("solution") and grade_id:
            answers[grade_id] = answers.get(grade_id, "") + str(source)[:20_000]
        if cell.get("cell_type") != "code":
            if grade_id in expected and expected[grade_id].cell_type == "code":
                problems.append(f"cell {grade_id} was changed into a {cell.get('cell_type')} cell, so it was not run")
            continue
        kind = _cell_kind(meta) if grade_id in expected else "student"
        cells.append(CodeCell(index=index, source=str(source), grade_id=grade_id, kind=kind))

    for grade_id, cell in expected.items():
        meta = cell.metadata["nbgrader"]
        if cell.cell_type != "code" or _cell_kind(meta) == "tests":
            continue
        if grade_id not in seen:
            problems.append(f"cell {grade_id} is missing (deleted, or its metadata was removed): "
                            f"answers defined there count as not answered unless defined elsewhere")
        elif seen[grade_id] > 1:
            problems.append(f"cell {grade_id} appears {seen[grade_id]} times; all copies were run, in order")
    order = [c.grade_id for c in cells if c.grade_id in expected and c.kind != "tests"]
    release_order = [g for g in expected if g in order]
    if [g for g in dict.fromkeys(order)] != release_order:
        problems.append("cells are in a different order than in the released notebook; they were run in the submitted order")
    return Submission(cells=cells, problems=problems, answers=answers)
