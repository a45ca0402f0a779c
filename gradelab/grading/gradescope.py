"""Grading on Gradescope: find the submitted notebook, grade it, write `results/results.json`.

Gradescope runs the bundle's `run_autograder` once per submission in a folder laid out as
`/autograder/{source,submission,results}`. Whatever goes wrong, the student gets a results.json:
a score of 0 and a message that says why, never an empty page.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from gradelab.config import GradingConfig
from gradelab.boundary.records import SubmissionResult, Visibility

# From "shown at once" to "never shown": a question's setting may only make a test less visible.
VISIBILITY_ORDER: tuple[Visibility, ...] = ("visible", "after_due_date", "after_published", "hidden")


class NoNotebook(Exception):
    """The submission holds no notebook to grade, or several; the message tells the student what to do."""


def submitted_notebook(submission: Path, expected_name: str) -> Path:
    """The notebook to grade: `submission` itself if it is a file, else the one named `expected_name`,
    else the only notebook. Editor leftovers (.ipynb_checkpoints, __MACOSX, hidden folders) are ignored."""
    if submission.is_file():
        return submission
    if not submission.is_dir():
        raise NoNotebook(f"the submission folder {submission} does not exist")
    notebooks = sorted(p for p in submission.rglob("*.ipynb") if p.is_file() and not any(
        part.startswith(".") or part == "__MACOSX" for part in p.relative_to(submission).parts))
    named = [p for p in notebooks if p.name == expected_name]
    listed = ", ".join(p.relative_to(submission).as_posix() for p in notebooks)
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        raise NoNotebook(f"the submission has {len(named)} files named {expected_name} ({listed}): submit only one")
    if len(notebooks) == 1:
        return notebooks[0]
    if not notebooks:
        raise NoNotebook(f"the submission holds no notebook (.ipynb file): submit {expected_name}")
    raise NoNotebook(f"the submission holds {len(notebooks)} notebooks ({listed}) and none is named "
                     f"{expected_name}: submit only {expected_name}")


def results_document(result: SubmissionResult, config: GradingConfig) -> dict:
    """Gradescope's results.json for a graded submission, with the visibility the config asks for."""
    document = result.to_gradescope()
    settings = config.gradescope
    for test, outcome in zip(document["tests"], result.tests):
        wanted = settings.question_visibility.get(outcome.question, settings.test_visibility)
        test["visibility"] = max(outcome.visibility, wanted, key=VISIBILITY_ORDER.index)
    return document


def failure_document(why: str, seconds: float) -> dict:
    """results.json for a submission that could not be graded: score 0 and the reason."""
    return {"score": 0.0, "execution_time": round(seconds, 3), "output": f"Your submission was not graded: {why}.",
            "visibility": "visible", "stdout_visibility": "hidden", "tests": []}


def grade_for_gradescope(project_dir: Path, submission: Path) -> dict:
    """Grade `submission` (Gradescope's submission folder, or one notebook) with the project in
    `project_dir`; any failure becomes a failure document instead of an exception."""
    from gradelab.grading.supervisor import Grader
    from gradelab.project import Project

    started = time.monotonic()
    try:
        project = Project.load(project_dir)
        notebook = submitted_notebook(submission, project.config.assignment.notebook)
        with Grader(project) as grader:
            return results_document(grader.grade(notebook, notebook.stem), project.config)
    except NoNotebook as exc:
        return failure_document(str(exc), time.monotonic() - started)
    except Exception as exc:  # the autograder's own fault, reported to the student and the instructor alike
        return failure_document(f"the autograder failed ({type(exc).__name__}: {exc}); this is not a problem "
                                f"of your notebook: tell your instructor", time.monotonic() - started)


def write_results(document: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".part")
    temporary.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    temporary.replace(path)
