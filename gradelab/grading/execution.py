"""What running a submission's notebook left behind, as the supervisor records it: each cell's
outcome, the figures, the layers its sandboxes applied, and the ways a run can end early."""

from __future__ import annotations

from dataclasses import dataclass, field

from gradelab.boundary.figures import FigureData
from gradelab.boundary.messages import CellOutcome, FigureError
from gradelab.boundary.records import TestOutcome

MAX_KEPT_OUTPUT = 1 << 20  # characters of cell output kept per submission


@dataclass
class Execution:
    """What the sandbox reported while running the notebook."""

    cells: dict[int, CellOutcome] = field(default_factory=dict)
    figures: list[FigureData | FigureError] = field(default_factory=list)
    layers: dict[str, str] = field(default_factory=dict)  # the isolation layers the sandbox applied
    skipped: set[int] = field(default_factory=set)
    output_chars: int = 0  # of the cells' output kept so far (MAX_KEPT_OUTPUT)
    restarts: int = 0
    call_seconds: float = 0.0  # in the student's functions, called by the hidden tests
    cell_timeouts: int = 0  # cells stopped at the cell time limit, in every run of the notebook
    call_timeouts: int = 0  # calls from the hidden tests stopped at the call time limit
    artifacts: dict[str, bytes] = field(default_factory=dict)  # figures the hidden tests attached

    @property
    def student_seconds(self) -> float:
        """Time spent running the student's code: cells (as the sandbox timed them) and calls."""
        return sum(c.seconds for c in self.cells.values()) + self.call_seconds

    @property
    def figure_seconds(self) -> float:
        """Of `student_seconds`: rendering the figures at the end of their cells."""
        return sum(c.render_seconds for c in self.cells.values())

    def keep(self, cell: CellOutcome) -> None:
        """Record a cell's outcome, with its output while the submission's output budget lasts."""
        if self.output_chars + len(cell.output) > MAX_KEPT_OUTPUT:
            cell = cell.model_copy(update={"output": f"[output not kept: the notebook's cells printed more than "
                                                      f"{MAX_KEPT_OUTPUT} characters]"})
        else:
            self.output_chars += len(cell.output)
        self.cells[cell.index] = cell


@dataclass
class Stop:
    cell: int
    status: str
    seconds: float  # since the cell started, as the supervisor saw it
    why: str


class LayersNotApplied(Exception):
    """Under --require-sandbox, a layer the machine offers could not be applied to this box."""


class MalformedSubmission(Exception):
    """The sandbox sent something gradelab's own code in it never sends: the submission is rejected."""


class SubmissionTimeout(Exception):
    def __init__(self, message: str, outcomes: list[TestOutcome], execution: Execution):
        super().__init__(message)
        self.outcomes = outcomes
        self.execution = execution


def weakest(*layer_sets: dict[str, str]) -> dict[str, str]:
    """Per layer, the weakest state any of a submission's sandboxes had: a layer counts as applied
    ("available") only if every box that ran the student's code applied it."""
    merged: dict[str, str] = {}
    for layers in layer_sets:
        for name, state in layers.items():
            if merged.get(name, "available") == "available":
                merged[name] = state
    return merged
