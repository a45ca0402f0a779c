"""Where things are: the paths of an assignment repository and of a `gradelab grade --out` folder.

The one owner of those paths, of the content hash that identifies a submission file, of the seed
derived from it, and of the loader of the extracted reference module. Imported by the release,
the grading worker, the test-runner zygote and publish alike, so it imports neither torch nor
sandbox code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from gradelab.config import CONFIG_FILE, GradingConfig, load_config

REFERENCE_MODULE = "reference_solutions"  # solutions/reference_solutions.py, extracted by the release
REFERENCE_DATA_FILE = "reference_data.json"

# A `gradelab grade --out` folder (ResultsDir) and each student's folder in it.
GRADEBOOK_FILE = "gradebook.sqlite"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"  # the instructor report, and its screenshot report.png
REVIEW_DIR = "review"
RESULTS_FILE = "results.json"  # Gradescope's format
SUBMISSION_FILE = "submission.json"  # the whole SubmissionResult
FIGURES_DIR = "figures"  # the notebook's figures; the plot checks' <question>[_<figure>]_{student,reference}.png
FEEDBACK_FILE = "feedback.html"


@dataclass(frozen=True)
class Project:
    """Where an assignment's sources and release artefacts live (see README, "Layout")."""

    root: Path
    config: GradingConfig

    @classmethod
    def load(cls, root: Path) -> "Project":
        root = Path(root).resolve()
        return cls(root=root, config=load_config(root / CONFIG_FILE))

    # -------------------------------------------------------------- authored: source/

    @property
    def source_dir(self) -> Path:
        """The instructor notebook and the helper files handed out with it."""
        return self.root / "source" / self.config.assignment.id

    @property
    def source_notebook(self) -> Path:
        return self.source_dir / self.config.assignment.notebook

    @property
    def hidden_tests_source(self) -> Path:
        return self.root / "source" / "hidden_tests"

    # -------------------------------------------------------------- written by the release

    @property
    def release_dir(self) -> Path:
        return self.root / "release" / self.config.assignment.id

    @property
    def release_notebook(self) -> Path:
        return self.release_dir / self.config.assignment.notebook

    @property
    def solutions_dir(self) -> Path:
        return self.root / "solutions"

    @property
    def reference_file(self) -> Path:
        return self.solutions_dir / f"{REFERENCE_MODULE}.py"

    @property
    def reference_data_file(self) -> Path:
        return self.solutions_dir / REFERENCE_DATA_FILE

    @property
    def autograder_dir(self) -> Path:
        return self.root / "autograder"

    @property
    def tests_dir(self) -> Path:
        """The hidden tests as graded: the release's copy of source/hidden_tests."""
        return self.autograder_dir / "tests"

    @property
    def gradescope_zip(self) -> Path:
        return self.autograder_dir / "gradescope_autograder.zip"

    def release_outputs(self) -> tuple[Path, Path, Path]:
        """The folders a release rewrites from scratch."""
        return self.release_dir, self.solutions_dir, self.autograder_dir

    def secret_paths(self) -> list[Path]:
        """What the sandbox must never see."""
        return [p for p in (self.autograder_dir, self.solutions_dir, self.root / "source",
                            self.root / CONFIG_FILE) if p.exists()]


@dataclass(frozen=True)
class ResultsDir:
    """The layout of a `gradelab grade --out` folder: the gradebook, the batch summary, the review
    sheets, the instructor report, and per student `<student>/results.json`, `submission.json`, `figures/`, `feedback.html`."""

    path: Path

    @property
    def gradebook(self) -> Path:
        return self.path / GRADEBOOK_FILE

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def review(self) -> Path:
        return self.path / REVIEW_DIR

    @property
    def report(self) -> Path:
        return self.path / REPORT_FILE

    @property
    def report_png(self) -> Path:
        return self.report.with_suffix(".png")

    def student(self, student_id: str) -> Path:
        return self.path / student_id

    def submission_files(self) -> list[Path]:
        """Every student's submission.json, in name order."""
        return sorted(self.path.glob(f"*/{SUBMISSION_FILE}"))


def file_hash(path: Path) -> str:
    """The content hash that identifies a submission file (gradebook, seed); "" hashes a missing file."""
    path = Path(path)
    return hashlib.sha256(path.read_bytes() if path.is_file() else b"").hexdigest()


def submission_seed(base: int, content_hash: str) -> int:
    """Same file, same seed: grading is deterministic; another file gets other hidden inputs."""
    return int.from_bytes(hashlib.sha256(f"{base}:{content_hash}".encode()).digest()[:4], "little")


def load_reference(solutions_dir: Path):
    """Import the extracted reference module (and the helpers beside it, which it imports).

    Registered in sys.modules before it runs, as an import would, so its dataclasses and pickling
    find it by name."""
    solutions_dir = Path(solutions_dir)
    if str(solutions_dir) not in sys.path:
        sys.path.insert(0, str(solutions_dir))
    spec = importlib.util.spec_from_file_location(REFERENCE_MODULE, solutions_dir / f"{REFERENCE_MODULE}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[REFERENCE_MODULE] = module
    spec.loader.exec_module(module)
    return module
