"""`gradelab demo`, the README's first command, end to end on a copy of the repository: release,
grade every bundled example (hostile ones included) through the batch, export to every LMS, report."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_grades_every_example_and_exports(root: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (root / name).is_file():
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, project / name)
    examples = sorted(p.stem for p in (root / "examples" / "submissions").glob("*.ipynb"))
    for name in examples:  # the corpus as this checkout has it, committed or not
        shutil.copy2(root / "examples" / "submissions" / f"{name}.ipynb", project / "examples" / "submissions")
    out = tmp_path / "out"
    gradelab = Path(sys.executable).with_name("gradelab")
    done = subprocess.run([str(gradelab), "demo", "--project", str(project), "--out", str(out)],
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert not summary["lost"] and not summary["interrupted"]
    statuses = {name: json.loads((out / name / "submission.json").read_text())["status"] for name in examples}
    assert all((out / name / "results.json").is_file() for name in examples)  # every result saved, none lost
    rejected = ["hostile_forged_cell_report", "hostile_forged_figures", "hostile_forged_replies", "hostile_huge_report"]
    assert all(statuses[s] == "malformed" for s in rejected)
    assert summary["malformed"] == len(rejected)
    assert statuses["correct_sequential_style"] == "graded"
    for export in ("canvas_import.csv", "moodle_import.csv", "blackboard_import.csv", "grades.csv"):
        assert (out / export).stat().st_size > 0, export
    assert (out / "gradescope").is_dir()
    report = (out / "report.html").read_text()
    assert 'id="count-malformed">4<' in report and (out / "correct_sequential_style" / "feedback.html").is_file()
