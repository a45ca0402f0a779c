"""Reading a submitted notebook: what to execute, and what is missing or was tampered with.

The file is untrusted input, but reading it is only JSON parsing: no code runs here. A file that
is not a notebook, or whose structure is not a notebook's, gets one clear message; a mangled
notebook (cells deleted, reordered, duplicated, retyped) is executed as far as it goes, with its
locked cells as released and each grade_id once, and every deviation from the release is
reported in plain words.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import nbformat
from nbgrader.utils import compute_checksum

MAX_NOTEBOOK_BYTES = 20 << 20


class BrokenNotebook(ValueError):
    """The file cannot be graded at all; the message says why, for the student."""


@dataclass
class CodeCell:
    index: int               # position in the submitted notebook
    source: str
    grade_id: str | None     # nbgrader's id, when the metadata survived and the release has it
    kind: str                # as released: "solution", "tests" (public checks), "locked"; "student" (their own)


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


def read_notebook(path: Path) -> dict:
    """The notebook as a dict in nbformat 4's layout (older formats upgraded), or raise BrokenNotebook.
    Only the parts the grader reads are checked, by `_submitted_cells`."""
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
    major = data.get("nbformat", 1)
    if type(major) is not int or major not in nbformat.versions and major < 4:
        raise BrokenNotebook(f"the notebook has an unknown format version ({str(major)[:20]})")
    if major > 4:
        raise BrokenNotebook(f"the notebook has format version {major}, newer than this grader reads (4)")
    if major == 4:
        # Used as parsed: nbformat's reader would also rework the outputs, which the grader ignores
        # (the cells run afresh) and which could only make a gradable notebook fail.
        return data
    try:
        return nbformat.convert(nbformat.versions[major].to_notebook_json(data), 4)
    except Exception as exc:  # nbformat raises many kinds of errors on malformed documents
        why = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise BrokenNotebook(f"the notebook structure is invalid (format version {major}): {why}") from None


def load_submission(path: Path, release: nbformat.NotebookNode) -> Submission:
    """The submitted notebook's code cells, compared with the released notebook's.

    The release, not the submission's own metadata (which a student can edit), says what each
    cell is: a cell is matched to the released one by its nbgrader grade_id, and a cell whose
    grade_id the release lacks is the student's own. The rules:

    - Copies of a grade_id: the first in the notebook is that cell; later copies are neither run
      nor graded. Run, a later copy would replace what the first defined, draw the figure the
      plot tests look for, or re-run a locked cell with other values, and nothing tells a fix
      from a forgery; a later cell that needs something only a copy defines fails as if the copy
      had been deleted. A message names the grade_id.
    - Locked cells (read-only in the release): nbgrader's checksum of the cell's submitted type and
      source, under the released metadata, is compared with the release's. A changed locked cell
      becomes the released version (type and source), which runs in its place, with a message.
    - A missing locked cell is reported, not put back: in a reordered notebook where it belongs
      cannot be known, and each cell's random seed depends on its position. What it would have
      drawn counts as missing.
    - A notebook whose structure is not a notebook's (cells not a list, metadata not objects,
      source not text, grade_id not a string, ...) raises BrokenNotebook, and nothing else.
    """
    released = {c.metadata["nbgrader"]["grade_id"]: c for c in release.cells if "nbgrader" in c.metadata}
    cells: list[CodeCell] = []
    copies: dict[str, int] = {}
    problems: list[str] = []
    answers: dict[str, str] = {}
    for cell in _submitted_cells(read_notebook(path), released):
        if cell.grade_id is None:
            if cell.cell_type == "code":
                cells.append(CodeCell(index=cell.index, source=cell.source, grade_id=None, kind="student"))
            continue
        copies[cell.grade_id] = copies.get(cell.grade_id, 0) + 1
        if copies[cell.grade_id] > 1:
            continue
        origin = released[cell.grade_id]
        kind = _cell_kind(origin.metadata["nbgrader"])
        if kind == "locked":
            cell = _locked_as_released(cell, origin, problems)
        if cell.cell_type == "markdown" and _is_written_answer(origin):
            answers[cell.grade_id] = cell.source[:20_000]
        if cell.cell_type != "code":
            if origin.cell_type == "code":
                problems.append(f"cell {cell.grade_id} was changed into a {cell.cell_type} cell, so it was not run")
            continue
        cells.append(CodeCell(index=cell.index, source=cell.source, grade_id=cell.grade_id, kind=kind))

    for grade_id, origin in released.items():
        kind = _cell_kind(origin.metadata["nbgrader"])
        runs = origin.cell_type == "code" and kind != "tests"
        if grade_id not in copies and runs:
            problems.append(f"cell {grade_id} is missing (deleted, or its metadata was removed): "
                            + ("it was not run, and what it draws counts as missing" if kind == "locked" else
                               "answers defined there count as not answered unless defined elsewhere"))
        elif copies.get(grade_id, 0) > 1 and (runs or _is_written_answer(origin)):
            problems.append(f"cell {grade_id} appears {copies[grade_id]} times; only the first was "
                            + ("run and graded, the later copies were not run" if runs else "graded"))
    order = [c.grade_id for c in cells if c.grade_id is not None and c.kind != "tests"]
    if order != [g for g in released if g in order]:
        problems.append("cells are in a different order than in the released notebook; they were run in the submitted order")
    return Submission(cells=cells, problems=problems, answers=answers)


@dataclass(frozen=True)
class _SubmittedCell:
    index: int               # position in the submitted notebook
    cell_type: str
    source: str
    grade_id: str | None     # only an id the release has


def _submitted_cells(nb: dict, released: dict) -> list[_SubmittedCell]:
    """The notebook's cells, each checked to have the layout the grader reads, or BrokenNotebook."""
    def broken(why: str) -> BrokenNotebook:
        return BrokenNotebook(f"the notebook structure is invalid: {why} (was the file edited outside Jupyter?)")

    raw_cells = nb.get("cells", [])
    if not isinstance(raw_cells, list):
        raise broken("its `cells` is not a list")
    cells = []
    for index, cell in enumerate(raw_cells):
        if not isinstance(cell, dict):
            raise broken(f"cell {index} is not a JSON object")
        cell_type, source, metadata = cell.get("cell_type"), cell.get("source", ""), cell.get("metadata", {})
        if cell_type not in ("code", "markdown", "raw"):
            raise broken(f"cell {index} has no cell_type of a notebook (code, markdown or raw)")
        if isinstance(source, list) and all(isinstance(line, str) for line in source):
            source = "".join(source)
        if not isinstance(source, str):
            raise broken(f"the source of cell {index} is neither text nor a list of lines")
        if not isinstance(metadata, dict):
            raise broken(f"the metadata of cell {index} is not a JSON object")
        nbgrader_meta = metadata.get("nbgrader", {})
        if not isinstance(nbgrader_meta, dict):
            raise broken(f"metadata.nbgrader of cell {index} is not a JSON object")
        grade_id = nbgrader_meta.get("grade_id")
        if grade_id is not None and not isinstance(grade_id, str):
            raise broken(f"metadata.nbgrader.grade_id of cell {index} is not text")
        cells.append(_SubmittedCell(index, cell_type, source, grade_id if grade_id in released else None))
    return cells


def _locked_as_released(cell: _SubmittedCell, origin: nbformat.NotebookNode, problems: list[str]) -> _SubmittedCell:
    """The locked cell as released, with a message if the submitted one differs (by nbgrader's checksum)."""
    meta = origin.metadata["nbgrader"]
    submitted = nbformat.from_dict({"cell_type": cell.cell_type, "source": cell.source, "metadata": {"nbgrader": meta}})
    if compute_checksum(submitted) == (meta.get("checksum") or compute_checksum(origin)):
        return cell
    if origin.cell_type == "code":
        problems.append(f"cell {cell.grade_id} is locked and was changed; the released version was run instead")
    elif cell.cell_type == "code":
        problems.append(f"cell {cell.grade_id} is locked text and was made into code; that code was not run")
    return replace(cell, cell_type=origin.cell_type, source=origin.source)


def _is_written_answer(origin: nbformat.NotebookNode) -> bool:
    """A released markdown cell the student answers in, graded by hand."""
    meta = origin.metadata["nbgrader"]
    return origin.cell_type == "markdown" and bool(meta.get("grade")) and bool(meta.get("solution"))
