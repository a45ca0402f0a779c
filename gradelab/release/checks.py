"""Checks of the authored source: the mistakes that would make a broken release, stopped with the
file, the cell and the line."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat

from gradelab.config import CONFIG_FILE, GradingConfig, question_of
from gradelab.errors import GradelabError

MARKERS = (("### BEGIN SOLUTION", "### END SOLUTION"), ("### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"))
TEST_MARKER = re.compile(r"""@pytest\.mark\.question\(\s*["'](q(?:\d+|b)_\d+)["']""")


class ReleaseError(GradelabError, ValueError):
    """A mistake in source/; the message names the file, the cell and the line."""


def check_source(nb: nbformat.NotebookNode, config: GradingConfig, *, notebook_path: Path,
                 tests_dir: Path) -> None:
    """Stop on the mistakes that would make a broken release, naming file, cell and line."""
    name = notebook_path.name
    seen: dict[str, int] = {}
    points = {q.id: [0.0, 0.0] for q in config.questions}  # hidden-test points, manual points
    known = {q.id for q in config.questions}
    for index, cell in enumerate(nb.cells):
        meta = cell.metadata.get("nbgrader")
        where = f"{name}, cell {index}"
        _check_markers(cell.source, where)
        if not meta:
            continue
        grade_id = meta.get("grade_id")
        if not grade_id:
            raise ReleaseError(f"{where}: nbgrader cell without a grade_id")
        if grade_id in seen:
            raise ReleaseError(f"{where}: grade_id {grade_id!r} is also used by cell {seen[grade_id]}")
        seen[grade_id] = index
        graded = meta.get("grade") or meta.get("solution")
        qid = question_of(grade_id)
        if graded and qid not in known:
            raise ReleaseError(f"{where}: answer cell {grade_id!r} does not start with a question id "
                               f"of {CONFIG_FILE} (e.g. q1_2_...)")
        if meta.get("grade"):
            slot = 1 if meta.get("solution") or cell.cell_type == "markdown" else 0
            points[qid][slot] += float(meta.get("points", 0))
    locked_demos = {meta["grade_id"] for cell in nb.cells
                    if (meta := cell.metadata.get("nbgrader")) and cell.cell_type == "code"
                    and meta.get("locked") and not meta.get("grade") and not meta.get("solution")}
    for grade_id in config.skip_when_grading:
        if grade_id not in locked_demos:
            raise ReleaseError(f"{CONFIG_FILE}: skip_when_grading lists {grade_id!r}, which is not a locked code "
                               f"cell of {name} without points (only demonstrations may be skipped)")
    for q in config.questions:
        auto, manual = points[q.id]
        if (auto, manual) != (q.points, q.manual_points):
            raise ReleaseError(f"{name}: question {q.id} has {auto:g} test-cell points and {manual:g} manual "
                               f"points in the notebook, but {CONFIG_FILE} says {q.points:g} and {q.manual_points:g}")
    tested = {m for f in sorted(tests_dir.glob("test_*.py")) for m in TEST_MARKER.findall(f.read_text())}
    for q in config.questions:
        if q.points and q.id not in tested:
            raise ReleaseError(f"question {q.id} has {q.points:g} points for hidden tests but no test in "
                               f"{tests_dir} is marked @pytest.mark.question({q.id!r})")


def _check_markers(source: str, where: str) -> None:
    for begin, end in MARKERS:
        open_line = None
        for lineno, line in enumerate(source.splitlines(), start=1):
            text = line.strip()
            if text == begin:
                if open_line is not None:
                    raise ReleaseError(f"{where}, line {lineno}: {begin} inside the region opened at line {open_line}")
                open_line = lineno
            elif text == end:
                if open_line is None:
                    raise ReleaseError(f"{where}, line {lineno}: {end} without {begin}")
                open_line = None
        if open_line is not None:
            raise ReleaseError(f"{where}, line {open_line}: {begin} is never closed by {end}")
