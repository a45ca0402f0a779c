"""The trusted side of cluster grading: a Dask worker plugin that owns one warm grading process.

    Dask worker D (`gradelab worker`, or a LocalCluster process; its tasks run in a thread pool)
      └─ Popen, once, from D's main thread → grading process G (`serve`): one warm Grader
            └─ fork, from G's main thread → sandbox S, test-runner zygote Z (supervisor.py)

Why a separate process rather than grading in D's task thread: the sandbox arms PR_SET_PDEATHSIG,
which fires when the *thread* that forked it exits, and Dask retires and replaces its task
threads; forked from such a thread a sandbox outlives its worker. G forks everything from its own
main thread, and G itself is started from D's main thread (the event loop's, which lives as long as
D) with PR_SET_PDEATHSIG, so killing D kills G, and G's death kills its sandboxes. G is a fresh
interpreter (not a fork of the multi-threaded D), so torch and the zygote start clean.

Before G takes work it grades the reference notebook (the canary, which must score full marks).
Only then does the plugin advertise the Dask resource named after the assignment bundle's hash
(`bundle_resource`); the client's tasks require one unit of it, so a worker with another bundle, a
failed canary or a grader still starting never receives a submission, and a worker grades one
submission at a time. Each worker reports its state as an event (EVENT_TOPIC) for the client.
Nothing here imports torch or the sandbox: the client imports this module for `bundle_hash`.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from multiprocessing.connection import Connection
from pathlib import Path

from distributed import WorkerPlugin, get_worker
from distributed.core import Status
from pydantic import BaseModel, ConfigDict

from gradelab.boundary.records import SubmissionResult
from gradelab.config import CONFIG_FILE
from gradelab.project import Project, file_hash

PLUGIN_NAME = "gradelab-grader"
EVENT_TOPIC = "gradelab-worker"  # {"worker", "bundle", "state": starting|ready|refused, "why"}
CANARY_ID = "canary"
CLOSE_SECONDS = 3  # for an idle G to shut down cleanly (it takes well under that) before it is killed
_PR_SET_PDEATHSIG = 1
_FAILED = b"\0failed:"  # G's reply when grading raised (a result is JSON, never starts with NUL)


class GradedSubmission(BaseModel):
    """What a task returns, as JSON (never a pickled object): the result and the student's folder
    as the grader wrote it (results.json, submission.json, figures/*.png), for the client to write."""

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    result: SubmissionResult
    files: dict[str, bytes]  # path relative to <out>/<student>/ -> content


class Job(BaseModel):
    """One submission as it travels to a worker (the notebook's bytes travel beside it)."""

    student_id: str
    file_name: str
    content_hash: str
    bundle: str


def bundle_hash(project: Project) -> str:
    """The hash of everything that decides a grade besides the submission and the code: the hidden
    tests, the reference solutions and data, the release notebook and helpers, and the config."""
    digest = hashlib.sha256()
    files = [project.root / CONFIG_FILE]
    for tree in (project.tests_dir, project.solutions_dir, project.release_dir):
        files += sorted(p for p in tree.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for path in files:
        digest.update(str(path.relative_to(project.root)).encode() + b"\0")
        digest.update(file_hash(path).encode())
    return digest.hexdigest()


def bundle_resource(bundle: str) -> str:
    """The Dask resource a worker advertises once it can grade this bundle."""
    return f"gradelab-{bundle[:16]}"


def task_key(student_id: str, content_hash: str, bundle: str) -> str:
    """Same student, same file, same bundle: the same task, so a rerun is idempotent."""
    return f"gradelab-{student_id}-{content_hash[:16]}-{bundle[:16]}"


def run_worker(scheduler: str, project: Path, security, *, host: str | None = None, name: str | None = None,
               require_sandbox: bool = False) -> None:
    """`gradelab worker`: a nanny and its one-thread Dask worker with the grading plugin, until
    stopped. The nanny restarts a worker that died, which then starts a fresh G and canary."""
    from distributed import Nanny

    plugin = GradingWorkerPlugin(str(project), require_sandbox=require_sandbox)

    async def serve_until_closed() -> None:
        async with Nanny(scheduler, nthreads=1, security=security, host=host, name=name, memory_limit=0,
                         dashboard=False, plugins={plugin}) as nanny:
            # A clean close on SIGTERM/SIGINT: the plugin's teardown lets G reap its sandboxes and cgroups.
            for signum in (signal.SIGTERM, signal.SIGINT):
                asyncio.get_running_loop().add_signal_handler(signum, lambda: asyncio.ensure_future(nanny.close()))
            await nanny.finished()

    asyncio.run(serve_until_closed())


# -------------------------------------------------------------- in the Dask worker D


class GradingWorkerPlugin(WorkerPlugin):
    """Starts G at worker start-up and advertises the bundle's resource once G's canary passed."""

    name = PLUGIN_NAME

    def __init__(self, project_root: str, *, require_sandbox: bool = False):
        self.project_root = str(Path(project_root).resolve())
        self.require_sandbox = require_sandbox

    async def setup(self, worker) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("the gradelab worker plugin must start in the worker's main thread")
        self.bundle = bundle_hash(Project.load(Path(self.project_root)))
        self.process = GraderProcess(self.project_root, slot=_slot_of(worker.name), require_sandbox=self.require_sandbox)
        self.lock = threading.Lock()  # one submission at a time through G's pipe
        self._announcing = asyncio.ensure_future(self._announce(worker))

    async def _announce(self, worker) -> None:
        while worker.status in (Status.init, Status.created, Status.starting):  # not yet registered
            await asyncio.sleep(0.1)
        worker.log_event(EVENT_TOPIC, {"worker": worker.address, "bundle": self.bundle, "state": "starting"})
        why = await asyncio.get_running_loop().run_in_executor(None, self.process.wait_ready)
        if why is None:
            await worker.set_resources(**{bundle_resource(self.bundle): 1})
        worker.log_event(EVENT_TOPIC, {"worker": worker.address, "bundle": self.bundle,
                                       "state": "ready" if why is None else "refused", "why": why})

    def teardown(self, worker) -> None:
        self._announcing.cancel()
        self.process.close()


def _slot_of(name) -> int:
    """The sandbox slot (uid, cgroup names) to ask for: LocalCluster names its workers 0, 1, ...;
    the sandbox leases the next free slot on the host when that one is taken."""
    try:
        return int(name)
    except (TypeError, ValueError):
        return 0


def grade_task(job_json: str, notebook: bytes) -> str:
    """The Dask task: runs in a task thread of D and hands the submission to G."""
    job = Job.model_validate_json(job_json)
    plugin = get_worker().plugins[PLUGIN_NAME]
    if job.bundle != plugin.bundle:  # the resource should prevent it; never grade with another bundle
        raise RuntimeError(f"this worker grades bundle {plugin.bundle[:16]}, the client sent {job.bundle[:16]}")
    with plugin.lock:
        return plugin.process.grade(job_json, notebook)


class GraderProcess:
    """D's handle on G: a socket pair framed by multiprocessing's Connection."""

    def __init__(self, project_root: str, *, slot: int, require_sandbox: bool):
        ours, theirs = socket.socketpair()
        command = [sys.executable, "-c", "import sys; from gradelab.grading.worker import serve; serve(*sys.argv[1:])",
                   str(theirs.fileno()), str(os.getpid()), project_root, str(slot), str(int(require_sandbox))]
        self.popen = subprocess.Popen(command, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.why_refused: str | None = None

    def wait_ready(self) -> str | None:
        """Block until G reports: None when it is ready, else why it refuses to grade."""
        try:
            reply = json.loads(self.conn.recv_bytes())
        except (EOFError, OSError):
            reply = {"refused": f"the grading process exited with status {self.popen.wait()} while starting"}
        self.why_refused = reply.get("refused")
        return self.why_refused

    def grade(self, job_json: str, notebook: bytes) -> str:
        if self.why_refused is not None:
            raise RuntimeError(f"this worker refuses to grade: {self.why_refused}")
        try:
            self.conn.send_bytes(job_json.encode())
            self.conn.send_bytes(notebook)
            reply = self.conn.recv_bytes()
        except (EOFError, OSError):
            # G died mid-submission: take D down with it, so that Dask counts a worker death on this
            # task and retries it elsewhere (the nanny starts a fresh worker).
            os._exit(70)
        if reply.startswith(_FAILED):
            raise RuntimeError(reply[len(_FAILED):].decode())
        return reply.decode()

    def close(self) -> None:
        self.conn.close()  # an idle G sees EOF and shuts its grader down
        try:
            self.popen.wait(timeout=CLOSE_SECONDS)
        except subprocess.TimeoutExpired:  # busy grading: its sandboxes die with it (parent-death signal)
            self.popen.kill()
            self.popen.wait()


# -------------------------------------------------------------- in the grading process G


def serve(fd: str, parent_pid: str, project_root: str, slot: str, require_sandbox: str) -> None:
    """G's main loop: build the Grader, run the canary, then grade jobs from D until EOF."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != int(parent_pid):  # D died before the signal was armed
        os._exit(1)
    sys.modules.setdefault("rfc3987_syntax", None)  # as in the CLI: a 1.7 s import nobody needs
    from gradelab.errors import GradelabError
    from gradelab.grading.supervisor import Grader

    conn = Connection(int(fd))
    project = Project.load(Path(project_root))
    try:
        grader = Grader(project, slot=int(slot), require_sandbox=require_sandbox == "1")
    except GradelabError as exc:
        conn.send_bytes(json.dumps({"refused": str(exc)}).encode())
        return
    try:
        why = canary_failure(grader, project)
        conn.send_bytes(json.dumps({"refused": why} if why else {"ready": True}).encode())
        while why is None:
            try:
                job = Job.model_validate_json(conn.recv_bytes())
                notebook = conn.recv_bytes()
            except (EOFError, OSError):
                break
            try:
                reply = grade_job(grader, job, notebook).model_dump_json().encode()
            except Exception as exc:  # e.g. the machine's HiddenPythonError: the task fails with it, G lives
                reply = _FAILED + f"{type(exc).__name__}: {exc}".encode()
            try:
                conn.send_bytes(reply)
            except OSError:  # D closed while this submission was graded: nobody waits for it
                break
    finally:
        grader.close()


def canary_failure(grader, project: Project) -> str | None:
    """Grade the reference notebook: None when it scores full marks, else what went wrong."""
    result = grader.grade(project.source_notebook, CANARY_ID)
    full = sum(q.points for q in project.config.questions)
    failed = [t.name for t in result.tests if t.status != "passed"]
    if result.status == "graded" and not failed and abs(result.score - full) < 1e-6:
        return None
    return (f"canary failed: the reference notebook scored {result.score:g} of {full:g} ({result.status}"
            + (f"; failing tests: {', '.join(failed[:5])}" if failed else "")
            + (f"; {result.messages[0]}" if result.messages else "") + ")")


def grade_job(grader, job: Job, notebook: bytes) -> GradedSubmission:
    """Grade one submission in a scratch folder and return the student's folder with the result."""
    if hashlib.sha256(notebook).hexdigest() != job.content_hash:
        raise ValueError(f"{job.student_id}: the notebook's bytes do not match its content hash")
    scratch = Path(tempfile.mkdtemp(prefix="gradelab-job-"))
    try:
        path = scratch / "submission" / Path(job.file_name).name
        path.parent.mkdir()
        path.write_bytes(notebook)
        out = scratch / "out"
        result = grader.grade(path, job.student_id, out_dir=out)
        student_dir = out / job.student_id
        files = {str(p.relative_to(student_dir)): p.read_bytes()
                 for p in sorted(student_dir.rglob("*")) if p.is_file()} if student_dir.is_dir() else {}
        return GradedSubmission(result=result, files=files)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
