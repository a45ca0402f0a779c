"""The test-session client: the worker's side of the conversation with the hidden tests.

    worker ── fork, once → test-runner zygote Z: pytest, the reference, the hidden tests collected
                └─ fork → test runner T per submission (gradelab.hidden.runner)

The worker hands T a submission's job (the executed cells, the figures, the sandbox's RPC
socket) and then reads T's messages: the tests collected, one verdict per test, requests for a
fresh sandbox, the end (the records of gradelab.boundary.messages). The supervisor (supervisor.py) owns the sandboxes and the deadline's
meaning; this module only carries the conversation.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Callable

from gradelab.boundary import messages
from gradelab.boundary.figures import FigureData
from gradelab.boundary.messages import (CellOutcome, CellReport, Collected, DeathReply, DeathRequest, Done, Failed,
                                        JobReply, Outcome, RestartRequest, RunnerJob)
from gradelab.boundary.records import TestOutcome
from gradelab.grading.submission import Submission
from gradelab.hidden.plugin import GradingContext
from gradelab.hidden.runner import serve_hidden_tests
from gradelab.project import load_reference


@dataclass
class SessionEnd:
    """What T reported at the end of a submission's tests."""

    outcomes: list[TestOutcome]
    done: Done  # the calls' time and timeouts, the figures the tests attached, a malformed reply


class SessionTimeout(Exception):
    """The deadline passed during the tests: `outcomes` holds every collected test, each with its
    verdict where one arrived and "not finished" otherwise."""

    def __init__(self, outcomes: list[TestOutcome]):
        super().__init__("the tests did not finish before the deadline")
        self.outcomes = outcomes


def runner_job(seed: int, cells: dict[int, CellOutcome], figures: list[FigureData], submission: Submission, *,
               call_timeout: float, sandbox_lost: str | None, memory_mb: int) -> RunnerJob:
    """What T is told of an executed submission: every code cell of the file (its nbgrader id and
    source, and how it ran), the figures, the seed, the time limit of a call; `sandbox_lost` says
    why no sandbox answers."""
    reports = [CellReport(**dict(cells.get(c.index) or CellOutcome(index=c.index, status="not_run")),
                          grade_id=c.grade_id, source=c.source)
               for c in submission.cells]
    return RunnerJob(seed=seed, cells=reports, figures=figures, call_timeout=call_timeout,
                     sandbox_lost=sandbox_lost, memory_mb=memory_mb)


def run_tests(runners: "TestRunners", job: RunnerJob, rpc: socket.socket | None, deadline: float, *,
              restart: Callable[[socket.socket], None], death_cause: Callable[[], str]) -> SessionEnd:
    """Run the hidden tests on one submission in a fresh T, until T is done or `deadline`.

    `rpc` is the sandbox's end for T (None: no sandbox, every request fails at once with the
    job's `sandbox_lost`). T may ask for a fresh sandbox (`restart` answers on the control
    socket) and how the last one ended (`death_cause`)."""
    control_parent, control_runner = socket.socketpair()
    dead_end = None
    if rpc is None:
        rpc, dead = socket.socketpair()
        dead.close()
        dead_end = rpc
    try:
        runner = runners.start(job, rpc, control_runner)
    finally:
        control_runner.close()
        if dead_end is not None:
            dead_end.close()
    collected: list[TestOutcome] = []  # every test, as "not finished" until its verdict arrives
    verdicts: dict[tuple[str, str], TestOutcome] = {}
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SessionTimeout(_merge(collected, verdicts))
            try:
                event = messages.receive(control_parent, messages.RUNNER_EVENT, timeout=remaining, max_bytes=64 << 20)
            except TimeoutError:
                continue
            except (EOFError, OSError):
                raise RuntimeError("the test runner stopped unexpectedly") from None
            except messages.MalformedMessage as exc:
                raise RuntimeError(f"the test runner sent malformed data ({exc})") from None
            if isinstance(event, Collected):
                collected = [TestOutcome(name=t.name, question=t.question, score=0.0, max_score=t.max_score,
                                         status="timeout", visibility=t.visibility,
                                         output="not finished before the submission's time limit")
                             for t in event.tests]
            elif isinstance(event, Outcome):
                verdicts[(event.outcome.question, event.outcome.name)] = event.outcome
            elif isinstance(event, RestartRequest):
                restart(control_parent)
            elif isinstance(event, DeathRequest):  # the sandbox stopped answering: say how it ended
                messages.send(control_parent, DeathReply(why=death_cause()[:200]))
            elif isinstance(event, Done):
                return SessionEnd(outcomes=_merge(collected, verdicts), done=event)
            elif isinstance(event, Failed):
                raise RuntimeError(event.message or "the hidden tests could not run")
    finally:
        _kill(runner)
        control_parent.close()


class TestRunners:
    """The worker's test-runner zygote (gradelab.hidden.runner), started at the first grading
    and again if it ever stops."""

    __test__ = False  # not a pytest test class

    def __init__(self, project, *, close_fds_except: Callable[[set[int]], None]):
        # `close_fds_except` is the sandbox launcher's: passed in, so that this trusted module does
        # not import gradelab.sandbox.
        self.project = project
        self.close_fds_except = close_fds_except
        self.jobs: socket.socket | None = None
        self.pid = 0

    def start(self, job: RunnerJob, rpc: socket.socket, control: socket.socket) -> int:
        """Fork a test runner for one submission; return a pidfd of it."""
        if self.jobs is None:
            self._spawn()
        try:
            messages.send(self.jobs, job)
            socket.send_fds(self.jobs, [b"j"], [rpc.fileno(), control.fileno()])
            reply = messages.receive(self.jobs, JobReply, timeout=120)  # the first job waits for the collection
            if not reply.ok:
                raise RuntimeError(reply.message or "the hidden tests could not run")
            _, fds, _, _ = socket.recv_fds(self.jobs, 16, 1)
            return fds[0]
        except (EOFError, OSError, TimeoutError, messages.MalformedMessage) as exc:
            self.close()
            raise RuntimeError(f"the hidden tests' runner stopped ({type(exc).__name__})") from None

    def _spawn(self) -> None:
        worker_end, zygote_end = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                self.close_fds_except({zygote_end.fileno()})  # the worker's pool pipes, sockets of other runs
                code = _zygote_main(self.project, zygote_end)
            finally:
                os._exit(code)
        zygote_end.close()
        self.jobs, self.pid = worker_end, pid

    def close(self) -> None:
        if self.jobs is not None:
            self.jobs.close()
            self.jobs = None
            _reap(self.pid)


def _zygote_main(project, jobs: socket.socket) -> int:
    """Process Z: load the reference and the hidden tests once, then fork a runner per submission."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # pytest's own report and warnings are not needed; outcomes go back as data
    os.dup2(devnull, 2)
    sys.stdout = sys.stderr = open(os.devnull, "w")  # also when sys.stdout is not fd 1 (inside pytest)
    template = GradingContext(
        link=None, seed=0, cells=[], figures=[], reference=load_reference(project.solutions_dir),
        reference_data=json.loads(project.reference_data_file.read_text()),
        config=project.config, question_points={q.id: q.points for q in project.config.questions})
    return serve_hidden_tests(str(project.tests_dir), template, jobs)


def _merge(collected: list[TestOutcome], verdicts: dict[tuple[str, str], TestOutcome]) -> list[TestOutcome]:
    """Every collected test, with its verdict where one arrived."""
    return [verdicts.get((t.question, t.name), t) for t in collected]


def _kill(pidfd: int) -> None:
    """Stop a test runner (a child of the zygote, so known by a pidfd: never a reused pid)."""
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


def _reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
