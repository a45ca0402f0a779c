"""Publishing: what the instructor's process does with a graded folder, after grading.

It reads the gradebook of a `gradelab grade --out` folder and writes feedback pages, the
instructor report, review sheets and LMS exports. It never runs or reads student code: the
answers and figures it shows are plain data the grader saved (escaped on every page).

| module | role |
|---|---|
| `api` | the entry points below, as the CLI uses them |
| `feedback`, `instructor`, `review` | the student pages, the batch report, the manual-review sheets |
| `pages`, `templates/` | what the pages share: the Jinja environment and templates, embedded images |
| `screenshot` | a PNG of the report (headless Chromium) |
| `exports`, `roster`, `late` | LMS files, rosters and matching, the late policy applied |
| `csvfiles` | reading CSV files that come back from spreadsheets and LMSs; the cell rule of every CSV written |
"""

from __future__ import annotations

_ENTRY_POINTS = ("export_grades", "import_review_sheets", "write_reports")
__all__ = list(_ENTRY_POINTS)


def __getattr__(name: str):
    # Loaded on first use: grading imports `publish.late`, and should not pay for the page
    # renderers (matplotlib, jinja2) that `api` imports.
    if name in _ENTRY_POINTS:
        from gradelab.publish import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
