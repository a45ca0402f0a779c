"""gradelab's benchmarks: figures printed side by side with a baseline, never asserted in tests.

    ./run bench                    # everything below
    ./run bench overhead           # engine overhead per submission (target < 150 ms)
    ./run bench batch --sizes 50 200 --nbgrader 50 --class-units 2 --class-nbgrader-units 1
    ./run bench notebook           # executing the instructor notebook (target < 60 s)
    ./run bench fairness [--quick] # false-fail and miss rates of the statistical hidden tests (bench/fairness.py)
    ./run bench cluster [--cluster-size 24]  # local pool vs a loopback Dask cluster (bench/cluster.py)

overhead: grades the untouched release and the reference solution repeatedly with one warm
worker and splits each grading into the time the sandbox spent in the student's code (cells,
including the rendering of their figures as Jupyter does, and calls from hidden tests), the hidden
tests' own work (e.g. re-training XOR models) and the rest: the engine's overhead (sandbox set-up,
figure data capture, the test runner, pytest, the wire).

batch: generates batches with examples/make_submissions.py (a mix of correct, wrong, hostile and
broken submissions), grades them with `gradelab grade` (all cores), and grades a batch without
the attacks on the host (nbgrader has no sandbox: one of them kills it) with `gradelab grade` (all
cores, then one worker) and `nbgrader autograde` (nbgrader's own course layout, same notebooks),
and its correct submissions alone with both; prints seconds per submission, the ratios, the peak
memory of each grading worker, how time grows with size, where the workers' time went and the best
ratio the students' own code allows. Beside that coverage mix, a class-sized batch in the mix a
course sees (bench/class_mix.py: mostly correct or nearly correct, every question answered, a few
wrong, one looping cell per 30), graded whole by gradelab and by nbgrader on whole units of its
mix (`--class-units`, `--class-nbgrader-units`); for each mix, the ratio to nbgrader and the wall
time over the physical limit (the students' own code divided over the workers).

notebook: executes the instructor notebook (source/, reference solutions) top to bottom in a fresh
Jupyter kernel, as a student's "Run All" would, kernel start included.

fairness: simulates every hidden test whose verdict depends on random draws as the grader runs
it, over thousands of submissions of correct and wrong variants, and prints how often each fails
a correct answer and passes a wrong one (bench/fairness.py explains the method).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


def _median(values):
    return statistics.median(values) if values else float("nan")


# ------------------------------------------------------------------ engine overhead


PHASES = ("spawn to first cell", "around the cells", "test runner start", "pytest protocol", "end")


class MessageClock:
    """Times the supervisor's reads of sandbox and runner messages (a probe for this benchmark):
    turns one grading into the engine's phases."""

    def __init__(self):
        import gradelab.boundary.wire

        self.module = gradelab.boundary.wire
        self.read = self.module.recv_msg
        self.events: list[tuple[float, str, dict]] = []
        self.module.recv_msg = self._timed  # every process's messages.receive reads through wire.recv_msg

    def _timed(self, *args, **kwargs):
        message = self.read(*args, **kwargs)
        if isinstance(message, dict):
            self.events.append((time.perf_counter(), message.get("event") or message.get("op") or "", message))
        return message

    def grade(self, grader, path: Path):
        self.events.clear()
        started = time.perf_counter()
        result = grader.grade(path, "bench")
        ended = time.perf_counter()
        at = {name: next(t for t, n, _ in self.events if n == name)
              for name in ("cell_start", "ready", "collected", "done")}
        cells = sum(m["cell"]["seconds"] for _, n, m in self.events if n == "cell_end")
        tests = sum(t.duration for t in result.tests)
        phases = dict(zip(PHASES, (at["cell_start"] - started, at["ready"] - at["cell_start"] - cells,
                                   at["collected"] - at["ready"], at["done"] - at["collected"] - tests,
                                   ended - at["done"])))
        return result, phases

    def close(self) -> None:
        self.module.recv_msg = self.read


def bench_overhead(rounds: int) -> dict:
    from gradelab.grading.supervisor import Grader
    from gradelab.project import Project

    clock = MessageClock()
    try:
        with Grader(Project.load(ROOT)) as grader:
            return _overhead_rounds(grader, clock, rounds)
    finally:
        clock.close()


def _overhead_rounds(grader, clock: MessageClock, rounds: int) -> dict:
    cases = {"untouched release": ROOT / "release/vanishing_gradients/vanishing_gradients.ipynb",
             "reference solution": ROOT / "source/vanishing_gradients/vanishing_gradients.ipynb"}
    rows, phases = {}, {}
    for label, path in cases.items():
        grader.grade(path, "warm-up")
        results, timelines = zip(*(clock.grade(grader, path) for _ in range(rounds)))
        phases[label] = {name: _median([t[name] for t in timelines]) for name in PHASES}
        overheads = [r.grading_time - r.execution_time - r.test_time for r in results]
        rows[label] = {"total": _median([r.grading_time for r in results]),
                       "student code": _median([r.execution_time for r in results]),
                       "figures": _median([r.figure_time for r in results]),
                       "hidden tests": _median([r.test_time for r in results]),
                       "overhead": _median(overheads), "overhead min": min(overheads)}
    print("\nEngine overhead per submission (one warm worker; medians of", rounds, "runs; seconds)")
    print(f"{'submission':20} {'total':>7} {'student code':>13} {'(figures)':>10} {'hidden tests':>13} "
          f"{'overhead':>9} {'min':>7}  target")
    for label, row in rows.items():
        print(f"{label:20} {row['total']:7.3f} {row['student code']:13.3f} {row['figures']:10.3f} "
              f"{row['hidden tests']:13.3f} {row['overhead']:9.3f} {row['overhead min']:7.3f}  < 0.150")
    print("student code includes (figures): rendering the notebook's figures at the end of their cells, "
          "which Jupyter's inline backend also does inside the cell")
    print("\nWhere the overhead goes (medians, ms)")
    print(f"{'submission':20} " + " ".join(f"{name:>20}" for name in PHASES))
    for label, row in phases.items():
        print(f"{label:20} " + " ".join(f"{1000 * row[name]:20.1f}" for name in PHASES))
    return rows


# ------------------------------------------------------------------ memory sampling


class TreeMemory(threading.Thread):
    """Peak RSS of every process below a pid, sampled every 0.1 s (the notes' method)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop_flag = pid, {}, threading.Event()

    def _children(self) -> dict[int, tuple[int, str, int]]:
        procs = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                status = Path(f"/proc/{entry}/status").read_text()
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:80]
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            ppid = int(fields.get("PPid", "0"))
            rss = int(fields.get("VmRSS", "0 kB").split()[0]) if "VmRSS" in fields else 0
            procs[int(entry)] = (ppid, rss, cmd)
        below, frontier = {}, {self.pid}
        while frontier:
            frontier = {p for p, (pp, _, _) in procs.items() if pp in frontier} - set(below)
            below.update({p: (procs[p][1], procs[p][2], procs[p][0]) for p in frontier})
        return below

    def run(self) -> None:
        while not self.stop_flag.is_set():
            for pid, (rss, cmd, ppid) in self._children().items():
                if rss > self.peak.get(pid, (0, "", 0))[0]:
                    self.peak[pid] = (rss, cmd, ppid)
            time.sleep(0.1)


# ------------------------------------------------------------------ batches


def _grade_with_gradelab(batch: Path, out: Path, workers: int) -> tuple[float, int, float]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "gradelab.cli", "grade", str(batch), "--out", str(out),
                             "--project", str(ROOT), "--force", "--workers", str(workers)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    memory = TreeMemory(proc.pid)
    memory.start()
    proc.wait()
    seconds = time.monotonic() - started
    memory.stop_flag.set()
    # Direct children of the CLI are the pool workers; below them are their sandboxes (bounded by
    # limits.memory_mb: the memory-bomb example fills its sandbox) and test runners.
    worker_rss = [rss for pid, (rss, cmd, ppid) in memory.peak.items() if ppid == proc.pid]
    summary = json.loads((out / "summary.json").read_text())
    graded = summary["graded"] + summary["broken"] + summary["timeout"] + summary["crashed"]
    return seconds, graded, max(worker_rss, default=0) / 1024


def _gradelab_row(batch: Path, out: Path, workers: int = os.cpu_count() or 1) -> dict:
    from gradelab.publish.exports import load_results

    seconds, graded, worker_mb = _grade_with_gradelab(batch, out, workers)
    results = load_results(out)
    # Where the workers' seconds went, summed over the batch (each submission's own clocks).
    split = {"student code": sum(r.execution_time for r in results),
             "hidden tests": sum(r.test_time for r in results),
             "engine": sum(r.grading_time - r.execution_time - r.test_time for r in results),
             "slowest code": max((r.execution_time for r in results), default=0.0)}
    return {"seconds": seconds, "n": graded, "per": seconds / max(graded, 1), "worker_mb": worker_mb,
            "workers": workers, **split}


def _grade_with_nbgrader(batch: Path, work: Path) -> tuple[float, int]:
    course = work / "course"
    source = course / "source" / "vanishing_gradients"
    shutil.copytree(ROOT / "source" / "vanishing_gradients", source)
    (course / "nbgrader_config.py").write_text(
        "c = get_config()\nc.CourseDirectory.root = %r\nc.CourseDirectory.course_id = 'bench'\n" % str(course))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # nbgrader runs alembic from PATH
    subprocess.run(["nbgrader", "generate_assignment", "vanishing_gradients", "--force"], cwd=course, env=env,
                   check=True, capture_output=True)
    notebooks = sorted(batch.glob("*.ipynb"))
    for nb in notebooks:
        target = course / "submitted" / nb.stem / "vanishing_gradients"
        target.mkdir(parents=True)
        shutil.copy(nb, target / "vanishing_gradients.ipynb")
    # The same per-cell time limit as gradelab's (nbgrader's default is 30 s): a looping cell costs both the same.
    from gradelab.config import load_config

    cell_timeout = int(load_config(ROOT / "grading_config.yml").limits.cell_timeout)
    started = time.monotonic()
    subprocess.run(["nbgrader", "autograde", "vanishing_gradients", "--force", f"--Execute.timeout={cell_timeout}"],
                   cwd=course, env=env, capture_output=True)
    return time.monotonic() - started, len(notebooks)


# Attacks on the host: outside a sandbox they kill nbgrader (and this script), exhaust memory or
# processes, or reach the network. nbgrader gets the rest, and so does gradelab for the ratio.
UNSAFE_WITHOUT_SANDBOX = ("hostile_kill_processes", "hostile_fork_bomb", "hostile_memory_bomb",
                          "hostile_network", "hostile_read_secrets")


def _subset(batch: Path, target: Path, keep: Callable[[str], bool]) -> Path:
    """The notebooks of `batch` whose file stem `keep` accepts, copied to `target`."""
    target.mkdir()
    for notebook in sorted(batch.glob("*.ipynb")):
        if keep(notebook.stem):
            shutil.copy(notebook, target / notebook.name)
    return target


def _nbgrader_row(batch: Path, work: Path) -> dict:
    seconds, n = _grade_with_nbgrader(batch, work)
    return {"seconds": seconds, "n": n, "per": seconds / max(n, 1)}


def bench_batch(sizes: list[int], nbgrader_size: int, class_units: int = 0, class_nbgrader_units: int = 0) -> dict:
    from make_submissions import make_batch

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size in sizes:
            batch = tmp / f"batch{size}"
            make_batch(batch, size)
            rows[f"gradelab {size}"] = _gradelab_row(batch, tmp / f"out{size}")
        if nbgrader_size:
            full = tmp / f"nb_batch{nbgrader_size}"
            make_batch(full, nbgrader_size)
            safe = _subset(full, tmp / "safe", lambda stem: not any(name in stem for name in UNSAFE_WITHOUT_SANDBOX))
            rows["gradelab safe"] = _gradelab_row(safe, tmp / "out_safe")
            # One worker: what a single core buys against nbgrader, which grades one at a time.
            rows["gradelab safe 1w"] = _gradelab_row(safe, tmp / "out_safe_1w", workers=1)
            rows["nbgrader safe"] = _nbgrader_row(safe, tmp / "nbgrader")
            # The correct submissions alone: every question answered, XOR too, as most of a class's
            # notebooks are (the example mix is built for coverage: most variants leave XOR unanswered).
            answered = _subset(full, tmp / "answered", lambda stem: "_correct_" in stem)
            rows["gradelab correct"] = _gradelab_row(answered, tmp / "out_answered")
            rows["nbgrader correct"] = _nbgrader_row(answered, tmp / "nbgrader_answered")
        if class_units:
            from class_mix import UNIT, make_class_batch  # bench/, beside this file

            students = make_class_batch(tmp / "class", class_units)
            rows["gradelab class"] = _gradelab_row(tmp / "class", tmp / "out_class")
            if class_nbgrader_units:
                # nbgrader takes ~10 s per answered notebook: it grades whole units of the mix, whose
                # seconds per submission stand for the class's.
                sample = {p.stem for p in students[:class_nbgrader_units * UNIT]}
                rows["nbgrader class"] = _nbgrader_row(_subset(tmp / "class", tmp / "class_sample", sample.__contains__),
                                                       tmp / "nbgrader_class")
    print(f"\nBatch grading ({os.cpu_count()} cores; gradelab with one worker per core (1w: one worker), "
          f"nbgrader serial)")
    print(f"{'run':16} {'submissions':>11} {'seconds':>9} {'s/submission':>13} {'peak MB/worker':>15}")
    for label, row in rows.items():
        mb = f"{row['worker_mb']:.0f}" if "worker_mb" in row else "-"
        print(f"{label:16} {row['n']:11d} {row['seconds']:9.1f} {row['per']:13.2f} {mb:>15}")
    print("\nWhere gradelab's worker time went (seconds summed over each batch; slowest one: the largest "
          "student-code time of one submission)")
    print(f"{'run':16} {'student code':>13} {'hidden tests':>13} {'engine':>8} {'slowest one':>12}")
    for label, row in rows.items():
        if "student code" in row:
            print(f"{label:16} {row['student code']:13.1f} {row['hidden tests']:13.1f} {row['engine']:8.1f} "
                  f"{row['slowest code']:12.1f}")
    if "nbgrader safe" in rows:
        ours, theirs = rows["gradelab safe"], rows["nbgrader safe"]
        ratio = theirs["per"] / ours["per"]
        print(f"nbgrader / gradelab, seconds per submission on the same {theirs['n']} submissions "
              f"(the batch of {nbgrader_size} without {len(UNSAFE_WITHOUT_SANDBOX)} host attacks): "
              f"{ratio:.1f}x (target >= 10x); with one worker: {theirs['per'] / rows['gradelab safe 1w']['per']:.1f}x")
        # The students' own code must run, spread over the workers at best, and no batch ends before
        # the slowest submission's own code has run: with free hidden tests and a free engine, the ratio
        # would still stay under this.
        floor = max(ours["student code"] / ours["workers"], ours["slowest code"])
        print(f"best ratio possible here if hidden tests and engine cost nothing: {theirs['seconds'] / floor:.1f}x "
              f"(nbgrader's {theirs['seconds']:.0f} s / max(student code / {ours['workers']} workers, "
              f"the slowest one's student code) = {floor:.0f} s)")
        correct = rows["nbgrader correct"]["per"] / rows["gradelab correct"]["per"]
        print(f"nbgrader / gradelab on the {rows['nbgrader correct']['n']} correct submissions of that batch "
              f"(every question answered): {correct:.1f}x")
    if len(sizes) > 1:
        a, b = rows[f"gradelab {sizes[0]}"], rows[f"gradelab {sizes[-1]}"]
        print(f"scaling {sizes[0]} -> {sizes[-1]}: {b['seconds'] / a['seconds']:.2f}x the time for "
              f"{sizes[-1] / sizes[0]:.1f}x the submissions (linear = {sizes[-1] / sizes[0]:.1f}x)")
    _print_mixes(rows)
    return rows


def _print_mixes(rows: dict) -> None:
    """Each mix against nbgrader and against the physical limit: the students' own code, spread
    evenly over the workers (no grader finishes a batch sooner)."""
    from class_mix import describe_mix

    mixes = [("coverage (no host attacks)", "gradelab safe", "nbgrader safe"),
             (f"class ({describe_mix()})", "gradelab class", "nbgrader class")]
    mixes = [m for m in mixes if m[1] in rows]
    if not mixes:
        return
    print("\nPer mix: ratio to nbgrader (seconds per submission; nbgrader on its n) and distance to the "
          "physical limit (wall time / (student code / workers); 1.0 = nothing but the students' code)")
    width = max(len(label) for label, _, _ in mixes)
    print(f"{'mix':{width}} {'n':>4} {'gradelab s/sub':>15} {'nbgrader n':>11} {'nbgrader s/sub':>15} {'ratio':>7} "
          f"{'limit s':>8} {'wall/limit':>11}")
    for label, ours_key, theirs_key in mixes:
        ours, theirs = rows[ours_key], rows.get(theirs_key)
        limit = ours["student code"] / ours["workers"]
        nb_n, nb_per, ratio = ((f"{theirs['n']}", f"{theirs['per']:.2f}", f"{theirs['per'] / ours['per']:.1f}x")
                               if theirs else ("-", "-", "-"))
        print(f"{label:{width}} {ours['n']:4d} {ours['per']:15.2f} {nb_n:>11} {nb_per:>15} {ratio:>7} {limit:8.1f} "
              f"{ours['seconds'] / limit:11.2f}")


# ------------------------------------------------------------------ the instructor notebook


NOTEBOOK_TARGET_SECONDS = 60.0


def bench_notebook(rounds: int) -> list[float]:
    import nbformat
    from nbclient import NotebookClient

    source = ROOT / "source" / "vanishing_gradients"
    seconds = []
    for _ in range(rounds):
        nb = nbformat.read(source / "vanishing_gradients.ipynb", as_version=4)
        started = time.monotonic()
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(source)}}).execute()
        seconds.append(time.monotonic() - started)
    print(f"\nExecuting the instructor notebook (fresh kernel each time, kernel start included; {rounds} runs)")
    print(f"{'median':>8} {'min':>8} {'max':>8}  target")
    print(f"{_median(seconds):8.1f} {min(seconds):8.1f} {max(seconds):8.1f}  < {NOTEBOOK_TARGET_SECONDS:.0f} s")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", choices=["all", "overhead", "batch", "notebook", "fairness", "cluster"],
                        default="all")
    parser.add_argument("--rounds", type=int, default=10, help="repetitions for the overhead figures")
    parser.add_argument("--notebook-rounds", type=int, default=3, help="executions of the instructor notebook")
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 200], help="batch sizes graded by gradelab")
    parser.add_argument("--nbgrader", type=int, default=50, help="batch size graded by nbgrader (0: skip)")
    parser.add_argument("--class-units", type=int, default=2,
                        help="class-sized batch: units of 30 submissions in a real course's mix (0: skip)")
    parser.add_argument("--class-nbgrader-units", type=int, default=1,
                        help="units of the class batch graded by nbgrader, scaled per submission (0: skip)")
    parser.add_argument("--quick", action="store_true", help="fairness: a smoke run with a few submissions")
    parser.add_argument("--scale", type=float, default=1.0, help="fairness: multiply the simulated submissions")
    parser.add_argument("--cluster-size", type=int, default=24, help="cluster: submissions in the batch")
    args = parser.parse_args()
    if args.what in ("all", "overhead"):
        bench_overhead(args.rounds)
    if args.what in ("all", "batch"):
        bench_batch(args.sizes, args.nbgrader, args.class_units, args.class_nbgrader_units)
    if args.what in ("all", "notebook"):
        bench_notebook(args.notebook_rounds)
    if args.what in ("all", "fairness"):
        import fairness  # bench/, beside this file

        fairness.main([*(["--quick"] if args.quick else []), "--scale", str(args.scale)])
    if args.what in ("all", "cluster"):
        import cluster  # bench/, beside this file

        cluster.print_cluster(cluster.bench_cluster(args.cluster_size, os.cpu_count() or 1))


if __name__ == "__main__":
    main()
