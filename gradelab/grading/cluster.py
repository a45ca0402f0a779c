"""Batch grading on a Dask distributed cluster: the client side (B, the `gradelab grade` process).

The client never runs student code and holds no grader: it sends each submission's bytes, with
their content hash and the assignment bundle's hash, to the workers (gradelab.grading.worker), and
writes what comes back, the moment it arrives, into the gradebook and `<out>/<student>/` through
the same functions as the local pool (batch.py). Task keys are derived from the student, the
content hash and the bundle hash, so a rerun is idempotent.

Faults: a worker that dies while grading a submission is counted by Dask's scheduler against that
task; the client sets the scheduler's `allowed_failures` to `cluster.retries`, so the submission is
retried on another worker that many times and then reported as lost ("the grading worker died N
times on this submission"). Dask charges a death to every task assigned to the dead worker, also
those still waiting there; the client keeps no more submissions in flight than there are ready
workers, and the scheduler gives each to the least occupied one, so a worker holds only the one it
grades and a death is charged to that one.

Trust: every connection is TLS (distributed.Security), since Dask unpickles what it receives.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from distributed import Client, LocalCluster, Security, wait
from distributed.scheduler import KilledWorker

from gradelab.config import CONFIG_FILE, load_config
from gradelab.errors import GradingEnvironmentError, RefusedError
from gradelab.grading.batch import INTERRUPTED, progress_bar, result_saver
from gradelab.grading.collect import SubmissionFile
from gradelab.grading.worker import (EVENT_TOPIC, GradedSubmission, GradingWorkerPlugin, Job, bundle_hash,
                                     bundle_resource, grade_task, task_key)
from gradelab.project import Project, file_hash

POLL_SECONDS = 0.5  # how often the client looks at the workers while it waits for results


@dataclass(frozen=True)
class ClusterTarget:
    """Where to grade: a running scheduler (`address`, tls://host:port) or a LocalCluster of
    `local_workers` processes on this machine, started and stopped by the batch."""

    address: str | None = None
    local_workers: int | None = None
    security: Security | None = None

    def describe(self) -> str:
        return self.address or f"a local cluster of {self.local_workers} workers"


def parse_local(spec: str) -> int:
    """`local:N` -> N (the `--cluster` option)."""
    kind, _, count = spec.partition(":")
    if kind != "local" or not count.isdigit() or int(count) < 1:
        raise RefusedError(f"--cluster {spec!r}: expected local:N, N at least 1 (or use --scheduler ADDRESS)")
    return int(count)


def require_tls(address: str) -> str:
    if not address.startswith("tls://"):
        raise RefusedError(f"--scheduler {address}: only tls:// addresses (Dask unpickles what it receives)")
    return address


def tls_security(project: Path, ca_file: Path | None, cert: Path | None, key: Path | None, *,
                 role: str) -> Security:
    """TLS for `role` ("client" or "worker") from certificate files, each given or else from the
    config's `cluster:` (relative to the project); refuses to run without them."""
    settings = load_config(Path(project) / CONFIG_FILE).cluster
    ca_file, cert, key = (given or (Path(project) / configured if configured else None)
                          for given, configured in ((ca_file, settings.tls_ca_file), (cert, settings.tls_cert),
                                                    (key, settings.tls_key)))
    if not (ca_file and cert):
        raise RefusedError("cluster connections need TLS: give --tls-ca-file and --tls-cert (and --tls-key "
                           "unless the certificate file holds the key), or set cluster.tls_* in the config")
    for path in (ca_file, cert, key):
        if path and not Path(path).is_file():
            raise RefusedError(f"{path}: no such certificate file")
    return Security(require_encryption=True, tls_ca_file=str(ca_file),
                    **{f"tls_{role}_cert": str(cert), f"tls_{role}_key": str(key) if key else None})


def local_cluster(project: Path, n_workers: int, security: Security, *, require_sandbox: bool = False) -> LocalCluster:
    """A loopback LocalCluster of `n_workers` grading workers (one thread each), TLS only."""
    return LocalCluster(
        n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1", protocol="tls://",
        security=security, dashboard_address=None, memory_limit=0,  # G's memory is the sandbox's business
        # Without a dashboard the scheduler still serves HTTP (health, metrics): on a free loopback port.
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
        plugins={GradingWorkerPlugin(str(project), require_sandbox=require_sandbox)})


@contextlib.contextmanager
def connect(target: ClusterTarget, project: Path, require_sandbox: bool):
    """A Client of the target cluster (starting the LocalCluster first, and stopping it after)."""
    with contextlib.ExitStack() as stack:
        if target.address:
            security, address = target.security, require_tls(target.address)
        else:
            security = target.security or Security.temporary()
            cluster = stack.enter_context(local_cluster(project, target.local_workers, security,
                                                        require_sandbox=require_sandbox))
            address = cluster.scheduler_address
        try:
            client = stack.enter_context(Client(address, security=security, timeout=30))
        except (OSError, TimeoutError) as exc:
            raise GradingEnvironmentError(f"cannot reach the Dask scheduler at {address}: {exc}") from exc
        yield client


def _set_allowed_failures(retries: int, dask_scheduler=None) -> None:
    dask_scheduler.allowed_failures = retries


def grade_on_cluster(todo: list[SubmissionFile], target: ClusterTarget, project: Path, out_dir: Path,
                     config, gradebook, summary, console, *, require_sandbox: bool = False) -> None:
    """Grade `todo` on the cluster, saving each result as it arrives (see the module docstring)."""
    bundle = bundle_hash(Project.load(project))
    with connect(target, project, require_sandbox) as client:
        client.run_on_scheduler(_set_allowed_failures, config.cluster.retries)
        workers = ReadyWorkers(client, bundle, config.cluster.worker_timeout)
        pending, running = list(todo), {}
        with progress_bar(console) as progress:
            task = progress.add_task("grading", total=len(todo), last="")
            save = result_saver(gradebook, config, progress, task)
            try:
                while pending or running:
                    _top_up(client, pending, running, workers.count(), bundle)
                    if not running:
                        progress.update(task, last="waiting for a grading worker")
                        time.sleep(POLL_SECONDS)
                        continue
                    finished = [(running.pop(future), future) for future in _first_done(list(running))]
                    _top_up(client, pending, running, workers.count(), bundle)  # before writing: no idle worker
                    for sub, future in finished:
                        if (lost := _lost(future)) is not None:
                            summary.lost.append((sub.student_id, lost))
                            progress.update(task, advance=1, last=f"{sub.student_id}: not graded")
                            continue
                        reply = GradedSubmission.model_validate_json(future.result())
                        write_student_files(out_dir / sub.student_id, reply.files)
                        save(sub, reply.result)
            except KeyboardInterrupt:
                summary.interrupted = True
                client.cancel(list(running))
                console.print(INTERRUPTED)


def _first_done(futures: list) -> set:
    """The futures done within POLL_SECONDS (as soon as one is), so the loop can watch the workers."""
    try:
        return wait(futures, timeout=POLL_SECONDS, return_when="FIRST_COMPLETED").done
    except TimeoutError:
        return set()


def _top_up(client: Client, pending: list[SubmissionFile], running: dict, ready: int, bundle: str) -> None:
    """Submit the next pending submissions while fewer are in flight than workers are ready."""
    while pending and len(running) < ready:
        sub = pending.pop(0)
        running[_submit(client, sub, bundle)] = sub


def _submit(client: Client, sub: SubmissionFile, bundle: str):
    notebook = sub.path.read_bytes()
    job = Job(student_id=sub.student_id, file_name=sub.path.name, content_hash=file_hash(sub.path), bundle=bundle)
    return client.submit(grade_task, job.model_dump_json(), notebook, key=task_key(sub.student_id, job.content_hash, bundle),
                         resources={bundle_resource(bundle): 1}, pure=False)


def _lost(future) -> str | None:
    """Why a finished task gave no result, or None when it did."""
    if future.status == "finished":
        return None
    if future.status == "cancelled":
        return "the cluster cancelled this submission"
    exc = future.exception()
    if isinstance(exc, KilledWorker):
        return f"the grading worker died {exc.allowed_failures + 1} times on this submission"
    return f"the grading worker failed on this submission ({type(exc).__name__}: {exc})"


def write_student_files(student_dir: Path, files: dict[str, bytes]) -> None:
    """Write the files a worker returned under `student_dir`, each atomically; a path that would
    leave the folder is refused (the worker is trusted, the check costs nothing)."""
    for name, content in files.items():
        relative = PurePosixPath(name)
        if relative.is_absolute() or not relative.parts or ".." in relative.parts:
            raise ValueError(f"a grading worker returned the file {name!r}, outside the student's folder")
        path = student_dir.joinpath(*relative.parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(content)
        tmp.replace(path)


def _schedule_unrunnable(dask_scheduler=None) -> None:
    """Send the tasks waiting for a worker to the workers that can now run them. A worker gains the
    bundle's resource after its canary, and the scheduler's add_resources, unlike a worker joining,
    does not look at tasks already waiting: when every worker restarted at once, they waited forever."""
    for ws in list(dask_scheduler.running):
        dask_scheduler.transitions(dask_scheduler.bulk_schedule_unrunnable_after_adding_worker(ws),
                                   stimulus_id=f"gradelab-worker-ready-{time.time()}")


class ReadyWorkers:
    """How many workers can take this bundle's submissions now; raises when none ever will."""

    def __init__(self, client: Client, bundle: str, timeout: float):
        self.client, self.bundle, self.timeout = client, bundle, timeout
        self.resource = bundle_resource(bundle)
        self.ready, self.last_ready = 0, time.monotonic()

    def count(self) -> int:
        if self.ready and time.monotonic() - self.last_ready < POLL_SECONDS:  # a round trip saved per result
            return self.ready
        workers = self.client.scheduler_info(n_workers=-1)["workers"]
        ready = sum(self.resource in (w.get("resources") or {}) for w in workers.values())
        if ready > self.ready:
            self.client.run_on_scheduler(_schedule_unrunnable)
        self.ready = ready
        if self.ready:
            self.last_ready = time.monotonic()
            return self.ready
        refusals = self.refusals(set(workers))
        if workers and len(refusals) == len(workers):
            raise RefusedError("no worker can grade this assignment: " + "; ".join(refusals.values()))
        if time.monotonic() - self.last_ready > self.timeout:
            raise GradingEnvironmentError(
                f"no grading worker has been ready for {self.timeout:g} s ({len(workers)} connected"
                + (f"; {'; '.join(refusals.values())}" if refusals else "") + "); see cluster.worker_timeout")
        return 0

    def refusals(self, addresses: set[str]) -> dict[str, str]:
        """Connected workers that will never take this bundle's work, with why (their last event)."""
        latest = {}
        for _, event in self.client.get_events(EVENT_TOPIC):
            if event.get("worker") in addresses:
                latest[event["worker"]] = event
        refused = {}
        for address, event in latest.items():
            if event["state"] == "refused":
                refused[address] = f"{address} refused: {event['why']}"
            elif event["bundle"] != self.bundle:
                refused[address] = (f"{address} grades another bundle ({event['bundle'][:16]}, yours is "
                                    f"{self.bundle[:16]}): its project's hidden tests, solutions or config differ")
        return refused
