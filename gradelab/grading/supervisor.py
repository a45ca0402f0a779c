"""Grading one submission: the supervisor between the sandbox and the test runner.

    supervisor (this process, warm: torch, matplotlib, IPython imported once; no hidden tests)
      ├─ fork → sandbox S: isolation layers, then the notebook's cells, then RPC (executor.py)
      └─ fork, once → test-runner zygote Z: pytest, the reference, the hidden tests collected
            └─ fork → test runner T: the collected tests, talking to S only through plain data
                      (gradelab.hidden; the worker's side of that talk: session.py)

The supervisor enforces the deadlines, restarts S when it dies or hangs (re-executing the
notebook without the cell that killed it, so one bad cell costs only its own answers), and
turns T's verdicts into scores (scoring.py). Student code never runs in a process that holds
hidden tests, reference solutions, or writes scores.
"""

from __future__ import annotations

import gc
import multiprocessing.util
import os
import signal
import socket
import sys
import time
from pathlib import Path

import nbformat
import torch

from gradelab.boundary import messages
from gradelab.boundary.figures import FigureData
from gradelab.boundary.messages import CellEnd, CellError, CellOutcome, CellStart, Ready, RestartReply
from gradelab.boundary.records import SubmissionResult, TestOutcome
from gradelab.grading import environment, scoring, session
from gradelab.grading.execution import (Execution, LayersNotApplied, MalformedSubmission, Stop, SubmissionTimeout,
                                        weakest)
from gradelab.grading.submission import BrokenNotebook, Submission, load_submission
from gradelab.project import Project, file_hash, submission_seed
from gradelab.sandbox import executor
from gradelab.sandbox import launch as sandbox


class Grader:
    """A warm grading worker. Create once per process; `grade()` many submissions with it."""

    def __init__(self, project: Project, *, slot: int = 0, require_sandbox: bool = False):
        # One thread before any torch op: forked children of a process that ran a multi-threaded
        # op hang in libgomp's barrier (its worker threads do not survive the fork), and small ops gain nothing.
        torch.set_num_threads(1)
        self.project = project
        self.config = project.config
        self.slot = slot
        self.require_sandbox = require_sandbox
        # Before anything else: a Python the sandbox cannot read fails every cell, not a student.
        environment.check(hide=project.secret_paths(), slot=slot)
        self.python_trees = environment.python_trees()
        self.limits = sandbox.SandboxLimits(
            memory_mb=self.config.limits.memory_mb, pids=self.config.limits.processes,
            open_files=self.config.limits.open_files, file_size_mb=self.config.limits.file_size_mb,
            cpu_seconds=int(self.config.limits.submission_timeout) + 60)
        self.release_notebook = nbformat.read(project.release_notebook, as_version=4)
        # The student-facing helper files are copied into each sandbox's private /tmp.
        self.helper_files = {p.name: p.read_bytes() for p in sorted(project.release_dir.glob("*.py"))}
        self.layers = sandbox.probe_layers()
        missing = {name: state for name, state in self.layers.items() if state != "available"}
        if require_sandbox and missing:
            raise sandbox.SandboxError("--require-sandbox: these isolation layers are not available here: "
                                       + "; ".join(f"{n} ({s})" for n, s in missing.items()))
        self.shell = executor.make_shell()
        _warm_up()
        self.runners = session.TestRunners(project, close_fds_except=sandbox.close_fds_except)
        # Sandboxes of finished submissions: killed, reaped before the next spawn (which reuses
        # their cgroup names) or by close(), so that no grading waits for the kernel's teardown.
        self._dying: list[sandbox.Sandbox] = []
        # Runs once: from close(), when the grader is collected, or when the process exits
        # (pool workers and the CLI both exit through multiprocessing's exit function).
        self._finalizer = multiprocessing.util.Finalize(self, _shut_down, args=(self._dying, self.runners),
                                                        exitpriority=10)

    def close(self) -> None:
        """Reap the last sandboxes, remove their cgroups, stop the test-runner zygote. Idempotent."""
        self._finalizer()

    def __enter__(self) -> "Grader":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    # -------------------------------------------------------------- public

    def grade(self, path: Path, student_id: str, *, out_dir: Path | None = None) -> SubmissionResult:
        """Grade one notebook. With `out_dir`, also write `<out_dir>/<student_id>/` (results.json in
        Gradescope's format, submission.json, the captured figures).

        Whatever the submission holds or its sandbox sends, this returns its result; only a machine
        that cannot grade at all (environment.HiddenPythonError) raises."""
        started = time.monotonic()
        path = Path(path)
        base = dict(student_id=student_id, source=str(path), content_hash=file_hash(path),
                    max_score=self.config.max_score)
        student_dir = out_dir / student_id if out_dir else None
        try:
            result = self._grade_loaded(path, out_dir, student_dir, base)
        except environment.HiddenPythonError:  # the machine's fault, not this submission's: stop
            raise
        except Exception as exc:  # the grader's own fault: report it, and let the batch go on
            result = scoring.unrun_result(self.config, "crashed", (
                f"The grader failed on this submission ({type(exc).__name__}: {str(exc)[:300]}); "
                f"it was not graded and needs the instructor's attention."), **base)
        result.grading_time = round(time.monotonic() - started, 3)
        if student_dir:
            scoring.write_result(student_dir, result)
        return result

    def _grade_loaded(self, path: Path, out_dir: Path | None, student_dir: Path | None, base: dict) -> SubmissionResult:
        try:
            submission = load_submission(path, self.release_notebook)
        except BrokenNotebook as exc:
            return scoring.unrun_result(self.config, "broken", f"This file could not be graded: {exc}.", **base)
        submission.private_paths = _private_paths(path, out_dir, [*self.python_trees, Path(__file__).parent])
        seed = submission_seed(self.config.assignment.seed, base["content_hash"])
        try:
            outcomes, execution, notes = self._grade_executed(submission, seed)
            self._confirm_imports(execution, submission)
            status = "graded"
        except SubmissionTimeout as exc:
            outcomes, execution, notes = exc.outcomes, exc.execution, [str(exc)]
            status = "timeout"
        except LayersNotApplied as exc:  # the machine's state, not the student's: graded again next run
            return scoring.unrun_result(self.config, "crashed", (
                f"Not graded: --require-sandbox, and these isolation layers could not be applied to this "
                f"submission's sandbox: {exc}."), **base)
        except MalformedSubmission as exc:
            return scoring.unrun_result(self.config, "malformed", (
                f"This submission could not be graded: the sandbox sent malformed data ({exc}). The grader's "
                f"own code inside the sandbox was changed or bypassed."), **base)
        result = scoring.submission_result(self.config, status=status, outcomes=outcomes, execution=execution,
                                           messages=notes, submission=submission,
                                           layers=execution.layers or self.layers, **base)
        result.figures = scoring.save_figures(execution.figures, execution.artifacts, student_dir)
        return result

    def _confirm_imports(self, execution: Execution, submission: Submission) -> None:
        """Raise HiddenPythonError if cells failed to import what this process finds in Python's own
        trees and a clean sandbox (no student code) cannot import it either."""
        modules, files = environment.import_failures(list(execution.cells.values()), self.python_trees)
        if not modules and not files:
            return
        _reap_sandboxes(self._dying)  # the probe reuses the slot's cgroup names
        report_read, report_write = os.pipe()
        try:
            box = sandbox.Sandbox.spawn(environment.probe_target(modules, files, report_write), limits=self.limits,
                                        slot=self.slot, keep_fds=[report_write],
                                        hide=self.project.secret_paths() + submission.private_paths)
            os.close(report_write)
            report_write = -1
            # A probe that hangs or dies proves nothing either way: grading goes on.
            finished = box.wait(timeout=60) == 0
            box.cleanup()
            failures = os.read(report_read, 8192).decode(errors="replace") if finished else ""
        finally:
            os.close(report_read)
            if report_write >= 0:
                os.close(report_write)
        if failures:
            raise environment.HiddenPythonError(
                f"notebooks cannot be graded here: a clean sandbox cannot load what this Python loads "
                f"({'; '.join(failures.splitlines())}). Python's files must be readable by the sandbox's "
                f"unprivileged user and lie outside /tmp, /dev/shm, /run and the assignment's hidden folders")

    # -------------------------------------------------------------- sandbox

    def _spawn_sandbox(self, cells: list[tuple[int, str]], seed: int, private: list[Path]):
        _reap_sandboxes(self._dying)
        ctl_parent, ctl_child = socket.socketpair()
        rpc_runner, rpc_child = socket.socketpair()
        helper_files, shell, limits = self.helper_files, self.shell, self.config.limits

        def target() -> int:
            for name, content in helper_files.items():
                Path("/tmp", name).write_bytes(content)
            sys.path.insert(0, "/tmp")
            return executor.sandbox_main(cells, ctl=ctl_child, rpc=rpc_child, shell=shell, seed=seed,
                                         cell_timeout=limits.cell_timeout, output_limit=limits.output_kb * 1024)

        box = sandbox.Sandbox.spawn(target, limits=self.limits, slot=self.slot,
                                    keep_fds=[ctl_child.fileno(), rpc_child.fileno()],
                                    hide=self.project.secret_paths() + private, require=self.require_sandbox)
        ctl_child.close()
        rpc_child.close()
        return box, ctl_parent, rpc_runner, [i for i, _ in cells]

    def _execute(self, submission: Submission, seed: int, execution: Execution, deadline: float):
        """Run the notebook in a fresh sandbox, skipping cells that killed an earlier one.

        Returns the live sandbox and the test runner's end of its RPC socket."""
        skip = set(self.config.skip_when_grading)
        while True:
            cells = [(i, src) for i, src in submission.to_execute(skip) if i not in execution.skipped]
            box, ctl, rpc, order = self._spawn_sandbox(cells, seed, submission.private_paths)
            # The box is torn down (killed, reaped, its cgroups removed) on every way out but the
            # one that hands it to the tests, before the next box of this worker starts.
            try:
                execution.layers = weakest(execution.layers, box.layers)
                if self.require_sandbox and (missing := [f"{n} ({s})" for n, s in box.layers.items() if s != "available"]):
                    raise LayersNotApplied(", ".join(missing))
                stop = self._follow(box, ctl, order, execution, deadline)
            except BaseException:
                box.kill()
                box.cleanup()
                rpc.close()
                raise
            finally:
                ctl.close()
            if stop is None:
                return box, rpc
            execution.cell_timeouts += stop.status == "timeout"
            box.kill()
            layers = box.layers
            box.cleanup()
            rpc.close()
            if stop.cell < 0:
                raise SubmissionTimeout(f"the sandbox could not start ({stop.why}; layers: {layers})", [], execution)
            # The cell's own clock died with the process: the supervisor's stands in for it.
            execution.keep(CellOutcome(index=stop.cell, status=stop.status, seconds=stop.seconds,
                                       error=CellError(type="Killed", message=stop.why[:500])))
            # Each run skips one more of the notebook's cells (_follow admits only cells it was given).
            if time.monotonic() > deadline:
                raise SubmissionTimeout("the notebook could not be run to the end", [], execution)
            execution.skipped.add(stop.cell)
            execution.restarts += 1

    def _follow(self, box, ctl: socket.socket, order: list[int], execution: Execution,
                deadline: float) -> "Stop | None":
        """Read the sandbox's progress until it is ready for the tests (None), or say in which
        cell it died or hung (cell -1: before running any).

        The sandbox must report exactly the cells it was given, in order (a start and an end
        each), then Ready: anything else, or a record that does not validate, is tampering
        (MalformedSubmission)."""
        current, reported, cell_started = -1, 0, time.monotonic()
        cell_deadline = time.monotonic() + 30  # start-up

        def stop(status: str, why: str) -> Stop:
            return Stop(current, status, time.monotonic() - cell_started, why)

        while True:
            timeout = max(0.05, min(cell_deadline, deadline) - time.monotonic())
            done = reported == len(order)
            try:
                event = messages.receive(ctl, messages.SANDBOX_EVENT, timeout=timeout,
                                         max_bytes=messages.MAX_READY_BYTES if done else messages.MAX_EVENT_BYTES)
            except TimeoutError:
                limit = self.config.limits.cell_timeout
                return stop("timeout", f"the cell ran longer than {limit:g} s and was stopped")
            except (EOFError, OSError):
                return stop("crashed", f"the process ended during this cell ({self._death_cause(box)})")
            except messages.MalformedMessage as exc:
                raise MalformedSubmission(str(exc)) from None
            if isinstance(event, CellStart) and current < 0 and not done and event.index == order[reported]:
                current, cell_started = event.index, time.monotonic()
                cell_deadline = time.monotonic() + self.config.limits.cell_timeout + 5
            elif isinstance(event, CellEnd) and event.cell.index == current >= 0:
                execution.keep(event.cell)
                execution.cell_timeouts += event.cell.status == "timeout"
                current, reported = -1, reported + 1
                cell_deadline = time.monotonic() + 30
            elif isinstance(event, Ready) and done and current < 0:
                execution.figures = list(event.figures)
                return None
            else:
                raise MalformedSubmission(f"a {type(event).__name__} message out of order")

    # -------------------------------------------------------------- test runner

    def _grade_executed(self, submission: Submission, seed: int):
        deadline = time.monotonic() + self.config.limits.submission_timeout
        execution = Execution()
        try:
            box, rpc = self._execute(submission, seed, execution, deadline)
        except SubmissionTimeout as exc:
            # Nothing to call into: the hidden tests still run, and fail with "not answered".
            box, rpc = None, None
            if time.monotonic() > deadline:
                raise
            messages = [str(exc)]
        else:
            messages = []
        boxes = [box] if box else []
        try:
            outcomes = self._run_tests(rpc, seed, execution, deadline, boxes, submission,
                                       lost=messages[0] if messages else None)
        finally:
            self._retire(boxes)
            if rpc is not None:
                rpc.close()
        return outcomes, execution, messages

    def _run_tests(self, rpc, seed, execution, deadline, boxes, submission, lost=None) -> list[TestOutcome]:
        figures = [f for f in execution.figures if isinstance(f, FigureData)]
        job = session.runner_job(seed, execution.cells, figures, submission, call_timeout=self.config.limits.test_timeout,
                                 sandbox_lost=lost, memory_mb=self.config.limits.grader_memory_mb)
        try:
            end = session.run_tests(
                self.runners, job, rpc, deadline,
                restart=lambda control: self._restart_for_runner(control, submission, seed, execution,
                                                                 deadline, boxes),
                death_cause=lambda: self._death_cause(boxes[-1]) if boxes else "no exit status known")
        except session.SessionTimeout as exc:
            raise SubmissionTimeout(f"grading took longer than {self.config.limits.submission_timeout:g} s; "
                                    f"the tests that had not finished score 0", exc.outcomes, execution) from None
        if end.done.malformed:
            raise MalformedSubmission(end.done.malformed)
        execution.call_seconds = end.done.student_seconds
        execution.call_timeouts = end.done.call_timeouts
        execution.artifacts = end.done.artifacts
        return end.outcomes

    def _retire(self, boxes: list) -> None:
        """Kill a submission's live sandboxes now; reap them later (see `_dying`)."""
        for box in boxes:
            box.kill(reap=False)
        self._dying.extend(boxes)
        boxes.clear()

    def _death_cause(self, box: sandbox.Sandbox) -> str:
        """How a sandbox that stopped talking ended: "exit status 0", "killed by SIGSEGV", "out of
        memory, limit 2048 MB", or, when it is still running, "it closed its connection"."""
        status = box.wait(timeout=1.0)
        if box.oom_killed:
            return f"out of memory, limit {self.config.limits.memory_mb} MB"
        if status is None:
            return "it closed its connection"
        if status < 0:
            known = -status in signal.Signals._value2member_map_
            return f"killed by {signal.Signals(-status).name if known else f'signal {-status}'}"
        return f"exit status {status}"

    def _restart_for_runner(self, control, submission, seed, execution, deadline, boxes) -> None:
        # No count limit: the runner asks again only after a request whose name it then remembers
        # (gradelab.hidden.proxy.StudentProxy), and the submission's deadline bounds the time.
        self._retire(boxes)
        execution.restarts += 1
        # Execution is deterministic: a cell that timed out would time out again.
        timed_out = {i for i, cell in execution.cells.items() if cell.status == "timeout"}
        rerun = Execution(skipped=execution.skipped | timed_out)
        try:
            box, rpc = self._execute(submission, seed, rerun, deadline)
        except SubmissionTimeout:
            messages.send(control, RestartReply(ok=False, message="the notebook could not be run again"))
            return
        finally:
            execution.cell_timeouts += rerun.cell_timeouts
            execution.layers = weakest(execution.layers, rerun.layers)
        boxes.append(box)
        messages.send(control, RestartReply(ok=True))
        socket.send_fds(control, [b"f"], [rpc.fileno()])
        rpc.close()


def _reap_sandboxes(boxes: list) -> None:
    """Reap killed sandboxes and remove their cgroups."""
    while boxes:
        boxes.pop().cleanup()


def _shut_down(dying: list, runners: session.TestRunners) -> None:
    _reap_sandboxes(dying)
    runners.close()


def _private_paths(path: Path, out_dir: Path | None, needed: list[Path]) -> list[Path]:
    """The submission's folder (other students' notebooks) and the output folder (their results),
    unless hiding one would hide `needed` (Python, its packages, gradelab), or is a system folder."""
    candidates = {path.resolve().parent, *([out_dir.resolve()] if out_dir else [])}
    return sorted(p for p in candidates if p.exists() and p not in (Path("/"), Path("/tmp"))
                  and not any(n.is_relative_to(p) for n in needed))


def _warm_up() -> None:
    """Touch what students' code loads lazily (autograd, optimisers, the Agg renderer, fonts), so
    that every sandbox forked from this process finds it in memory."""
    import matplotlib.pyplot as plt

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sigmoid(), torch.nn.Linear(2, 1))
    torch.optim.SGD(model.parameters(), lr=0.1).zero_grad()
    model(torch.rand(4, 2)).sum().backward()
    fig, ax = plt.subplots()
    ax.violinplot([[0.0, 1.0, 2.0]])
    ax.plot([0, 1])
    ax.set_title("warm-up")
    fig.canvas.draw()
    plt.close(fig)
    # Everything imported so far lives as long as the worker: keep it out of every collection,
    # in this process and in each fork (pytest and students' code trigger full collections).
    gc.collect()
    gc.freeze()
