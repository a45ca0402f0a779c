"""`gradelab grade` on an LMS download whose names are hostile or over-long: every student is
graded under the id the LMS gave them, and the instructor is told what the names could mean."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import nbformat
import pytest
from rich.console import Console

from gradelab.grading import batch
from student_notebooks import NOTEBOOK, reference_notebook

pytestmark = pytest.mark.slow


def test_a_forged_display_name_and_an_over_long_name_cost_nobody_their_grade(root: Path, tmp_path: Path) -> None:
    release = nbformat.writes(nbformat.read(root / "release" / "vanishing_gradients" / NOTEBOOK, as_version=4))
    perfect = nbformat.writes(reference_notebook(root))
    eve = "Eve_4711_assignsubmission_file_zzz_12345_assignsubmission_file_" + NOTEBOOK
    long_name = "doejohn_23456_678901_" + "v" * 240 + ".ipynb"
    source = tmp_path / "download.zip"
    with zipfile.ZipFile(source, "w") as archive:
        archive.writestr(eve, release)  # Eve, participant 12345, hands in the blank notebook
        archive.writestr(f"Bob Builder_4711_assignsubmission_file_{NOTEBOOK}", perfect)
        archive.writestr(long_name, perfect)
    out, shown = tmp_path / "out", io.StringIO()

    summary = batch.grade_batch(source, out, project=root, workers=2, console=Console(file=shown, width=400))

    scores = {r.student_id: r.score for r in summary.results}
    assert summary.ok and sorted(scores) == ["12345", "23456", "4711"]
    # Bob and the long name hand in the same notebook (the reference answers; tests/test_batch.py
    # checks that they score full marks), Eve the blank one.
    assert scores["4711"] == scores["23456"] > scores["12345"]
    assert all((out / student_id / "results.json").is_file() for student_id in scores)
    written = json.loads((out / "summary.json").read_text())
    assert written["superseded"] == [] and written["skipped"] == [] and written["disputed"] == {}
    [note] = written["notes"]
    assert "also reads as id 4711; read as 12345," in note
    assert "note" in shown.getvalue() and "also reads as id 4711" in shown.getvalue()
