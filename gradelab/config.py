"""`grading_config.yml`: the one file an instructor edits, as typed settings."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from gradelab.exports import LmsSettings
from gradelab.late import LatePolicy
from gradelab.models import QuestionKind

QUESTION_ID = re.compile(r"^q(\d+|b)_\d+$")
QUESTION_OF_GRADE_ID = re.compile(r"^(q(?:\d+|b)_\d+)_")
CONFIG_FILE = "grading_config.yml"


def question_of(grade_id: str) -> str | None:
    """The question a notebook cell belongs to: "q1_2_sigmoid" -> "q1_2"."""
    match = QUESTION_OF_GRADE_ID.match(grade_id + "_")
    return match.group(1) if match else None


class ConfigError(ValueError):
    """The configuration is invalid; the message names the file and the field."""


class AssignmentInfo(BaseModel):
    id: str
    title: str
    notebook: str
    seed: int = 0


class Limits(BaseModel):
    """Resource limits of one submission's sandbox and deadlines of the grader."""

    cell_timeout: float = 30
    test_timeout: float = 30
    submission_timeout: float = 300
    memory_mb: int = 2048
    processes: int = 64
    open_files: int = 256
    file_size_mb: int = 16
    output_kb: int = 64


class PlotSettings(BaseModel):
    image_tolerance: float = 12.0


class Question(BaseModel):
    """A question: `points` are graded by hidden tests, `manual_points` by a person."""

    id: str
    title: str
    kind: QuestionKind
    points: float = 0
    manual_points: float = 0
    bonus: bool = False
    rubric: str = ""

    @field_validator("id")
    @classmethod
    def _id_format(cls, value: str) -> str:
        if not QUESTION_ID.match(value):
            raise ValueError(f"question id {value!r} must look like q1_2 (or qb_1 for a bonus)")
        return value

    @model_validator(mode="after")
    def _points_match_kind(self) -> "Question":
        if self.kind == "manual" and self.points:
            raise ValueError(f"{self.id}: a manual question has manual_points only")
        if self.kind != "manual" and not self.points:
            raise ValueError(f"{self.id}: an {self.kind} question needs points for its hidden tests")
        return self

    @property
    def total(self) -> float:
        return self.points + self.manual_points


class GradingConfig(BaseModel):
    assignment: AssignmentInfo
    limits: Limits = Field(default_factory=Limits)
    plots: PlotSettings = Field(default_factory=PlotSettings)
    due: datetime | None = None
    late_policy: LatePolicy = Field(default_factory=LatePolicy)
    lms: LmsSettings
    questions: list[Question]
    # grade_ids of locked demonstration cells the grader does not run: their work is redone by the
    # hidden tests (e.g. training the student's XOR model), so running them only costs time.
    skip_when_grading: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _due_into_policy(cls, data: dict) -> dict:
        # The due date sits at the top of the file for instructors; the late policy needs it.
        if isinstance(data, dict) and data.get("due") is not None:
            policy = dict(data.get("late_policy") or {})
            policy.setdefault("due", data["due"])
            data = {**data, "late_policy": policy}
        return data

    @model_validator(mode="after")
    def _unique_ids(self) -> "GradingConfig":
        seen: set[str] = set()
        for q in self.questions:
            if q.id in seen:
                raise ValueError(f"question {q.id} is listed twice")
            seen.add(q.id)
        return self

    def question(self, question_id: str) -> Question:
        for q in self.questions:
            if q.id == question_id:
                return q
        raise KeyError(question_id)

    @property
    def max_score(self) -> float:
        """Bonus questions add to a student's score but not to the maximum."""
        return sum(q.total for q in self.questions if not q.bonus)


def load_config(path: Path) -> GradingConfig:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    try:
        return GradingConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{path}: {problems}") from exc
