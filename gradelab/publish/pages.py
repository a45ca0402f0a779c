"""What the HTML pages share: the template environment, embedded images, the question protocol.

Every page is one self-contained file: images are embedded as data URIs and no page carries a
script, so a page can be mailed or uploaded to an LMS as is. Jinja autoescaping is on and a
Content-Security-Policy forbids scripts, so a student's `<script>` in an answer or an output is
shown as text. The templates are `templates/*.html` beside this module.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from gradelab.boundary.figures import PNG_SIGNATURE
from gradelab.boundary.records import QuestionKind
from gradelab.project import FIGURES_DIR
from gradelab.publish.late import format_points

# Statuses that count as "did not pass"; a skipped test is neither passed nor failed.
NOT_PASSED = frozenset({"failed", "error", "timeout", "not_answered"})

TEMPLATES = Environment(
    loader=FileSystemLoader(Path(__file__).with_name("templates")),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
TEMPLATES.filters["points"] = format_points
TEMPLATES.filters["seconds"] = lambda value: f"{value:.1f} s"


class QuestionInfo(Protocol):
    """What the pages need of a question's configuration (`config.Question` fits)."""

    @property
    def id(self) -> str: ...
    @property
    def title(self) -> str: ...
    @property
    def kind(self) -> QuestionKind: ...
    @property
    def points(self) -> float: ...
    @property
    def manual_points(self) -> float: ...
    @property
    def rubric(self) -> str: ...


@dataclass(frozen=True)
class Panel:
    caption: str
    uri: str


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def png_uri(base: Path, relative: str) -> str | None:
    """The PNG at base/relative as a data URI; None if missing, not a PNG, or outside base."""
    path = (base / relative).resolve()
    if not path.is_relative_to(base.resolve()) or not path.is_file():
        return None
    data = path.read_bytes()
    return data_uri(data) if data.startswith(PNG_SIGNATURE) else None


def plot_panels(student_dir: Path, question_id: str, student_caption: str) -> list[Panel]:
    """Each of the student's figures of the question beside its reference, from the files the
    hidden tests attached: `<question>[_<figure>]_student.png` and `..._reference.png`."""
    panels = []
    for student_png in sorted((student_dir / FIGURES_DIR).glob(f"{question_id}*_student.png")):
        stem = student_png.name.removesuffix("_student.png")
        label = stem.removeprefix(question_id).strip("_")
        pair = [(f"{student_caption} {label}".strip(), png_uri(student_dir, f"{FIGURES_DIR}/{stem}_student.png")),
                (f"reference {label}".strip(), png_uri(student_dir, f"{FIGURES_DIR}/{stem}_reference.png"))]
        panels += [Panel(caption, uri) for caption, uri in pair if uri]
    return panels
