"""Review sheets for manually graded answers: a page per question (every answer with the rubric)
and a CSV to fill in, read back as manual scores."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from gradelab.errors import GradelabError
from gradelab.boundary.records import SubmissionResult
from gradelab.publish.csvfiles import read_records, spreadsheet_text
from gradelab.publish.late import format_points
from gradelab.publish.pages import TEMPLATES, QuestionInfo

REVIEW_COLUMNS = ("student_id", "question_id", "max_points", "points", "comment")


class ManualScore(BaseModel):
    """One manually graded answer, as read back from a review sheet."""

    model_config = ConfigDict(extra="forbid")

    student_id: str = Field(min_length=1)
    question_id: str = Field(min_length=1)
    points: float = Field(ge=0)
    comment: str = ""


class ReviewSheetError(GradelabError, ValueError):
    """A review sheet cannot be read; the message names the file and the row."""


def _sheet_rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(spreadsheet row number, row) of a review sheet's non-blank rows, header checked."""
    records = read_records(path, ReviewSheetError)
    header = [name.strip() for name in (records[0] if records else [])]
    missing = [name for name in REVIEW_COLUMNS if name not in header]
    if missing:
        raise ReviewSheetError(f"{path}: missing column(s) {', '.join(missing)}; expected {','.join(REVIEW_COLUMNS)}")
    for number, record in enumerate(records[1:], start=2):  # the header is row 1
        if any(cell.strip() for cell in record):
            yield number, dict(zip(header, record + [""] * (len(header) - len(record))))


def _number(text: str, where: str, column: str) -> float:
    try:
        value = float(text.strip().replace(",", "."))  # a decimal comma, as some spreadsheets write it
    except ValueError:
        raise ReviewSheetError(f"{where}: {column} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ReviewSheetError(f"{where}: {column} {text!r} is not a number")
    return value


def read_review_sheet(path: Path) -> list[ManualScore]:
    """The graded rows of a review sheet; rows with blank points are not graded yet and skipped."""
    scores: list[ManualScore] = []
    seen: set[tuple[str, str]] = set()
    for number, row in _sheet_rows(path):
        student_id, question_id, points_text = (row[c].strip() for c in ("student_id", "question_id", "points"))
        where = f"{path}, row {number} (student {student_id!r})"
        if not points_text:
            continue
        if not student_id or not question_id:
            raise ReviewSheetError(f"{where}: student_id and question_id must not be blank")
        if (student_id, question_id) in seen:
            raise ReviewSheetError(f"{where}: {question_id} of {student_id} is graded twice")
        seen.add((student_id, question_id))
        max_points = _number(row["max_points"], where, "max_points")
        points = _number(points_text, where, "points")
        if not 0 <= points <= max_points:
            raise ReviewSheetError(f"{where}: points {points_text} are outside [0, {format_points(max_points)}]")
        scores.append(ManualScore(student_id=student_id, question_id=question_id, points=points,
                                  comment=row["comment"]))
    return scores


def write_review_sheet(results: Sequence[SubmissionResult], questions: Sequence[QuestionInfo], *,
                       answers: Mapping[str, Mapping[str, str]], out_dir: Path) -> list[Path]:
    """For each question with manual points, `review_<qid>.html` (answers + rubric) and the
    sheet `review_<qid>.csv` to fill in. `answers` maps student id -> question id -> answer text.
    Points and comments already entered in an existing sheet are kept."""
    out_dir.mkdir(parents=True, exist_ok=True)
    student_ids = sorted({r.student_id for r in results})
    written: list[Path] = []
    for question in (q for q in questions if q.manual_points > 0):
        page, sheet = out_dir / f"review_{question.id}.html", out_dir / f"review_{question.id}.csv"
        entered = ({row["student_id"].strip(): (row["points"], row["comment"]) for _, row in _sheet_rows(sheet)}
                   if sheet.exists() else {})
        texts = [(sid, answers.get(sid, {}).get(question.id, "")) for sid in student_ids]
        page.write_text(TEMPLATES.get_template("review.html").render(question=question, answers=texts,
                                                                     csv_name=sheet.name),
                        encoding="utf-8")
        # utf-8-sig: Excel reads a file without a BOM as the local code page and mangles "Ø".
        with sheet.open("w", encoding="utf-8-sig", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(REVIEW_COLUMNS)
            for sid in student_ids:
                points, comment = entered.get(sid, ("", ""))
                row = [sid, question.id, format_points(question.manual_points), points, comment]
                writer.writerow([spreadsheet_text(cell) for cell in row])
        written += [page, sheet]
    return written
