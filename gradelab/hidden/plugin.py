"""The pytest plugin that runs the hidden tests in a test runner: fixtures, hooks, verdicts."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from gradelab.boundary.figures import PNG_SIGNATURE, FigureData
from gradelab.boundary.messages import ARTIFACT_PATTERN, MAX_ARTIFACTS, CellReport, Collected, CollectedTest, Outcome, Record
from gradelab.boundary.records import TestOutcome, TestStatus
from gradelab.hidden.proxy import SandboxLink, StudentProblem, StudentProxy

ARTIFACT_NAME = re.compile(ARTIFACT_PATTERN)


def seed_for_test(submission_seed: int, nodeid: str) -> int:
    """The `seed` fixture's value for the test `nodeid` (pytest's node id) of a submission."""
    digest = hashlib.sha256(f"{submission_seed}:{nodeid}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@dataclass
class GradingContext:
    """What the supervisor tells the test runner about the executed submission."""

    link: SandboxLink
    seed: int
    cells: list[CellReport]
    figures: list[FigureData]
    reference: Any
    reference_data: dict
    question_points: dict[str, float]
    config: Any = None


@dataclass
class _Collected:
    name: str
    question: str
    weight: float
    visibility: str
    max_score: float = 0.0


Report = Callable[[Record], None]  # sends one message to the supervisor


@dataclass
class GradingPlugin:
    """Registered with `pytest.main(plugins=[...])` in the test-runner zygote, which collects the
    tests once; each runner forked from it sets `ctx` and `report` for its submission.

    Each verdict is reported the moment its test ends, so that a deadline that stops the runner
    loses only the tests that had not finished.
    """

    ctx: GradingContext
    report: Report | None = None  # set in each runner; the zygote collects without one
    artifacts: dict[str, bytes] = field(default_factory=dict)  # file name -> PNG, for feedback pages
    _items: dict[str, _Collected] = field(default_factory=dict)
    _proxy: StudentProxy | None = None
    _running: str = ""  # node id of the running test
    _setup_seconds: float = 0.0  # of the running test's setup phase

    # -- fixtures hidden tests use

    @pytest.fixture
    def student(self) -> StudentProxy:
        if self._proxy is None:
            self._proxy = StudentProxy(self.ctx.link, self.ctx.seed)
        return self._proxy

    @pytest.fixture
    def seed(self) -> int:
        """A per-submission, per-test seed: hidden inputs cannot be learned from feedback."""
        # From the running test's id, recorded by the setup hook: asking for pytest's `request`
        # fixture instead builds a fixture definition per test.
        return seed_for_test(self.ctx.seed, self._running)

    @pytest.fixture
    def rng(self, seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    @pytest.fixture
    def reference(self):
        return self.ctx.reference

    @pytest.fixture
    def reference_data(self) -> dict:
        return self.ctx.reference_data

    @pytest.fixture
    def figures(self) -> list[FigureData]:
        """The figures the notebook drew, validated; those that could not be read are left out."""
        return self.ctx.figures

    @pytest.fixture
    def executed_cells(self) -> list[CellReport]:
        """How each cell ran, in order, with its nbgrader grade_id and source."""
        return self.ctx.cells

    @pytest.fixture
    def grading_config(self):
        return self.ctx.config

    @pytest.fixture
    def attach(self) -> Callable[[str, bytes], None]:
        """attach("q2_2_fig_sig_reference.png", png): a figure for the feedback pages."""
        def add(name: str, png: bytes) -> None:
            if (ARTIFACT_NAME.match(name) and isinstance(png, bytes) and png.startswith(PNG_SIGNATURE)
                    and len(self.artifacts) < MAX_ARTIFACTS):
                self.artifacts[name] = png
        return add

    # -- hooks

    def pytest_configure(self, config) -> None:
        config.addinivalue_line("markers", "question(id, weight=1, visibility='visible'): the question a hidden test grades")

    def pytest_collection_modifyitems(self, items) -> None:
        for item in items:
            marker = item.get_closest_marker("question")
            if marker is None or not marker.args:
                raise pytest.UsageError(f"{item.nodeid}: every hidden test needs @pytest.mark.question(id)")
            # The verdict is recorded by this plugin; pytest's traceback rendering (source, locals)
            # is never shown and costs more than running the test.
            item.repr_failure = _plain_failure
            self._items[item.nodeid] = _Collected(
                name=_display_name(item), question=marker.args[0], weight=float(marker.kwargs.get("weight", 1.0)),
                visibility=marker.kwargs.get("visibility", "visible"))
        # A question's points are split over its tests by weight.
        weights: dict[str, float] = {}
        for c in self._items.values():
            weights[c.question] = weights.get(c.question, 0.0) + c.weight
        for c in self._items.values():
            c.max_score = self.ctx.question_points.get(c.question, 0.0) * c.weight / weights[c.question]

    def announce(self) -> None:
        """Tell the supervisor every test a run will report, so that a deadline scores the
        unfinished ones as such."""
        self.report(Collected(op="collected", tests=[
            CollectedTest(name=c.name, question=c.question, max_score=c.max_score, visibility=c.visibility)
            for c in self._items.values()]))

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item) -> None:
        self._running = item.nodeid

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = yield
        if report.when == "setup":  # the fixtures' work (e.g. reference models) is the test's own work
            self._setup_seconds = call.duration
        if report.when == "call" or (report.when == "setup" and report.failed):
            c = self._items[item.nodeid]
            status, output = "passed", ""
            if report.failed:
                status, output = _verdict(call.excinfo.value if call.excinfo else None)
            seconds = call.duration + (self._setup_seconds if report.when == "call" else 0.0)
            outcome = TestOutcome(name=c.name, question=c.question, max_score=c.max_score,
                                  score=c.max_score if status == "passed" else 0.0, status=status, output=output,
                                  visibility=c.visibility, duration=round(seconds, 4))
            self.report(Outcome(op="outcome", outcome=outcome))
        return report


def _plain_failure(excinfo, style=None) -> str:
    return f"{excinfo.typename}: {excinfo.value}"[:2000]


def _display_name(item) -> str:
    doc = (getattr(item.function, "__doc__", None) or "").strip().splitlines()
    name = doc[0] if doc else item.originalname.removeprefix("test_").replace("_", " ")
    callspec = getattr(item, "callspec", None)
    return f"{name} [{callspec.id}]" if callspec else name


def _verdict(exc: BaseException | None) -> tuple[TestStatus, str]:
    """Status and student-facing message; hidden test code and tracebacks are never shown."""
    if isinstance(exc, StudentProblem):
        return exc.status, str(exc)
    if isinstance(exc, AssertionError):
        return "failed", str(exc) or "the hidden test's check failed"
    if isinstance(exc, pytest.skip.Exception):
        return "skipped", str(exc)
    name = type(exc).__name__ if exc else "unknown"
    return "error", f"the grader could not check this answer ({name}); your instructor has the details"

