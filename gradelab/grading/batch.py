"""Batch grading: LMS downloads in, a warm pool of graders, a gradebook that never loses a result.

Each worker process imports torch, matplotlib and the grader once and then grades many
submissions, forking fresh sandboxes from its warm memory. The parent process imports no torch
(forking after multi-threaded torch work deadlocks children), keeps the only connection to the
gradebook, and saves each result the moment it arrives: a crash, a kill or Ctrl-C loses nothing
already graded, and a re-run skips what did not change.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from gradelab.grading.collect import CollectReport, SubmissionFile, collect
from gradelab.config import CONFIG_FILE, load_config
from gradelab.errors import GradelabError, RefusedError
from gradelab.grading.gradebook import Gradebook
from gradelab.project import GRADEBOOK_FILE, RESULTS_FILE, SUMMARY_FILE, ResultsDir, file_hash
from gradelab.boundary.records import SubmissionResult
from gradelab.publish.late import assess

_worker_grader = None  # the warm Grader of this worker process
_worker_progress = None  # this batch's progress flags (see _run_pool), shared with the parent
SKIPPED_SHOWN = 5  # skipped entries named in the "nothing to grade" message
WORKER_DEATHS = 2  # deaths of the grading worker on one submission before it is reported, not retried
INTERRUPTED = "[yellow]interrupted: every result graded so far is saved; run again to continue"
_QUEUED, _STARTED, _FINISHED = 0, 1, 2  # a submission's progress flag


class NothingToGrade(GradelabError):
    """The submissions hold no notebook to grade; the message says what was found instead."""


def _init_worker(project_root: str, require_sandbox: bool, slots, progress) -> None:
    global _worker_grader, _worker_progress
    _worker_progress = progress
    from gradelab.grading.supervisor import Grader
    from gradelab.project import Project

    from gradelab.memory import limit_address_space

    with slots.get_lock():
        slot = slots.value
        slots.value += 1
    try:
        project = Project.load(Path(project_root))
        limits = project.config.limits
        # Each box forked from this worker gets its own memory limit on top of what it inherits.
        limit_address_space(limits.grader_memory_mb and limits.grader_memory_mb + limits.memory_mb)
        _worker_grader = Grader(project, slot=slot, require_sandbox=require_sandbox)
    except GradelabError as exc:  # raised by the first grading, with its message (a failing initializer
        _worker_grader = exc      # only breaks the pool: "the grading worker died")


def _grade_in_worker(index: int, path: str, student_id: str, out_dir: str) -> str:
    _worker_progress[index] = _STARTED
    result = _grade(path, student_id, out_dir)
    _worker_progress[index] = _FINISHED
    return result


def _grade(path: str, student_id: str, out_dir: str) -> str:
    if isinstance(_worker_grader, GradelabError):
        raise _worker_grader
    return _worker_grader.grade(Path(path), student_id, out_dir=Path(out_dir)).model_dump_json()


@dataclass
class BatchSummary:
    out_dir: Path
    collected: CollectReport
    results: list[SubmissionResult] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    lost: list[tuple[str, str]] = field(default_factory=list)  # (student id, why) when a worker itself died
    seconds: float = 0.0
    interrupted: bool = False

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def ok(self) -> bool:
        return not self.interrupted and not self.lost

    def to_json(self) -> dict:
        return {
            "graded": self.count("graded"), "broken": self.count("broken"), "timeout": self.count("timeout"),
            "crashed": self.count("crashed"), "malformed": self.count("malformed"), "unchanged": self.unchanged,
            "lost": self.lost,
            "seconds": round(self.seconds, 2), "interrupted": self.interrupted,
            "skipped": [list(s) for s in self.collected.skipped],
            "superseded": [[old.original_name, kept.original_name] for old, kept in self.collected.superseded],
            "disputed": {claimed: [f.student_id for f in files] for claimed, files in self.collected.disputed},
            "notes": self.collected.notes,
            "slowest": [[r.student_id, r.grading_time] for r in self.slowest()],
        }

    def slowest(self, n: int = 5) -> list[SubmissionResult]:
        return sorted(self.results, key=lambda r: r.grading_time, reverse=True)[:n]


def grade_batch(source: Path, out_dir: Path, *, project: Path, workers: int | None = None,
                only: set[str] | None = None, force: bool = False, require_sandbox: bool = False,
                console: Console | None = None, cluster=None) -> BatchSummary:
    """Grade every submission in `source` into `out_dir`; see the module docstring. With `cluster`
    (a gradelab.grading.cluster.ClusterTarget), on a Dask cluster instead of the local pool."""
    console = console or Console(stderr=True)
    started = time.monotonic()
    project = Path(project).resolve()
    config = load_config(project / CONFIG_FILE)
    if require_sandbox and not (cluster and cluster.address):  # remote workers check their own layers
        from gradelab.sandbox.launch import probe_layers  # no torch import: safe before forking workers

        if missing := [f"{n} ({s})" for n, s in probe_layers().items() if s != "available"]:
            raise RefusedError(f"--require-sandbox: isolation layers not available here: {'; '.join(missing)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    collected = collect(Path(source), out_dir / ".collected", notebook_name=config.assignment.notebook)
    if not collected.submissions:
        raise _nothing_to_grade(Path(source), collected)
    summary = BatchSummary(out_dir=out_dir, collected=collected)
    with Gradebook(ResultsDir(out_dir).gradebook) as gradebook:
        todo = []
        for sub in collected.submissions:
            if only and sub.student_id not in only:
                continue
            # A result of the grader's own failure ("crashed") is graded again.
            if not force and gradebook.content_hash(sub.student_id) == file_hash(sub.path) \
                    and gradebook.get(sub.student_id).status != "crashed":
                summary.unchanged.append(sub.student_id)
                continue
            todo.append(sub)
        workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
        if todo and cluster:
            from gradelab.grading.cluster import grade_on_cluster

            console.print(f"grading {len(todo)} submissions on {cluster.describe()} "
                          f"({len(summary.unchanged)} unchanged, skipped)")
            grade_on_cluster(todo, cluster, project, out_dir, config, gradebook, summary, console,
                             require_sandbox=require_sandbox)
        elif todo:
            console.print(f"grading {len(todo)} submissions with {workers} workers "
                          f"({len(summary.unchanged)} unchanged, skipped)")
            _run_pool(todo, project, out_dir, workers, require_sandbox, config, gradebook, summary, console)
        summary.results = [r for r in gradebook.results() if r.student_id in {s.student_id for s in todo}]
    summary.seconds = time.monotonic() - started
    ResultsDir(out_dir).summary.write_text(json.dumps(summary.to_json(), indent=2), encoding="utf-8")
    print_summary(summary, console)
    return summary


def _nothing_to_grade(source: Path, collected: CollectReport) -> NothingToGrade:
    skipped = collected.skipped
    if not skipped:
        return NothingToGrade(f"{source}: no notebook to grade (it is empty)")
    found = "; ".join(f"{name}: {reason}" for name, reason in skipped[:SKIPPED_SHOWN])
    more = f"; and {len(skipped) - SKIPPED_SHOWN} more" if len(skipped) > SKIPPED_SHOWN else ""
    return NothingToGrade(f"{source}: no notebook to grade; found {found}{more}")


def _late_info(sub: SubmissionFile, config, max_score: float):
    if config.late_policy.due is None and not sub.marked_late:
        return None
    return assess(config.late_policy, student_id=sub.student_id, submitted_at=sub.submitted_at,
                  marked_late=sub.marked_late, max_score=max_score)


def _run_pool(todo, project, out_dir, workers, require_sandbox, config, gradebook, summary, console) -> None:
    """Grade `todo` with a pool of warm workers, rebuilt whenever a worker dies.

    A dead worker breaks the whole pool: every unfinished future fails alike and none says which
    submission killed it. The workers say it: each flags a submission started, then finished, in an
    array shared with this process, so after a break those started and not finished were in flight.
    The others are re-queued uncharged. Those in flight are then graded one at a time by a single
    worker, so that a death there names its submission for certain: only such a death is charged,
    and a submission charged WORKER_DEATHS times is reported instead of retried."""
    fork = multiprocessing.get_context("fork")
    slots = fork.Value("i", 0)
    flags = fork.Array("b", len(todo), lock=False)
    index = {id(s): i for i, s in enumerate(todo)}
    deaths: dict[str, int] = {}
    idle_deaths = 0  # breaks with no submission in flight (a worker died starting up)
    pending, suspects = list(todo), []
    with progress_bar(console) as progress:
        task = progress.add_task("grading", total=len(todo), last="")
        save = result_saver(gradebook, config, progress, task)
        while pending or suspects:
            alone = bool(suspects)
            batch, pending, suspects = (suspects, pending, []) if alone else (pending, [], [])
            for sub in batch:
                flags[index[id(sub)]] = _QUEUED
            pool = ProcessPoolExecutor(max_workers=1 if alone else workers, mp_context=fork, initializer=_init_worker,
                                       initargs=(str(project), require_sandbox, slots, flags))
            try:
                unfinished = _grade_round(pool, batch, index, out_dir, save)
            except KeyboardInterrupt:
                summary.interrupted = True
                pool.shutdown(wait=False, cancel_futures=True)
                console.print(INTERRUPTED)
                return
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
            in_flight = [s for s in unfinished if flags[index[id(s)]] == _STARTED]
            waiting = [s for s in unfinished if flags[index[id(s)]] != _STARTED]
            (suspects if alone else pending).extend(waiting)
            if unfinished and not in_flight:
                idle_deaths += 1
                if idle_deaths >= WORKER_DEATHS:
                    why = f"the grading worker died {idle_deaths} times before grading a submission"
                    summary.lost.extend((s.student_id, why) for s in suspects + pending)
                    return
            elif alone and in_flight:  # one worker: the one in flight killed it
                culprit = in_flight[0]
                deaths[culprit.student_id] = deaths.get(culprit.student_id, 0) + 1
                if deaths[culprit.student_id] >= WORKER_DEATHS:
                    summary.lost.append((culprit.student_id, f"the grading worker died "
                                         f"{deaths[culprit.student_id]} times on this submission"))
                else:
                    suspects.insert(0, culprit)
            else:
                suspects.extend(in_flight)


def progress_bar(console: Console) -> Progress:
    columns = (TextColumn("[bold]grading"), BarColumn(), MofNCompleteColumn(), TextColumn("ETA"),
               TimeRemainingColumn(), TimeElapsedColumn(), TextColumn("{task.fields[last]}"))
    return Progress(*columns, console=console, transient=False)


def result_saver(gradebook: Gradebook, config, progress: Progress, task):
    """save(submission, result): the result with its late assessment and original file name into
    the gradebook (committed on return), one step of the progress bar."""
    def save(sub: SubmissionFile, result: SubmissionResult) -> None:
        result.max_score = result.max_score or config.max_score  # a result made outside the grader has none
        result.late = _late_info(sub, config, result.max_score)
        result.source = sub.original_name
        gradebook.save(result)
        progress.update(task, advance=1, last=f"{sub.student_id}: {result.score:g} ({result.status})")
    return save


def _grade_round(pool, batch, index, out_dir, save) -> list[SubmissionFile]:
    """Grade `batch` in `pool`, saving each result as it arrives; return what a broken pool left
    unfinished (nothing when every submission was graded)."""
    futures: dict[Future, SubmissionFile] = {
        pool.submit(_grade_in_worker, index[id(s)], str(s.path), s.student_id, str(out_dir)): s for s in batch}
    while futures:
        done, _ = wait(futures, return_when=FIRST_COMPLETED)
        for future in done:
            try:
                result = SubmissionResult.model_validate_json(future.result())
            except BrokenProcessPool:  # a worker died (not a sandbox: those are contained)
                return list(futures.values())
            except GradelabError:  # the machine cannot grade (e.g. the sandbox cannot read Python): stop
                raise
            except Exception as exc:  # noqa: BLE001 - a fault outside Grader.grade's own handling
                result = _crashed(futures[future], exc)
            save(futures.pop(future), result)
    return []


def _crashed(sub: SubmissionFile, exc: Exception) -> SubmissionResult:
    """The result of a submission whose grading failed in the worker, outside the grader's own
    error handling (e.g. its results could not be written): graded again by the next run."""
    return SubmissionResult(student_id=sub.student_id, source=str(sub.path), content_hash=file_hash(sub.path),
                            status="crashed", messages=[f"The grader failed on this submission ({type(exc).__name__}: "
                                                        f"{str(exc)[:300]}); it was not graded."])


def print_summary(summary: BatchSummary, console: Console) -> None:
    table = Table(title="grading summary")
    table.add_column("")
    table.add_column("submissions", justify="right")
    for label, value in (("graded", summary.count("graded")), ("failed to run (broken file)", summary.count("broken")),
                         ("timed out", summary.count("timeout")), ("crashed", summary.count("crashed")),
                         ("rejected (malformed data from the sandbox)", summary.count("malformed")),
                         ("unchanged (skipped)", len(summary.unchanged)), ("not notebooks / refused", len(summary.collected.skipped)),
                         ("superseded resubmissions", len(summary.collected.superseded))):
        table.add_row(label, str(value))
    console.print(table)
    for result in summary.results:
        if result.status != "graded":
            console.print(f"  [red]{result.student_id}[/] ({result.status}): {'; '.join(result.messages)[:300]}")
    for name, reason in summary.collected.skipped:
        console.print(f"  [yellow]skipped[/] {name}: {reason}")
    for note in summary.collected.notes:  # changed ids, ambiguous LMS names, one id under two names
        console.print(f"  [yellow]note[/] {note}")
    for student_id, why in summary.lost:
        console.print(f"  [red]not graded[/] {student_id}: {why}")
    if summary.results:
        slow = ", ".join(f"{r.student_id} {r.grading_time:.1f} s" for r in summary.slowest(3))
        console.print(f"slowest: {slow}")
    console.print(f"done in {summary.seconds:.1f} s; results in {summary.out_dir}/ "
                  f"(<student>/{RESULTS_FILE}, {GRADEBOOK_FILE}, {SUMMARY_FILE})")
