"""The messages between gradelab's processes: one typed record per message, validated where it arrives.

    sandbox S ──── control ──▶ supervisor   CellStart, CellEnd (a CellOutcome), Ready    untrusted
    runner T ───── RPC ──────▶ S            one request record per op (RPC_REQUEST)
    S ──────────── RPC ──────▶ T            RpcReply                                     untrusted
    supervisor ─── jobs ─────▶ zygote Z     RunnerJob (+ two sockets)  ◀── JobReply
    T ──────────── control ──▶ supervisor   Collected, Outcome, RestartRequest, DeathRequest, Done, Failed
    supervisor ─── control ──▶ T            RestartReply, DeathReply

Everything S sends is under the student's control (they can patch the sandbox's own code or write to
its sockets), so each record bounds what it holds: finite non-negative seconds, indices and counts in
range, strings of bounded length, a bounded number of figures and bytes. `receive` decodes a frame
(gradelab.boundary.wire) and validates it into one of the expected records, or raises
MalformedMessage; nothing downstream ever sees an unvalidated value from another process.
"""

from __future__ import annotations

import socket
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from gradelab.boundary import wire
from gradelab.boundary.figures import MAX_PNG_BYTES, FigureData
from gradelab.boundary.records import TestOutcome, Visibility

MAX_CELL_INDEX = 100_000
MAX_OUTPUT_CHARS = 1 << 20  # one cell's output as the sandbox keeps it (limits.output_kb is smaller)
MAX_FIGURES = 100  # per submission: the course's notebook draws about ten
MAX_FIGURE_BYTES = 64 << 20  # PNG bytes of all of a submission's figures together
MAX_ARTIFACTS = 100  # figures the hidden tests attach to one submission
MAX_SEEDS = 1000  # draws per module_draws or redraw request
MAX_NAME_CHARS = 200
MAX_MESSAGE_CHARS = 4000
MAX_TRACEBACK_CHARS = 8000

Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0, le=1 << 31)]
Seed = Annotated[int, Field(ge=0, lt=1 << 63)]
CellIndex = Annotated[int, Field(ge=0, le=MAX_CELL_INDEX)]
Name = Annotated[str, Field(max_length=MAX_NAME_CHARS)]
Text = Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)]
Names = Annotated[list[Name], Field(max_length=1000)]
Seeds = Annotated[list[Seed], Field(max_length=MAX_SEEDS)]


class MalformedMessage(ValueError):
    """A process sent something that is not one of the records it may send."""


class Record(BaseModel):
    # Strict: nothing is coerced ("1" is not a cell number), unknown fields are refused.
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, arbitrary_types_allowed=True)

    def to_wire(self) -> dict:
        """The record as plain data for `wire.send_msg` (tensors and arrays stay as they are)."""
        return self.model_dump()


# ---------------------------------------------------------------- S → supervisor: running the notebook


class CellError(Record):
    type: Name
    message: Text
    traceback: Annotated[str, Field(max_length=MAX_TRACEBACK_CHARS)] = ""
    not_answered: bool = False


class CellOutcome(Record):
    """How one cell ran. The sandbox reports ok/error/timeout/refused; the supervisor records
    "crashed" (and a stop at the time limit) for a cell during which the process died or hung,
    and "not_run" for a cell no sandbox ran (a public check, a skipped demonstration, a cell after
    the submission's time ran out)."""

    index: CellIndex
    status: Literal["ok", "error", "timeout", "refused", "crashed", "not_run"]
    output: Annotated[str, Field(max_length=MAX_OUTPUT_CHARS + 200)] = ""
    seconds: Seconds = 0.0  # including render_seconds
    render_seconds: Seconds = 0.0  # drawing the cell's figures, as Jupyter's inline backend does
    error: CellError | None = None


class CellStart(Record):
    event: Literal["cell_start"]
    index: CellIndex


class CellEnd(Record):
    event: Literal["cell_end"]
    cell: CellOutcome


class FigureError(Record):
    """A figure the sandbox could not capture or send, and why."""

    cell: CellIndex
    index: Count
    error: Text
    names: Names = []


def _figure(capture: object) -> object:
    """A capture that does not validate as FigureData is kept as a FigureError for its cell, so
    that one unreadable figure costs that figure only; one without a cell number is malformed."""
    if not isinstance(capture, dict) or "error" in capture:
        return capture
    try:
        return FigureData.from_capture(capture)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return FigureError.model_validate({"cell": capture.get("cell"), "index": capture.get("index"),
                                           "error": f"the figure's data could not be read ({where}: {first['msg']})"[:500]})


Figure = Annotated[Union[FigureData, FigureError], BeforeValidator(_figure)]


class Ready(Record):
    """Every cell has run: the figures the notebook drew, in order."""

    event: Literal["ready"]
    figures: Annotated[list[Figure], Field(max_length=MAX_FIGURES)]

    @model_validator(mode="after")
    def _bounded_bytes(self) -> Ready:
        total = sum(len(f.png) for f in self.figures if isinstance(f, FigureData))
        if total > MAX_FIGURE_BYTES:
            raise ValueError(f"the figures hold {total} bytes of images, more than {MAX_FIGURE_BYTES}")
        return self


SANDBOX_EVENT = TypeAdapter(Annotated[Union[CellStart, CellEnd, Ready], Field(discriminator="event")])
# A frame on the control socket: a cell's output (JSON escapes a character in at most 12 bytes),
# its error, or the figures.
MAX_EVENT_BYTES = 12 * MAX_OUTPUT_CHARS + (1 << 20)
MAX_READY_BYTES = MAX_FIGURE_BYTES + (16 << 20)


# ---------------------------------------------------------------- T → S: requests, and S's replies


class _Request(Record):
    seed: Seed


class _Named(_Request):
    name: Name


class _Called(_Named):
    args: Annotated[list[Any], Field(max_length=64)] = []
    kwargs: Annotated[dict[Name, Any], Field(max_length=64)] = {}


class KindsRequest(_Request):
    """What each name is in the notebook: missing, function, class, module, tensor, or a type's name."""

    op: Literal["kinds"]
    names: Names


class GetRequest(_Named):
    op: Literal["get"]


class CallRequest(_Called):
    op: Literal["call"]


class CallGradRequest(_Called):
    """fn(x) with x tracking gradients: {"value", "grad", "tracks_grad"}."""

    op: Literal["call_grad"]


class DescribeRequest(_Named):
    """The model held in a variable, described (modelspec.describe_module) on `probe`."""

    op: Literal["describe"]
    probe: Any = None


class ModuleRequest(_Called):
    """Call a model-building function; describe the model it returns."""

    op: Literal["module"]
    probe: Any = None


class ModuleDrawsRequest(_Called):
    """Call a model-building function once per seed; each model's parameters."""

    op: Literal["module_draws"]
    seeds: Seeds


class RedrawRequest(_Request):
    """Run cell `cell` again once per seed, in a copy of the namespace; the values of `names`."""

    op: Literal["redraw"]
    cell: CellIndex
    names: Names
    seeds: Seeds


class ApplyRequest(_Called):
    """Let the student's callable change a standard model built from `spec` and `state`."""

    op: Literal["apply"]
    spec: list[Any]
    state: list[Any] | None = None
    mode: Literal["apply", "call"] = "apply"
    probe: Any = None


class CallOnModelRequest(_Called):
    """fn(model, *args) on a standard model built from `spec` and `state`."""

    op: Literal["call_on_model"]
    spec: list[Any]
    state: list[Any] | None = None


RpcRequest = Union[KindsRequest, GetRequest, CallRequest, CallGradRequest, DescribeRequest, ModuleRequest,
                   ModuleDrawsRequest, RedrawRequest, ApplyRequest, CallOnModelRequest]
RPC_REQUEST = TypeAdapter(Annotated[RpcRequest, Field(discriminator="op")])
# Requests that run one of the student's functions or classes (the others read a variable or rerun a cell).
CALL_OPS = frozenset({"call", "call_grad", "module", "module_draws", "apply", "call_on_model"})


class RpcError(Record):
    """Why a request failed. `missing`: the name is not defined; `not_answered`: the answer still
    raises the template's NotImplementedError."""

    type: Name
    message: Text
    traceback: Annotated[str, Field(max_length=MAX_TRACEBACK_CHARS)] = ""
    missing: bool = False
    not_answered: bool = False


class RpcReply(Record):
    ok: bool
    value: Any = None
    seconds: Seconds = 0.0  # in the student's code
    error: RpcError | None = None

    @model_validator(mode="after")
    def _error_iff_failed(self) -> RpcReply:
        if self.ok == (self.error is not None):
            raise ValueError("a reply has an error exactly when it is not ok")
        return self


RPC_REPLY = TypeAdapter(RpcReply)
MAX_REPLY_BYTES = wire.MAX_BYTES


# ---------------------------------------------------------------- supervisor → zygote: a submission's job


class CellReport(CellOutcome):
    """A code cell as the hidden tests see it (`executed_cells`: every code cell of the notebook,
    in order): how it ran, with its nbgrader id and its source, both from the submission file
    (read by the supervisor, not reported by S, which cannot hide a cell from a source check)."""

    grade_id: str | None = None
    source: str = ""


class RunnerJob(Record):
    """What the test runner is told of an executed submission; `sandbox_lost` says why no
    sandbox answers (then every request fails with it)."""

    seed: Seed
    cells: list[CellReport]
    figures: list[FigureData]
    call_timeout: Seconds
    sandbox_lost: Text | None = None
    memory_mb: Count = 0  # address space the runner may add to what it holds when forked (0: no limit)


class JobReply(Record):
    """The zygote's answer to a job: a runner was forked (a pidfd of it follows), or why not."""

    ok: bool
    message: Text = ""


# ---------------------------------------------------------------- T → supervisor, and the replies


class CollectedTest(Record):
    name: Text
    question: Name
    max_score: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    visibility: Visibility


class Collected(Record):
    """Every test this run will report, before the first runs."""

    op: Literal["collected"]
    tests: list[CollectedTest]


class Outcome(Record):
    op: Literal["outcome"]
    outcome: TestOutcome


class RestartRequest(Record):
    """Run the notebook again in a fresh sandbox and send its RPC socket."""

    op: Literal["restart"]


class DeathRequest(Record):
    """Say how the sandbox that stopped answering ended."""

    op: Literal["death"]


ARTIFACT_PATTERN = r"^[a-z0-9_]{1,80}_(student|reference)\.png$"  # a figure a hidden test attaches
ArtifactName = Annotated[str, Field(pattern=ARTIFACT_PATTERN)]


class Done(Record):
    op: Literal["done"]
    student_seconds: Seconds  # in the student's functions, called by the hidden tests
    call_timeouts: Count
    artifacts: Annotated[dict[ArtifactName, Annotated[bytes, Field(max_length=MAX_PNG_BYTES)]],
                         Field(max_length=MAX_ARTIFACTS)] = {}
    malformed: Text | None = None  # the first sandbox reply that was not one gradelab's code sends


class Failed(Record):
    op: Literal["failed"]
    message: Text


RUNNER_EVENT = TypeAdapter(Annotated[Union[Collected, Outcome, RestartRequest, DeathRequest, Done, Failed],
                                     Field(discriminator="op")])


class RestartReply(Record):
    ok: bool
    message: Text = ""


class DeathReply(Record):
    why: Text


# ---------------------------------------------------------------- sending and receiving


def send(sock: socket.socket, record: Record) -> None:
    wire.send_msg(sock, record.to_wire())


def receive(sock: socket.socket, expected: TypeAdapter | type[Record], *, timeout: float | None,
            max_bytes: int = wire.MAX_BYTES):
    """Receive one frame and validate it as `expected` (a record class or an adapter of a union).

    Raises MalformedMessage for a frame that is not wire data or not such a record; EOFError,
    TimeoutError and OSError as `wire.recv_msg` does."""
    try:
        value = wire.recv_msg(sock, timeout=timeout, max_bytes=max_bytes)
    except EOFError:  # also a frame cut short: the sender ended, it did not send bad data
        raise
    except wire.WireError as exc:
        raise MalformedMessage(str(exc)) from None
    return validate(value, expected)


def validate(value: object, expected: TypeAdapter | type[Record]):
    """`value` (decoded wire data) as the record `expected`, or MalformedMessage naming the first problem."""
    try:
        if isinstance(expected, TypeAdapter):
            return expected.validate_python(value)
        return expected.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        raise MalformedMessage(f"{where}: {first['msg']}"[:500]) from None
