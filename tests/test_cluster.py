"""Grading on a Dask cluster (gradelab.grading.cluster, gradelab.grading.worker): a loopback TLS
cluster grades a corpus subset to the local pool's very scores and the whole corpus to its expected results, a worker SIGKILLed mid-batch loses
nothing and leaves no process behind, a `gradelab worker` whose canary fails takes no work, and the
command line refuses what the trust model forbids."""

from __future__ import annotations

import io
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml
from click.testing import CliRunner
from distributed import Client, Security
from distributed.scheduler import KilledWorker
from rich.console import Console

from gradelab.cli import main
from gradelab.errors import RefusedError
from gradelab.grading import batch
from gradelab.grading.cluster import (ClusterTarget, ReadyWorkers, _lost, local_cluster, parse_local,
                                      write_student_files)
from gradelab.grading.gradebook import Gradebook
from gradelab.grading.worker import bundle_hash, task_key
from gradelab.project import GRADEBOOK_FILE, RESULTS_FILE, Project, file_hash

SUBSET = ["correct_class_activation", "wrong_two_hidden_layers", "broken_not_json", "crash_sigmoid_grad_os_exit",
          "hostile_fork_bomb"]
PROJECT_PARTS = ["grading_config.yml", "source", "release", "solutions", "autograder"]


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def scores(out: Path) -> dict[str, tuple[str, float]]:
    with Gradebook(out / GRADEBOOK_FILE) as gradebook:
        return {r.student_id: (r.status, r.score) for r in gradebook.results()}


def copy_project(root: Path, dest: Path) -> Path:
    """What a worker needs of the assignment repository: the config, the sources, the release."""
    dest.mkdir()
    for part in PROJECT_PARTS:
        (shutil.copytree if (root / part).is_dir() else shutil.copy)(root / part, dest / part)
    return dest


@pytest.fixture(scope="module")
def subset(root: Path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("subset")
    for name in SUBSET:
        shutil.copy(root / "examples" / "submissions" / f"{name}.ipynb", folder)
    return folder


@pytest.fixture(scope="module")
def local_scores(subset: Path, root: Path, tmp_path_factory) -> dict[str, tuple[str, float]]:
    out = tmp_path_factory.mktemp("local")
    batch.grade_batch(subset, out, project=root, workers=2, console=quiet())
    return scores(out)


@pytest.fixture(scope="module")
def security() -> Security:
    return Security.temporary()


@pytest.fixture(scope="module")
def cluster(root: Path, security: Security):
    with local_cluster(root, 2, security) as cluster:
        yield cluster


@pytest.mark.slow
def test_a_tls_cluster_grades_as_the_local_pool_does(cluster, security, subset, local_scores, root, tmp_path) -> None:
    assert len(local_scores) == len(SUBSET)
    assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
    with pytest.raises(OSError):  # no certificate, no connection
        Client(cluster.scheduler_address.replace("tls://", "tcp://"), timeout=2)
    summary = batch.grade_batch(subset, tmp_path, project=root, console=quiet(),
                                cluster=ClusterTarget(address=cluster.scheduler_address, security=security))
    assert summary.ok and not summary.lost
    assert scores(tmp_path) == local_scores
    # The client wrote each student's folder from what the worker returned, figures included.
    assert all((tmp_path / student / RESULTS_FILE).is_file() for student in SUBSET)
    assert list((tmp_path / "correct_class_activation" / "figures").glob("*.png"))
    rerun = batch.grade_batch(subset, tmp_path, project=root, console=quiet(),
                              cluster=ClusterTarget(address=cluster.scheduler_address, security=security))
    assert sorted(rerun.unchanged) == sorted(SUBSET) and not rerun.results


@pytest.mark.slow
def test_a_tls_cluster_grades_the_whole_corpus_to_its_expected_results(cluster, security, root, tmp_path) -> None:
    """Every example (hostile ones included) scores on the cluster what expected.yml says, which is
    what the local grader gives (tests/test_corpus.py). The infinite loops are left out: at the
    course's limits they only take longer."""
    expected = yaml.safe_load((root / "examples" / "expected.yml").read_text(encoding="utf-8"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in expected:
        if name != "hostile_infinite_loops":
            shutil.copy(root / "examples" / "submissions" / f"{name}.ipynb", corpus)
    summary = batch.grade_batch(corpus, tmp_path / "out", project=root, console=quiet(),
                                cluster=ClusterTarget(address=cluster.scheduler_address, security=security))
    assert summary.ok and not summary.lost
    with Gradebook(tmp_path / "out" / GRADEBOOK_FILE) as gradebook:
        results = {r.student_id: r for r in gradebook.results()}
    assert sorted(results) == sorted(p.stem for p in corpus.glob("*.ipynb"))
    for name, result in results.items():
        assert result.status == expected[name]["status"], name
        got = {q.id: q.score for q in result.questions}
        assert all(abs(got[q] - score) < 1e-6 for q, score in expected[name]["scores"].items()), (name, got)


@pytest.mark.slow
def test_a_worker_killed_mid_batch_loses_nothing_and_leaves_no_process(cluster, security, subset, local_scores,
                                                                       root, tmp_path) -> None:
    with Client(cluster.scheduler_address, security=security) as client:
        worker_pids = set(client.run(lambda: __import__("os").getpid()).values())
    killed: list[psutil.Process] = []
    cgroups: set[Path] = set()

    def kill_a_worker_while_it_grades() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for pid in worker_pids:
                try:
                    worker = psutil.Process(pid)
                    tree = worker.children(recursive=True)
                    graders = worker.children()
                except psutil.NoSuchProcess:
                    continue
                sandboxes = [d for g in graders for child in g.children() for d in _sandbox_cgroups(child.pid)]
                if sandboxes:  # a submission's sandbox is running
                    cgroups.update(sandboxes)
                    killed.extend([worker, *tree])
                    worker.send_signal(signal.SIGKILL)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_worker_while_it_grades)
    killer.start()
    summary = batch.grade_batch(subset, tmp_path, project=root, force=True, console=quiet(),
                                cluster=ClusterTarget(address=cluster.scheduler_address, security=security))
    killer.join()
    assert killed, "no worker was caught grading"
    assert not summary.lost and summary.ok
    assert scores(tmp_path) == local_scores
    survivors = [p for p in killed if _alive(p)]
    deadline = time.monotonic() + 20
    while survivors and time.monotonic() < deadline:
        time.sleep(0.2)
        survivors = [p for p in survivors if _alive(p)]
    assert not survivors, f"processes of the killed worker still running: {survivors}"
    # Its sandbox's cgroups go when the restarted worker leases the slot (its canary's sandbox).
    with Client(cluster.scheduler_address, security=security) as client:
        ready = ReadyWorkers(client, bundle_hash(Project.load(root)), timeout=120)
        while ready.count() < 2:
            time.sleep(0.5)
    assert cgroups and not [d for d in cgroups if d.exists()], cgroups


def _sandbox_cgroups(pid: int) -> list[Path]:
    """The gradelab cgroup folders process `pid` is in (cgroup v1 or v2)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return []
    folders = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "/gradelab-s" in path:
            folders.append(Path("/sys/fs/cgroup", *([controllers] if controllers else []), path.lstrip("/")))
    return folders


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_a_worker_whose_canary_fails_is_refused(root: Path, subset: Path, security: Security, tmp_path) -> None:
    broken = copy_project(root, tmp_path / "project")
    tests = broken / "autograder" / "tests" / "test_part1.py"
    tests.write_text(tests.read_text() + '\n\n@pytest.mark.question("q1_1")\ndef test_broken_on_purpose():\n'
                     '    assert False\n')
    certificates = {}
    for option, pem in (("--tls-ca-file", security.tls_ca_file), ("--tls-cert", security.tls_worker_cert),
                        ("--tls-key", security.tls_worker_key)):
        certificates[option] = tmp_path / f"{option[2:]}.pem"
        certificates[option].write_text(pem)
    with local_cluster(broken, 0, security) as scheduler:  # a scheduler alone; the worker is the command's
        worker = subprocess.Popen([sys.executable, "-m", "gradelab.cli", "worker", "--scheduler",
                                   scheduler.scheduler_address, "--project", str(broken), "--host", "127.0.0.1",
                                   *[str(part) for item in certificates.items() for part in item]])
        try:
            with pytest.raises(RefusedError, match="canary failed: the reference notebook scored"):
                batch.grade_batch(subset, tmp_path / "out", project=broken, console=quiet(),
                                  cluster=ClusterTarget(address=scheduler.scheduler_address, security=security))
        finally:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=60) == 0  # a clean close on SIGTERM
    assert not scores(tmp_path / "out")


def test_bundle_hash_follows_the_hidden_tests_and_task_keys_are_stable(root: Path, tmp_path) -> None:
    copy = copy_project(root, tmp_path / "project")
    before = bundle_hash(Project.load(copy))
    assert before == bundle_hash(Project.load(root))
    (copy / "autograder" / "tests" / "test_part1.py").write_text("# changed\n", encoding="utf-8")
    assert bundle_hash(Project.load(copy)) != before
    assert task_key("s1", "ab" * 32, before) == task_key("s1", "ab" * 32, before) != task_key("s2", "ab" * 32, before)


def test_returned_files_stay_in_the_students_folder(tmp_path) -> None:
    write_student_files(tmp_path / "s1", {"results.json": b"{}", "figures/a.png": b"png"})
    assert (tmp_path / "s1" / "figures" / "a.png").read_bytes() == b"png"
    for name in ("../s2/results.json", "/etc/passwd", ""):
        with pytest.raises(ValueError):
            write_student_files(tmp_path / "s1", {name: b"x"})


def test_the_command_line_refuses_plain_connections_and_bad_specs(root: Path, tmp_path) -> None:
    runner = CliRunner()
    plain = runner.invoke(main, ["grade", str(root / "examples" / "submissions"), "--out", str(tmp_path),
                                 "--project", str(root), "--scheduler", "tcp://127.0.0.1:8786"])
    assert plain.exit_code == 2 and "tls://" in plain.output
    worker = runner.invoke(main, ["worker", "--scheduler", "tls://127.0.0.1:8786", "--project", str(root)])
    assert worker.exit_code == 2 and "TLS" in worker.output
    assert parse_local("local:3") == 3
    for spec in ("local:0", "remote:2", "local"):
        with pytest.raises(RefusedError):
            parse_local(spec)


def test_a_submission_that_outlived_its_retries_is_reported_with_its_deaths() -> None:
    class Failed:
        status = "error"

        def exception(self):
            return KilledWorker("gradelab-s1-abc", None, 1)  # as the scheduler sets it: allowed_failures=1

    assert _lost(Failed()) == "the grading worker died 2 times on this submission"


@pytest.mark.slow
def test_a_submission_whose_worker_dies_past_its_retries_is_reported_and_the_batch_goes_on(
        root: Path, security: Security, tmp_path) -> None:
    """The worker a submission is given to is SIGKILLed while a sandbox runs there, on its first run
    and on its retry (cluster.retries is 1): that submission is reported with its deaths. The other
    one (slow: its cells hang until their time limit) is the one running when the victim's retry is
    given to its worker, so it loses its worker too, and both workers restart: the new ones, which
    gain the bundle's resource only after their canary, still grade it."""
    victim, other = "correct_class_activation", "hostile_infinite_loops"
    folder = tmp_path / "in"
    folder.mkdir()
    for name in (victim, other):
        shutil.copy(root / "examples" / "submissions" / f"{name}.ipynb", folder)
    key = task_key(victim, file_hash(folder / f"{victim}.ipynb"), bundle_hash(Project.load(root)))
    kills: list[int] = []

    def kill_the_victims_worker_twice(address: str) -> None:
        with Client(address, security=security) as client:
            deadline = time.monotonic() + 600
            while len(kills) < 2 and time.monotonic() < deadline:
                holders = [w for w, keys in client.processing().items() if key in keys]
                try:
                    pids = client.run(lambda: __import__("os").getpid(), workers=holders) if holders else {}
                except OSError:  # the worker went away between the scheduler's list and the call
                    continue
                for pid in pids.values():
                    try:
                        worker = psutil.Process(pid)
                        busy = any(_sandbox_cgroups(c.pid) for g in worker.children() for c in g.children())
                    except psutil.NoSuchProcess:
                        continue
                    if busy and pid not in kills:
                        worker.send_signal(signal.SIGKILL)
                        kills.append(pid)
                time.sleep(0.1)

    with local_cluster(root, 2, security) as cluster:
        killer = threading.Thread(target=kill_the_victims_worker_twice, args=(cluster.scheduler_address,))
        killer.start()
        summary = batch.grade_batch(folder, tmp_path / "out", project=root, console=quiet(),
                                    cluster=ClusterTarget(address=cluster.scheduler_address, security=security))
        killer.join()
    assert len(kills) == 2
    assert summary.lost == [(victim, "the grading worker died 2 times on this submission")]
    assert list(scores(tmp_path / "out")) == [other]
