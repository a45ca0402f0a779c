"""`grading_config.yml`: the one file an instructor edits, as typed settings."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, NonNegativeFloat, ValidationError,
                      field_validator, model_validator)

from gradelab.errors import GradelabError
from gradelab.boundary.records import QuestionKind, Visibility

QUESTION_ID = re.compile(r"^q(\d+|b)_\d+$")
QUESTION_OF_GRADE_ID = re.compile(r"^(q(?:\d+|b)_\d+)_")
CONFIG_FILE = "grading_config.yml"


def question_of(grade_id: str) -> str | None:
    """The question a notebook cell belongs to: "q1_2_sigmoid" -> "q1_2"."""
    match = QUESTION_OF_GRADE_ID.match(grade_id + "_")
    return match.group(1) if match else None


class ConfigError(GradelabError, ValueError):
    """The configuration is missing or invalid; the message names the file and the field."""


class AssignmentInfo(BaseModel):
    id: str
    title: str
    notebook: str
    seed: int = 0


class Limits(BaseModel):
    """`limits:` of grading_config.yml: deadlines of the grader and the sandbox's resource limits, which
    the grader turns into the kernel-level gradelab.sandbox.launch.SandboxLimits."""

    cell_timeout: float = 30
    test_timeout: float = 30
    submission_timeout: float = 300
    memory_mb: int = 2048
    processes: int = 64
    open_files: int = 256
    file_size_mb: int = 16
    output_kb: int = Field(64, ge=0, le=1024)  # a cell's output kept; the sandbox's records hold at most 1 MiB
    # Memory the trusted processes that read student data (each grading worker, each test runner)
    # may map beyond what they hold at start; 0: unlimited.
    grader_memory_mb: int = Field(4096, ge=0)


class PlotSettings(BaseModel):
    image_tolerance: float = 12.0


def _not_a_number(value: object) -> object:
    # pydantic would read a number (or "3") as a Unix time; here a number means extra days.
    try:
        float(str(value))
    except (TypeError, ValueError):
        return value
    raise ValueError("a date is expected here, not a number")


DueDate = Annotated[datetime, BeforeValidator(_not_a_number)]


class LatePolicy(BaseModel):
    """The course's late rules. Unknown or out-of-range fields are rejected by name."""

    model_config = ConfigDict(extra="forbid")

    due: DueDate | None = None
    grace_minutes: float = Field(0, ge=0)
    penalty: Literal["none", "per_day", "zero"] = "none"
    per_day_fraction: float = Field(0.1, ge=0, le=1)  # of the max score, per started day after grace
    max_days: int | None = Field(None, ge=0)  # later than this many days: the score goes to zero
    # student id -> a new due date, or extra days on top of `due`
    extensions: dict[str, DueDate | NonNegativeFloat] = Field(default_factory=dict)


class LmsSettings(BaseModel):
    """How the assignment is called in the LMS."""

    model_config = ConfigDict(extra="forbid")

    assignment_title: str = Field(min_length=1)
    canvas_assignment_id: int | None = None
    moodle_identifier: Literal["email", "id_number"] = "email"
    blackboard_column: str | None = None  # default: the title (a new column)
    points_possible: float | None = Field(None, gt=0)


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


class GradescopeSettings(BaseModel):
    """When students see each hidden test's entry on Gradescope (its results.json `visibility`)."""

    model_config = ConfigDict(extra="forbid")

    test_visibility: Visibility = "visible"
    question_visibility: dict[str, Visibility] = Field(default_factory=dict)  # question id -> visibility


class ClusterSettings(BaseModel):
    """`cluster:`: grading on a Dask cluster (`gradelab grade --scheduler`, `gradelab worker`)."""

    model_config = ConfigDict(extra="forbid")

    retries: int = Field(1, ge=0)  # other workers a submission is retried on after its worker died
    worker_timeout: float = Field(600, gt=0)  # seconds the client waits with no worker ready to grade
    # TLS certificates (PEM files), relative to the project; the command-line options override them.
    tls_ca_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None


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
    gradescope: GradescopeSettings = Field(default_factory=GradescopeSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)

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

    @model_validator(mode="after")
    def _visibility_of_known_questions(self) -> "GradingConfig":
        if unknown := sorted(set(self.gradescope.question_visibility) - {q.id for q in self.questions}):
            raise ValueError(f"gradescope.question_visibility names questions that are not listed: {', '.join(unknown)}")
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
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; --project must name the assignment repository, "
                          f"the folder that holds {CONFIG_FILE}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    try:
        return GradingConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{path}: {problems}") from exc
