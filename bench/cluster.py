"""`./run bench cluster`: the same batch graded by the local pool and by a loopback Dask cluster
with as many worker processes, side by side; the cluster's overhead per submission (target under
5%): its wall time not spent grading, beside the plain difference with the pool; and the
throughput to expect from more machines, from the measured per-worker figures.

The cluster is started, and its workers have passed their canary, before the clock starts: a
cluster serves many batches, so its start-up is a one-off (printed apart). The local pool's start-up
is part of its time, as every `gradelab grade` pays it. The batch is the bundled correct
submissions, copied under distinct student ids (the work of a class that answered everything).
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_OVERHEAD = 0.05
MACHINES = (1, 2, 4, 8, 16, 32)
CLASS_SIZE = 400


def _batch(folder: Path, size: int) -> Path:
    folder.mkdir()
    correct = sorted((ROOT / "examples" / "submissions").glob("correct_*.ipynb"))
    for n in range(size):
        shutil.copy(correct[n % len(correct)], folder / f"s{n:03d}.ipynb")
    return folder


def bench_cluster(size: int, workers: int) -> dict:
    from distributed import Client, Security
    from rich.console import Console

    from gradelab.grading.batch import grade_batch
    from gradelab.grading.cluster import ClusterTarget, local_cluster
    from gradelab.grading.worker import bundle_hash, bundle_resource
    from gradelab.project import Project

    quiet = Console(file=io.StringIO())
    with tempfile.TemporaryDirectory(prefix="gradelab-bench-cluster-") as tmp:
        batch = _batch(Path(tmp, "batch").resolve(), size)
        started = time.monotonic()
        local = grade_batch(batch, Path(tmp, "local"), project=ROOT, workers=workers, console=quiet)
        local_seconds = time.monotonic() - started
        security = Security.temporary()
        started = time.monotonic()
        with local_cluster(ROOT, workers, security) as cluster, Client(cluster.scheduler_address, security=security) as client:
            resource = bundle_resource(bundle_hash(Project.load(ROOT)))
            while sum(resource in (w.get("resources") or {})
                      for w in client.scheduler_info(n_workers=-1)["workers"].values()) < workers:
                time.sleep(0.2)
            startup = time.monotonic() - started
            started = time.monotonic()
            remote = grade_batch(batch, Path(tmp, "cluster"), project=ROOT, console=quiet,
                                 cluster=ClusterTarget(address=cluster.scheduler_address, security=security))
            cluster_seconds = time.monotonic() - started
    same = {r.student_id: r.score for r in local.results} == {r.student_id: r.score for r in remote.results}
    return {"size": size, "workers": workers, "local": local_seconds, "cluster": cluster_seconds,
            "local_grading": sum(r.grading_time for r in local.results) / size,
            "cluster_grading": sum(r.grading_time for r in remote.results) / size,
            "startup": startup, "same_scores": same, "lost": len(remote.lost)}


def print_cluster(row: dict) -> None:
    size, workers = row["size"], row["workers"]
    overhead = (row["cluster"] - row["local"]) / size
    share = overhead / (row["local"] / size)
    # The workers' own grading time changes from run to run on a shared machine; the wall time that
    # is not grading (dispatch, results, the batch's ramp-up and tail) does not depend on it.
    idle = row["cluster"] / size - row["cluster_grading"] / workers
    idle_share = idle / (row["cluster"] / size)
    print(f"\n== cluster: {size} correct submissions, {workers} worker processes ({os.cpu_count()} cores)")
    print(f"{'':34}{'local pool':>14}{'Dask cluster':>14}")
    print(f"{'wall time (s)':34}{row['local']:>14.1f}{row['cluster']:>14.1f}")
    print(f"{'seconds per submission':34}{row['local'] / size:>14.2f}{row['cluster'] / size:>14.2f}")
    print(f"{'of which grading, in the worker':34}{row['local_grading'] / workers:>14.2f}"
          f"{row['cluster_grading'] / workers:>14.2f}")
    print(f"cluster against the pool, per submission: {overhead:+.3f} s ({share:+.1%}); scores identical: "
          f"{row['same_scores']}; lost: {row['lost']}")
    print(f"cluster wall time not spent grading, per submission: {idle:.3f} s ({idle_share:.1%}; target under "
          f"{TARGET_OVERHEAD:.0%}: {'met' if idle_share < TARGET_OVERHEAD else 'not met'})")
    print(f"cluster start-up (scheduler, workers, their canaries; once per cluster): {row['startup']:.1f} s")
    per_worker = size / row["cluster"] / workers  # submissions per second per worker process
    print(f"\nexpected throughput from {per_worker * 60:.1f} submissions per minute per worker process "
          f"({workers} per machine, as measured):")
    print(f"{'machines':>10}{'submissions/min':>18}{f'class of {CLASS_SIZE} (min)':>22}")
    for machines in MACHINES:
        rate = per_worker * workers * machines * 60
        print(f"{machines:>10}{rate:>18.0f}{CLASS_SIZE / rate:>22.1f}")
