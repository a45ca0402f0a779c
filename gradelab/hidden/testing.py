"""The trusted side: a pytest plugin that runs the hidden tests against a sandboxed submission.

Hidden tests are plain pytest files (see `autograder/`). They reach the student's work only
through the `student` fixture, a proxy that sends requests to the sandbox and decodes the
replies as plain data (`wire.py`): numbers, strings, tensors rebuilt from raw bytes, model
descriptions. Nothing the student wrote runs in this process, and no method of a student object
is ever called here.

    @pytest.mark.question("q1_2", weight=2)
    def test_sigmoid_values(student, rng):
        x = torch.randn(50, generator=rng, dtype=torch.float64)
        got = student.call("my_sigmoid", x)
        assert_tensor_close(got, torch.sigmoid(x), "my_sigmoid(x)")
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import re
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Callable

import pytest
import torch
from _pytest.main import pytest_runtestloop as run_collected_tests  # pytest's own loop, run per runner

from gradelab.boundary import modelspec

from gradelab.boundary import wire
from gradelab.boundary.records import TestOutcome, TestStatus

ARTIFACT_NAME = re.compile(r"^[a-z0-9_]{1,80}_(student|reference)\.png$")

# ------------------------------------------------------------------ what a failing call tells the student


class StudentProblem(Exception):
    """A problem with the submission, with a message for the student."""

    status: TestStatus = "failed"


class NotAnswered(StudentProblem):
    status = "not_answered"


class StudentError(StudentProblem):
    """The student's code raised an exception when the hidden test called it."""


class StudentTimeout(StudentProblem):
    status = "timeout"


class SandboxLost(StudentProblem):
    status = "error"


# ------------------------------------------------------------------ the proxy


@dataclass
class SandboxLink:
    """The connection to the sandbox, which the supervisor can replace after a crash or timeout."""

    rpc: socket.socket
    control: socket.socket | None
    call_timeout: float
    restarts: int = 0
    student_seconds: float = 0.0  # time the sandbox reports spending in the student's code
    call_timeouts: int = 0  # requests given up at call_timeout
    lost: str | None = None  # why there is no sandbox to ask (then every request fails with this)

    def restart(self) -> None:
        """Ask the supervisor for a fresh sandbox (it re-executes the notebook) and take its socket."""
        if self.lost is None and self.control is None:
            self.lost = "the student's process stopped and cannot be restarted"
        if self.lost is not None:
            raise SandboxLost(self.lost)
        self.rpc.close()
        wire.send_msg(self.control, {"op": "restart"})
        reply = wire.recv_msg(self.control, timeout=None)
        if not reply.get("ok"):
            self.lost = str(reply.get("message", "the student's process could not be restarted"))
            raise SandboxLost(self.lost)
        _, fds, _, _ = socket.recv_fds(self.control, 16, 1)
        self.rpc = socket.socket(fileno=fds[0])
        self.restarts += 1

    def death_cause(self) -> str:
        """How the sandbox that just stopped answering ended, as the supervisor saw it: "exit
        status 0", "killed by SIGSEGV", "out of memory, limit 2048 MB", ..."""
        if self.control is None:
            return "no exit status known"
        wire.send_msg(self.control, {"op": "death"})
        reply = wire.recv_msg(self.control, timeout=None)
        why = reply.get("why") if isinstance(reply, dict) else None
        return why[:200] if isinstance(why, str) else "no exit status known"


class StudentProxy:
    """What a hidden test may ask of the submission. Every reply is plain, validated data."""

    def __init__(self, link: SandboxLink, seed: int):
        self._link = link
        self._seed = seed
        self._broken = False  # the current sandbox died or hung; restart before the next request
        # Names whose request hung or ended the process: they fail at once in later tests, with no
        # restart, so a broken function costs only the tests that use it, and restarts stay bounded
        # by the number of names the hidden tests ask for.
        self._remembered: dict[str | None, StudentProblem] = {}

    def _request(self, op: str, name: str | None = None, *, seed: int | None = None, **fields: Any) -> Any:
        if name in self._remembered:
            raise self._remembered[name]
        if self._broken or self._link.lost is not None:
            self._link.restart()
            self._broken = False
        message = {"op": op, "seed": self._seed if seed is None else seed, **fields}
        if name is not None:
            message["name"] = name
        try:
            wire.send_msg(self._link.rpc, message)
            reply = wire.recv_msg(self._link.rpc, timeout=self._link.call_timeout, max_bytes=256 << 20)
        except TimeoutError:
            self._link.student_seconds += self._link.call_timeout
            self._link.call_timeouts += 1
            problem: StudentProblem = StudentTimeout(f"{_subject(name)} did not return within "
                                                     f"{self._link.call_timeout:g} s")
            self._remember(name, StudentTimeout(f"{problem} in an earlier test"))
            raise problem from None
        except wire.WireError as exc:
            problem = StudentError(f"the reply about {_subject(name)} could not be read: {exc}")
            self._remember(name, problem)
            raise problem from None
        except (EOFError, OSError):
            cause = self._link.death_cause()
            ended = (f"{_subject(name)} ended the student's process when called" if op in CALL_OPS
                     else f"the student's process ended while the grader was reading {_subject(name)}")
            problem = StudentError(f"{ended} ({cause})")
            self._remember(name, problem)
            raise problem from None
        if not isinstance(reply, dict) or type(reply.get("ok")) is not bool:
            raise StudentError("the student's process sent a malformed reply")
        if type(reply.get("seconds")) is float:
            self._link.student_seconds += min(max(reply["seconds"], 0.0), self._link.call_timeout)
        if reply["ok"]:
            return reply.get("value")
        raise _problem_from(reply.get("error"), name, op)

    def _remember(self, name: str | None, later: StudentProblem) -> None:
        """The sandbox is unusable after a request for `name` hung or ended it: restart it before the
        next request, and fail later requests for `name` with `later` without asking again."""
        self._broken = True
        self._remembered[name] = later

    def kinds(self, *names: str) -> dict[str, str]:
        return self._request("kinds", names=list(names))

    def get(self, name: str) -> Any:
        return self._request("get", name)

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self._request("call", name, args=list(args), kwargs=kwargs)

    def call_grad(self, name: str, x: torch.Tensor) -> dict:
        """fn(x) with x tracking gradients: {"value", "grad", "tracks_grad"}."""
        reply = self._request("call_grad", name, args=[x])
        if (type(reply) is not dict or set(reply) != {"value", "grad", "tracks_grad"}
                or type(reply["tracks_grad"]) is not bool
                or reply["grad"] is not None and type(reply["grad"]) is not torch.Tensor):
            raise StudentError(f"the student's process sent a malformed reply about `{name}`")
        return reply

    def module(self, name: str, *args: Any, probe: torch.Tensor, seed: int | None = None,
               **kwargs: Any) -> tuple[torch.nn.Sequential, dict]:
        """Call a model-building function (torch seeded with `seed`); return the rebuilt model
        and its description."""
        described = self._request("module", name, args=list(args), kwargs=kwargs, probe=probe, seed=seed)
        return _rebuild(described, probe, name)

    def module_draws(self, name: str, *args: Any, seeds: list[int], **kwargs: Any) -> list[list[torch.Tensor]]:
        """Call a model-building function once per seed (torch seeded with it); the parameters of
        each model, in one round trip. For distributions: the architecture is judged by `module`."""
        draws = self._request("module_draws", name, args=list(args), kwargs=kwargs, seeds=list(seeds))
        if (type(draws) is not list or len(draws) != len(seeds)
                or not all(type(d) is list and all(type(t) is torch.Tensor for t in d) for d in draws)):
            raise StudentError(f"the models from `{name}` could not be read")
        return draws

    def redraw(self, cell: int, names: list[str], *, seeds: list[int]) -> list[list[Any]]:
        """Run the notebook's cell `cell` (an index from `executed_cells`) again once per seed,
        torch seeded with it, in a copy of the notebook's namespace; the values of `names` after
        each run. More draws of the values a cell makes at random; the notebook keeps its own."""
        draws = self._request("redraw", cell=cell, names=list(names), seeds=list(seeds))
        if (type(draws) is not list or len(draws) != len(seeds)
                or not all(type(d) is list and len(d) == len(names) for d in draws)):
            raise StudentError(f"the values of {', '.join(names)} from cell {cell} could not be read")
        return draws

    def model(self, name: str, *, probe: torch.Tensor) -> tuple[torch.nn.Sequential, dict]:
        """The model held in the notebook variable `name`, rebuilt here."""
        return _rebuild(self._request("describe", name, probe=probe), probe, name)

    def apply(self, name: str, model: torch.nn.Sequential, *args: Any, probe: torch.Tensor,
              mode: str = "apply") -> tuple[torch.nn.Sequential, dict]:
        """Let the student's `name` change a standard model: `model.apply(name(*args))` (mode
        "apply") or `name(model, *args)` (mode "call"). Returns the changed model, rebuilt here."""
        layers, state = describe_standard(model)
        described = self._request("apply", name, spec=layers, state=state, args=list(args), mode=mode, probe=probe)
        return _rebuild(described, probe, name)

    def call_on_model(self, name: str, model: torch.nn.Sequential, *args: Any) -> Any:
        layers, state = describe_standard(model)
        return self._request("call_on_model", name, spec=layers, state=state, args=list(args))


def describe_standard(model: torch.nn.Sequential) -> tuple[list[dict], list[torch.Tensor]]:
    """Architecture and parameters of a model made of standard layers, built on this side."""
    described = modelspec.describe_module(model, None)
    return described["layers"], described["state"]


def _rebuild(described: Any, probe: torch.Tensor, name: str) -> tuple[torch.nn.Sequential, dict]:
    try:
        return modelspec.rebuild(described, probe), described
    except modelspec.ModelSpecError as exc:
        raise StudentError(f"the model from `{name}` cannot be checked: {exc}") from None


# Requests that run one of the student's functions or classes (the others read a variable).
CALL_OPS = frozenset({"call", "call_grad", "module", "module_draws", "apply", "call_on_model"})
# What the student should know about an exception that is not an error in the usual sense.
_EXCEPTION_HINTS = {
    "SystemExit": "exit(), quit() and sys.exit() end a program: a graded function must return its result",
    "KeyboardInterrupt": "a graded function must not interrupt itself",
}


def _subject(name: str | None) -> str:
    return f"`{name}`" if name else "the notebook"


def _problem_from(error: Any, name: str | None, op: str = "call") -> StudentProblem:
    if not isinstance(error, dict):
        return StudentError("the student's process sent a malformed error")
    kind = str(error.get("type", "Error"))[:100]
    message = str(error.get("message", ""))[:1500]
    if error.get("missing"):
        return NotAnswered(f"`{message}` is not defined: the cell that defines it is not answered yet, "
                           f"failed to run, is missing, or the name was changed")
    if error.get("not_answered"):
        return NotAnswered(f"`{name}` is not answered yet (it raises {kind})")
    if kind == "ModelSpecError":
        return StudentError(f"`{name}`: {message}")
    if kind == "_NotCallable":  # the executor's own words about the value
        return StudentError(message)
    if kind == "WireError":
        return StudentError(f"{_subject(name)} {'returned' if op in CALL_OPS else 'holds'} a value the "
                            f"grader cannot receive: {message}")
    raised = f"{_subject(name)} raised {kind}" + (" when called" if op in CALL_OPS else "")
    hint = _EXCEPTION_HINTS.get(kind)
    return StudentError(raised + (f": {message}" if message else "") + (f" ({hint})" if hint else ""))


def seed_for_test(submission_seed: int, nodeid: str) -> int:
    """The `seed` fixture's value for the test `nodeid` (pytest's node id) of a submission."""
    digest = hashlib.sha256(f"{submission_seed}:{nodeid}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def seed_torch(seed: int) -> None:
    """`torch.manual_seed` for hidden tests, which build their models on the CPU: without the lazy
    CUDA/XPU/MTIA seeding, which records a stack trace per call (~1-2 ms deep inside pytest)."""
    torch.default_generator.manual_seed(seed)


# ------------------------------------------------------------------ assertions with student-readable messages


def expect_tensor(value: Any, what: str, *, shape: tuple[int, ...] | None = None,
                  floating: bool = False) -> torch.Tensor:
    """`value` if it is a plain tensor (of `shape`; floating-point if asked), else an AssertionError
    that says what `what` is instead: hidden tests check what they rely on before using it."""
    if type(value) is not torch.Tensor:
        raise AssertionError(f"{what} should be a torch.Tensor, got {wire.describe_value(value)}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise AssertionError(f"{what} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    if floating and not value.is_floating_point():
        raise AssertionError(f"{what} has dtype {value.dtype}, expected a floating-point tensor")
    return value


def expect_number(value: Any, what: str) -> float:
    """`value` (an int or a float, not a bool) as a float, else an AssertionError naming it."""
    if type(value) not in (int, float):
        raise AssertionError(f"{what} should be a number, got {wire.describe_value(value)}")
    try:
        return float(value)
    except OverflowError:
        raise AssertionError(f"{what} is an integer too large for a float ({value.bit_length()} bits)") from None


def assert_tensor_close(got: Any, expected: torch.Tensor, what: str, *, atol: float = 1e-6, rtol: float = 1e-5,
                        sample: torch.Tensor | None = None) -> None:
    """Compare here, on plain tensors; the message shows expected vs got on a few elements."""
    expect_tensor(got, what, shape=tuple(expected.shape), floating=True)
    got64, exp64 = got.to(torch.float64), expected.to(torch.float64)
    bad = ~torch.isclose(got64, exp64, atol=atol, rtol=rtol)
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        at = "" if sample is None else f" at input {sample.flatten()[i].item():.4g}"
        raise AssertionError(f"{what} is wrong for {int(bad.sum())} of {bad.numel()} values: "
                             f"e.g. expected {exp64.flatten()[i].item():.6g}, got {got64.flatten()[i].item():.6g}{at}")


# ------------------------------------------------------------------ the plugin


@dataclass
class GradingContext:
    """What the supervisor tells the test runner about the executed submission."""

    link: SandboxLink
    seed: int
    cells: list[dict]
    figures: list[dict]
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


Report = Callable[[dict], None]  # sends one message to the supervisor


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
    def figures(self) -> list[dict]:
        return self.ctx.figures

    @pytest.fixture
    def executed_cells(self) -> list[dict]:
        return self.ctx.cells

    @pytest.fixture
    def grading_config(self):
        return self.ctx.config

    @pytest.fixture
    def attach(self) -> Callable[[str, bytes], None]:
        """attach("q2_2_fig_sig_reference.png", png): a figure for the feedback pages."""
        def add(name: str, png: bytes) -> None:
            if ARTIFACT_NAME.match(name) and isinstance(png, bytes) and png.startswith(b"\x89PNG"):
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
        self.report({"op": "collected", "tests": [[c.name, c.question, c.max_score, c.visibility]
                                                  for c in self._items.values()]})

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
            self.report({"op": "outcome", "outcome": outcome.model_dump()})
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


# ------------------------------------------------------------------ the runner zygote


def serve_hidden_tests(tests_dir: str, template: GradingContext, jobs: socket.socket) -> int:
    """Main of the test-runner zygote: collect the hidden tests once, then for every job on
    `jobs` fork a runner that runs the collected tests against one submission.

    A job is a message {"seed", "cells", "figures", "call_timeout", "sandbox_lost"} followed by two file
    descriptors: the socket to the submission's sandbox and the socket to the supervisor, which
    receives the runner's messages ("collected", one "outcome" per test, then "done" or
    "failed") and answers its questions ("death": how the sandbox just ended; "restart": a new
    sandbox). The reply is {"ok": true} plus a pidfd of the runner, or {"ok": false, "message"}.

    Importing and collecting the tests costs more than most tests: here it is paid once per
    worker. Runners are forked from this process and sandboxes from the worker, so no student
    process ever holds the hidden tests or the reference in memory.
    """
    plugin = GradingPlugin(template)
    zygote = _RunnerZygote(plugin, jobs)
    # A zygote forked from a pytest process (the project's own tests) inherits its assertion
    # rewriting import hook: rewritten asserts would put hidden test source into messages.
    sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "AssertionRewritingHook"]
    # Only what grading needs: third-party plugins, pdb, output capture and the garbage-collecting
    # unraisable-exception hooks cost more than the tests themselves on a torch-sized heap.
    os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    unused = ("cacheprovider", "stepwise", "warnings", "debugging", "unraisableexception", "threadexception",
              "faulthandler", "pastebin", "junitxml", "doctest", "legacypath", "tmpdir", "capture", "logging")
    args = [tests_dir, "-q", "--assert=plain", "-o", "python_files=test_*.py",
            *[a for name in unused for a in ("-p", f"no:{name}")]]
    code = pytest.main(args, plugins=[plugin, zygote])
    if not zygote.served:  # collection failed before the first job: say so to every job
        zygote.refuse_all(f"the hidden tests could not be collected (pytest exit code {int(code)})")
    return 0


@dataclass
class _RunnerZygote:
    plugin: GradingPlugin
    jobs: socket.socket
    served: bool = False

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session) -> bool:
        if session.testsfailed:
            return False  # collection errors: pytest reports them, serve_hidden_tests refuses jobs
        self.served = True
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # finished runners are reaped by the kernel
        while (job := self._next_job()) is not None:
            message, fds = job
            go_read, go_write = os.pipe()
            pid = os.fork()
            if pid == 0:
                self.jobs.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                os.read(go_read, 1)  # not before the zygote holds a pidfd: an exited runner is reaped at once
                os._exit(self._run(session, message, fds))
            pidfd = os.pidfd_open(pid)
            os.write(go_write, b"g")
            for fd in (*fds, go_read, go_write):
                os.close(fd)
            wire.send_msg(self.jobs, {"ok": True})
            socket.send_fds(self.jobs, [b"p"], [pidfd])
            os.close(pidfd)
        return True

    def _next_job(self) -> tuple[dict, list[int]] | None:
        try:
            message = wire.recv_msg(self.jobs, timeout=None, max_bytes=512 << 20)
            _, fds, _, _ = socket.recv_fds(self.jobs, 16, 2)
        except (EOFError, OSError, wire.WireError):
            return None  # the worker is gone
        return (message, fds) if len(fds) == 2 else None

    def _run(self, session, message: dict, fds: list[int]) -> int:
        """In a forked runner: the collected tests against one submission."""
        rpc, control = (socket.socket(fileno=fd) for fd in fds)
        report: Report = lambda m: wire.send_msg(control, m)  # noqa: E731
        try:
            link = SandboxLink(rpc=rpc, control=control, call_timeout=float(message["call_timeout"]),
                               lost=message.get("sandbox_lost"))
            self.plugin.ctx = dataclasses.replace(self.plugin.ctx, link=link, seed=int(message["seed"]),
                                                  cells=message["cells"], figures=message["figures"])
            self.plugin.report = report
            self.plugin.announce()
            run_collected_tests(session)
            report({"op": "done", "student_seconds": link.student_seconds, "call_timeouts": link.call_timeouts,
                    "artifacts": self.plugin.artifacts})
            return 0
        except BaseException as exc:  # noqa: BLE001 - the supervisor must hear of any failure
            report({"op": "failed", "message": f"{type(exc).__name__}: {exc}"[:2000]})
            return 1

    def refuse_all(self, why: str) -> None:
        while (job := self._next_job()) is not None:
            for fd in job[1]:
                os.close(fd)
            wire.send_msg(self.jobs, {"ok": False, "message": why})


# ------------------------------------------------------------------ distributions, judged at a stated false-fail rate
#
# A test that judges random draws (the weights of freshly built models) fails a correct answer
# whenever its draws happen to look unusual. assert_distribution derives its thresholds from
# `alpha`: a sample truly drawn from the expected distribution fails with probability at most
# alpha, split evenly (Bonferroni) over the checks it makes. How many draws a test takes is then a
# question of power alone: enough for every wrong answer it must catch to fall outside the
# thresholds. bench/fairness.py measures both rates as the grader runs the tests.


@dataclass(frozen=True)
class Uniform:
    """The uniform distribution on [low, high]. Checked: the smallest and the largest value (inside
    the range, and near its ends), the mean and the spread."""

    low: float
    high: float

    @property
    def mean(self) -> float:
        return (self.low + self.high) / 2

    @property
    def std(self) -> float:
        return (self.high - self.low) / math.sqrt(12)

    def squared_deviation_moments(self) -> list[float]:
        """E[d^2], E[d^4], E[d^6], E[d^8] of d = x - mean."""
        half = (self.high - self.low) / 2
        return [half ** (2 * k) / (2 * k + 1) for k in range(1, 5)]

    def __str__(self) -> str:
        return f"uniformly from [{self.low:g}, {self.high:g}]"


@dataclass(frozen=True)
class Normal:
    """The normal distribution N(mean, std^2). Checked: the mean, the spread, and the share of
    values more than `tail` standard deviations from the mean, which tells it from a uniform
    distribution of the same spread (that has none beyond 1.73)."""

    mean: float
    std: float
    tail: float = 2.0

    def squared_deviation_moments(self) -> list[float]:
        return [self.std ** (2 * k) * double for k, double in enumerate((1, 3, 15, 105), start=1)]

    def __str__(self) -> str:
        return f"from a normal distribution N({self.mean:g}, {self.std:.3g}²)"


@dataclass(frozen=True)
class DistributionCheck:
    """A statistic of the sample and the interval that a sample from the expected distribution
    leaves with probability at most `rate`."""

    statistic: str  # smallest, largest, mean, spread (root mean square distance from the mean), tail
    low: float
    high: float
    rate: float


@functools.lru_cache(maxsize=64)
def distribution_checks(expected: Uniform | Normal, n: int, alpha: float = 1e-6) -> tuple[DistributionCheck, ...]:
    """The checks assert_distribution makes on `n` values, in order; their rates add up to alpha.

    smallest, largest: exact, P(no value within eps of an end) = (1 - eps)^n. mean: the normal
    distribution of the mean (exact for Normal; for Uniform the mean's tails are lighter). spread:
    the mean of the squared deviations, by its Cornish-Fisher expansion to second order (within a
    few percent of the rate for 100 values or more) at half the rate, which leaves a factor 2 for
    the expansion's error. tail: the exact binomial distribution of the count.
    """
    if n < 1:
        raise ValueError("a distribution check needs at least one value")
    statistics = (("smallest", "largest", "mean", "spread") if isinstance(expected, Uniform)
                  else ("mean", "spread", "tail"))
    rate = alpha / len(statistics)
    checks = []
    for statistic in statistics:
        if statistic in ("smallest", "largest"):
            reach = (1 - rate ** (1 / n)) * (expected.high - expected.low)
            low, high = ((expected.low, expected.low + reach) if statistic == "smallest"
                         else (expected.high - reach, expected.high))
        elif statistic == "mean":
            margin = NormalDist().inv_cdf(1 - rate / 2) * expected.std / math.sqrt(n)
            low, high = expected.mean - margin, expected.mean + margin
        elif statistic == "spread":
            low, high = _mean_interval(expected.squared_deviation_moments(), n, rate / 4)
            low, high = math.sqrt(max(low, 0.0)), math.sqrt(high)
        else:
            p = 2 * NormalDist().cdf(-expected.tail)
            fewest, most = _binomial_interval(n, p, rate / 2)
            low, high = fewest / n, most / n
        checks.append(DistributionCheck(statistic, low, high, rate))
    return tuple(checks)


def distribution_statistics(values: torch.Tensor, expected: Uniform | Normal) -> dict[str, float]:
    """The statistics that distribution_checks bounds, of a 1-d float64 tensor."""
    deviations = values - expected.mean
    found = {"smallest": float(values.min()), "largest": float(values.max()), "mean": float(values.mean()),
             "spread": float(deviations.square().mean().sqrt())}
    if isinstance(expected, Normal):
        found["tail"] = float((deviations.abs() > expected.tail * expected.std).to(torch.float64).mean())
    return found


def assert_distribution(values: Any, expected: Uniform | Normal, *, what: str, alpha: float = 1e-6,
                        hints: Mapping[str, str] | None = None) -> None:
    """Fail (AssertionError, for the student) unless `values` look drawn from `expected`. A sample
    that is drawn from it fails with probability at most `alpha`. `what` names the values in the
    plural ("build_model's weights"); `hints` adds advice to the message of a failed statistic
    (keys as in DistributionCheck.statistic)."""
    x = torch.as_tensor(values).detach().to(torch.float64).flatten()
    if x.numel() == 0:
        raise AssertionError(f"there are no {what} to check")
    if not bool(torch.isfinite(x).all()):
        raise AssertionError(f"{int((~torch.isfinite(x)).sum())} of {what} are not finite numbers")
    found = distribution_statistics(x, expected)
    for check in distribution_checks(expected, x.numel(), alpha):
        value = found[check.statistic]
        if not check.low <= value <= check.high:
            hint = (hints or {}).get(check.statistic)
            raise AssertionError(_distribution_problem(check, value, found, expected, what, x.numel())
                                 + (f": {hint}" if hint else ""))


def _distribution_problem(check: DistributionCheck, value: float, found: dict[str, float],
                          expected: Uniform | Normal, what: str, n: int) -> str:
    sample = f"{n} values drawn {expected}"
    if check.statistic in ("smallest", "largest") and not expected.low <= value <= expected.high:
        return (f"{what} range from {found['smallest']:.3f} to {found['largest']:.3f}; values drawn "
                f"{expected} never leave [{expected.low:g}, {expected.high:g}]")
    if check.statistic == "smallest":
        return (f"the smallest of {what} is {value:.3f}; {sample} have one below {check.high:.3f} "
                f"(all but once in {1 / check.rate:,.0f} samples)")
    if check.statistic == "largest":
        return (f"the largest of {what} is {value:.3f}; {sample} have one above {check.low:.3f} "
                f"(all but once in {1 / check.rate:,.0f} samples)")
    if check.statistic == "mean":
        return f"{what} average {value:.3f}; {sample} average between {check.low:.3f} and {check.high:.3f}"
    if check.statistic == "spread":
        return (f"the spread of {what} (their root mean square distance from {expected.mean:g}) is {value:.3f}; "
                f"for {sample} (standard deviation {expected.std:.3f}) it lies between {check.low:.3f} and "
                f"{check.high:.3f}")
    return (f"{value:.1%} of {what} lie more than {expected.tail:g} standard deviations from {expected.mean:g} "
            f"(beyond ±{expected.tail * expected.std:.3f}); of {sample}, between {check.low:.1%} and "
            f"{check.high:.1%} do")


def mean_quantile(moments: Sequence[float], n: int, z: float) -> float:
    """The quantile of the mean of n independent values with raw moments E[y], E[y^2], E[y^3],
    E[y^4] at standard-normal quantile z (its Cornish-Fisher expansion to second order)."""
    m1, m2, m3, m4 = moments
    k2 = m2 - m1**2
    k3 = m3 - 3 * m1 * m2 + 2 * m1**3
    k4 = m4 - 4 * m1 * m3 - 3 * m2**2 + 12 * m1**2 * m2 - 6 * m1**4
    skew, kurtosis = k3 / k2**1.5 / math.sqrt(n), k4 / k2**2 / n
    shifted = z + (z * z - 1) * skew / 6 + (z**3 - 3 * z) * kurtosis / 24 - (2 * z**3 - 5 * z) * skew**2 / 36
    return m1 + math.sqrt(k2 / n) * shifted


def _mean_interval(moments: Sequence[float], n: int, side_rate: float) -> tuple[float, float]:
    """Where the mean of n such values falls, except with probability side_rate on each side."""
    z = NormalDist().inv_cdf(1 - side_rate)
    return mean_quantile(moments, n, -z), mean_quantile(moments, n, z)


def _binomial_interval(n: int, p: float, side_rate: float) -> tuple[int, int]:
    """(fewest, most): a Binomial(n, p) count is below fewest, or above most, with probability at
    most side_rate each."""
    log_p, log_q = math.log(p), math.log1p(-p)
    pmf = [math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * log_p + (n - k) * log_q)
           for k in range(n + 1)]
    fewest, below = 0, 0.0
    while below + pmf[fewest] <= side_rate:
        below += pmf[fewest]
        fewest += 1
    most, above = n, 0.0
    while above + pmf[most] <= side_rate:
        above += pmf[most]
        most -= 1
    return fewest, most
