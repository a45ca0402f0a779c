"""After grading: feedback, reports, manual scores and LMS exports of a `gradelab grade --out` folder.

The gradebook in that folder is the source of truth: it holds the automatic results and, apart
from them, the manual scores, which a regrade never overwrites. Everything here reads the merged
view (`Gradebook.results()`).
"""

from __future__ import annotations

import json
from pathlib import Path

from gradelab.errors import GradelabError
from gradelab.grading.gradebook import Gradebook, ManualScores
from gradelab.project import FEEDBACK_FILE, GRADEBOOK_FILE, Project, ResultsDir
from gradelab.boundary.records import SubmissionResult
from gradelab.publish.exports import ExportReport, ExportTarget, export
from gradelab.publish.feedback import write_feedback
from gradelab.publish.instructor import write_instructor_report
from gradelab.publish.review import read_review_sheet, write_review_sheet
from gradelab.publish.roster import load_roster
from gradelab.publish.screenshot import screenshot


class NotGradedError(GradelabError):
    """The folder holds no graded submission: `gradelab grade --out` has not written it."""


def _gradebook(results_dir: Path) -> Path:
    """The folder's gradebook; never a new, empty one made by opening a path that is not there."""
    path = ResultsDir(results_dir).gradebook
    if not path.is_file():
        raise NotGradedError(f"{results_dir}: no {GRADEBOOK_FILE}, so nothing was graded into it; "
                             f"run `gradelab grade SUBMISSIONS --out {results_dir}` first")
    return path


def _graded(results_dir: Path) -> tuple[list[SubmissionResult], ManualScores]:
    with Gradebook(_gradebook(results_dir)) as gradebook:
        results, manual = gradebook.results(), gradebook.manual_scores()
    if not results:
        raise NotGradedError(f"{ResultsDir(results_dir).gradebook} holds no graded submission; "
                             f"run `gradelab grade SUBMISSIONS --out {results_dir}` first")
    return results, manual


def write_reports(results_dir: Path, project: Path) -> dict[str, Path]:
    """Per-student feedback pages, the instructor report (and its screenshot when Chromium is
    installed), and one review page + editable CSV per manually graded question."""
    config = Project.load(project).config
    results, manual = _graded(results_dir)
    layout = ResultsDir(results_dir)
    for result in results:
        write_feedback(result, config.questions, student_dir=layout.student(result.student_id),
                       manual=manual.get(result.student_id))
    summary = layout.summary
    seconds = json.loads(summary.read_text()).get("seconds") if summary.exists() else None
    report = write_instructor_report(results, config.questions, out=layout.report,
                                     grading_seconds=seconds, results_dir=results_dir)
    sheets = write_review_sheet(results, config.questions, answers={r.student_id: r.answers for r in results},
                                out_dir=layout.review)
    paths = {"feedback pages": layout.student("<student>") / FEEDBACK_FILE, "instructor report": report,
             "manual review sheets": layout.review if sheets else None}
    png = layout.report_png
    if screenshot(report, png):
        paths["report screenshot"] = png
    return {label: path for label, path in paths.items() if path is not None}


def import_review_sheets(results_dir: Path, sheets: tuple[Path, ...]) -> int:
    """Store the graded rows of the sheets as manual scores; returns how many. Every sheet is
    read (and checked) before the first score is stored, so a bad sheet stores nothing."""
    scores = [score for sheet in sheets for score in read_review_sheet(sheet)]
    with Gradebook(_gradebook(results_dir)) as gradebook:
        for score in scores:
            gradebook.set_manual_score(score.student_id, score.question_id, score.points, score.comment)
    return len(scores)


def export_grades(results_dir: Path, target: ExportTarget, out: Path, *, roster: Path | None,
                  project: Path) -> ExportReport:
    config = Project.load(project).config
    results, _ = _graded(results_dir)
    return export(results, target=target, out=out, settings=config.lms,
                  roster=load_roster(roster) if roster else None, late_policy=config.late_policy,
                  question_ids=[q.id for q in config.questions])
