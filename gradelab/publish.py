"""After grading: feedback, reports, manual scores and LMS exports of a `gradelab grade --out` folder.

The gradebook in that folder is the source of truth: it holds the automatic results and, apart
from them, the manual scores, which a regrade never overwrites. Everything here reads the merged
view (`Gradebook.results()`).
"""

from __future__ import annotations

import json
from pathlib import Path

from gradelab.batch import GRADEBOOK_FILE
from gradelab.config import CONFIG_FILE, load_config
from gradelab.exports import ExportReport, export
from gradelab.gradebook import Gradebook
from gradelab.reports import (read_review_sheet, screenshot, write_feedback, write_instructor_report,
                              write_review_sheet)
from gradelab.roster import load_roster


def write_reports(results_dir: Path, project: Path) -> dict[str, Path]:
    """Per-student feedback pages, the instructor report (and its screenshot when Chromium is
    installed), and one review page + editable CSV per manually graded question."""
    config = load_config(Path(project) / CONFIG_FILE)
    with Gradebook(results_dir / GRADEBOOK_FILE) as gradebook:
        results = gradebook.results()
        manual = gradebook.manual_scores()
    for result in results:
        write_feedback(result, config.questions, student_dir=results_dir / result.student_id,
                       manual=manual.get(result.student_id))
    summary = results_dir / "summary.json"
    seconds = json.loads(summary.read_text()).get("seconds") if summary.exists() else None
    report = write_instructor_report(results, config.questions, out=results_dir / "report.html",
                                     grading_seconds=seconds, results_dir=results_dir)
    sheets = write_review_sheet(results, config.questions, answers={r.student_id: r.answers for r in results},
                                out_dir=results_dir / "review")
    paths = {"feedback pages": results_dir / "<student>" / "feedback.html", "instructor report": report,
             "manual review sheets": results_dir / "review" if sheets else None}
    png = results_dir / "report.png"
    if screenshot(report, png):
        paths["report screenshot"] = png
    return {label: path for label, path in paths.items() if path is not None}


def import_review_sheets(results_dir: Path, sheets: tuple[Path, ...]) -> int:
    count = 0
    with Gradebook(results_dir / GRADEBOOK_FILE) as gradebook:
        for sheet in sheets:
            for score in read_review_sheet(sheet):
                gradebook.set_manual_score(score.student_id, score.question_id, score.points, score.comment)
                count += 1
    return count


def export_grades(results_dir: Path, target: str, out: Path, *, roster: Path | None, project: Path) -> ExportReport:
    config = load_config(Path(project) / CONFIG_FILE)
    with Gradebook(results_dir / GRADEBOOK_FILE) as gradebook:
        results = gradebook.results()
    return export(results, target=target, out=out, settings=config.lms,
                  roster=load_roster(roster) if roster else None, late_policy=config.late_policy,
                  question_ids=[q.id for q in config.questions])
