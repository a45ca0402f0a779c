"""The test-runner zygote Z (collects the hidden tests once) and the runners T it forks."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import sys
from dataclasses import dataclass

import pytest
from _pytest.main import pytest_runtestloop as run_collected_tests  # pytest's own loop, run per runner

from gradelab.boundary import messages
from gradelab.boundary.messages import Done, Failed, JobReply, RunnerJob
from gradelab.hidden.plugin import GradingContext, GradingPlugin, Report
from gradelab.hidden.proxy import SandboxLink
from gradelab.memory import limit_address_space


def serve_hidden_tests(tests_dir: str, template: GradingContext, jobs: socket.socket) -> int:
    """Main of the test-runner zygote: collect the hidden tests once, then for every job on
    `jobs` fork a runner that runs the collected tests against one submission.

    A job is a RunnerJob followed by two file descriptors: the socket to the submission's sandbox
    and the socket to the supervisor, which receives the runner's messages (Collected, one Outcome
    per test, then Done or Failed) and answers its questions (DeathRequest: how the sandbox just
    ended; RestartRequest: a new sandbox). The reply is a JobReply, with a pidfd of the runner when ok
    (gradelab.boundary.messages).

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
            if isinstance(message, str):  # not a job: say why, and wait for the next one
                for fd in fds:
                    os.close(fd)
                messages.send(self.jobs, JobReply(ok=False, message=message))
                continue
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
            messages.send(self.jobs, JobReply(ok=True))
            socket.send_fds(self.jobs, [b"p"], [pidfd])
            os.close(pidfd)
        return True

    def _next_job(self) -> tuple[RunnerJob | str, list[int]] | None:
        """The next job and its two sockets; a job that does not validate comes as the reason why."""
        try:
            try:
                job: RunnerJob | str = messages.receive(self.jobs, RunnerJob, timeout=None, max_bytes=512 << 20)
            except messages.MalformedMessage as exc:
                job = f"the grader sent a malformed job ({exc})"
            _, fds, _, _ = socket.recv_fds(self.jobs, 16, 2)
        except (EOFError, OSError):
            return None  # the worker is gone
        return (job, fds) if len(fds) == 2 else None

    def _run(self, session, job: RunnerJob, fds: list[int]) -> int:
        """In a forked runner: the collected tests against one submission."""
        rpc, control = (socket.socket(fileno=fd) for fd in fds)
        report: Report = lambda record: messages.send(control, record)  # noqa: E731
        try:
            limit_address_space(job.memory_mb)
            link = SandboxLink(rpc=rpc, control=control, call_timeout=job.call_timeout, lost=job.sandbox_lost)
            self.plugin.ctx = dataclasses.replace(self.plugin.ctx, link=link, seed=job.seed,
                                                  cells=job.cells, figures=job.figures)
            self.plugin.report = report
            self.plugin.announce()
            run_collected_tests(session)
            report(Done(op="done", student_seconds=link.student_seconds, call_timeouts=link.call_timeouts,
                        artifacts=self.plugin.artifacts, malformed=link.malformed))
            return 0
        except BaseException as exc:  # noqa: BLE001 - the supervisor must hear of any failure
            report(Failed(op="failed", message=f"{type(exc).__name__}: {exc}"[:2000]))
            return 1

    def refuse_all(self, why: str) -> None:
        while (job := self._next_job()) is not None:
            for fd in job[1]:
                os.close(fd)
            messages.send(self.jobs, JobReply(ok=False, message=why))

