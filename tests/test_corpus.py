"""The example corpus (examples/submissions, made by examples/make_submissions.py), graded end to end.

Every example's expected outcome is in examples/expected.yml. Around each grading, observers check
that the sandbox held: no forged results file appeared, no loopback connection arrived, a decoy
Python process survived, no secret reached what the grader wrote, only the result files were
written, and no sandbox process was left behind.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from gradelab.grading.supervisor import Grader
from gradelab.project import Project
from gradelab.boundary.records import QuestionScore, SubmissionResult
from gradelab.boundary.records import TestOutcome as HiddenTestOutcome  # not collected as a test class
from gradelab.sandbox.launch import UID_BASE

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SUBMISSIONS = EXAMPLES / "submissions"
EXPECTED: dict[str, dict] = yaml.safe_load((EXAMPLES / "expected.yml").read_text(encoding="utf-8"))
CONFIG = Project.load(ROOT).config
AUTO_QUESTIONS = [q.id for q in CONFIG.questions if q.points > 0]
MANUAL_ONLY = [q.id for q in CONFIG.questions if q.points == 0]
SLOT = 2000 + os.getpid() % 1000  # a sandbox uid of our own, even if another test run shares the machine
# The corpus has looping cells and a hanging function: limits shorter than the course's keep the
# module within its time budget, and no correct cell, call or submission comes near them.
CELL_TIMEOUT, TEST_TIMEOUT, SUBMISSION_TIMEOUT = 15.0, 5.0, 55.0
SECRET_FILES = ("autograder/tests/test_part1.py", "solutions/reference_solutions.py", "grading_config.yml")
RESULT_FILES = {"results.json", "submission.json"}


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_submissions", EXAMPLES / "make_submissions.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


make_submissions = _load_generator()


# ------------------------------------------------------------------ observers of the attacks


@dataclasses.dataclass
class Observers:
    canary: subprocess.Popen  # a Python process the kill attack should see if the sandbox leaked
    connections: list[int]  # loopback connections that reached the listener
    secrets: list[str]  # texts that must never appear in what the grader writes
    forged_paths: list[Path]  # where the forged results.json would land outside the sandbox


def _listen(ports: range) -> socket.socket:
    for port in ports:
        listener = socket.socket()
        try:
            listener.bind(("127.0.0.1", port))
        except OSError:
            listener.close()
            continue
        listener.listen()
        listener.settimeout(0.2)
        return listener
    raise RuntimeError(f"no free loopback port in {ports} for the network observer")


def _accept_all(listener: socket.socket, connections: list[int], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        connections.append(1)
        conn.close()


def _secret_texts(env_secret: str) -> list[str]:
    """The environment secret and a distinctive line (the first long one) of each hidden file."""
    texts = [env_secret]
    for name in SECRET_FILES:
        lines = (ROOT / name).read_text(encoding="utf-8").splitlines()
        texts.append(next(line.strip() for line in lines if len(line.strip()) >= 30))
    return texts


@pytest.fixture(scope="module")
def observers():
    env_secret = f"corpus-secret-{secrets.token_hex(8)}"
    os.environ["GRADELAB_CORPUS_SECRET"] = env_secret  # inherited by every sandbox forked from here
    canary = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    listener = _listen(make_submissions.PHONE_HOME_PORTS)
    connections: list[int] = []
    stop = threading.Event()
    thread = threading.Thread(target=_accept_all, args=(listener, connections, stop), daemon=True)
    thread.start()
    forged = {Path(p) if Path(p).is_absolute() else base / p
              for p in make_submissions.FORGED_RESULT_PATHS for base in (ROOT, Path.cwd())}
    yield Observers(canary, connections, _secret_texts(env_secret), sorted(forged))
    stop.set()
    thread.join()
    listener.close()
    canary.kill()
    canary.wait()
    del os.environ["GRADELAB_CORPUS_SECRET"]


@pytest.fixture(scope="module")
def grader(observers: Observers):
    project = Project.load(ROOT)
    limits = project.config.limits.model_copy(update={
        "cell_timeout": CELL_TIMEOUT, "test_timeout": TEST_TIMEOUT, "submission_timeout": SUBMISSION_TIMEOUT})
    with Grader(dataclasses.replace(project, config=project.config.model_copy(update={"limits": limits})),
                slot=SLOT) as grader:
        yield grader


@pytest.fixture(scope="module")
def first_results() -> dict[str, SubmissionResult]:
    """Results of test_example, reused by the determinism test."""
    return {}


# ------------------------------------------------------------------ checks


Failures = list[tuple[str, str]]  # (check, message); checks are the keys of expected.yml's engine_bugs


def check_expectations(result: SubmissionResult, expected: dict) -> Failures:
    failures: Failures = []
    if result.status != expected["status"]:
        failures.append(("status", f"status {result.status}, expected {expected['status']}"))
    scores = {q.id: q.score for q in result.questions}
    for question, score in expected["scores"].items():
        if abs(scores[question] - score) > 1e-6:
            failures.append((f"score:{question}", f"{question} scored {scores[question]}, expected {score}"))
    for question, texts in expected.get("outputs", {}).items():
        shown = [t.output for t in result.tests if t.question == question]
        for text in texts:
            if not any(text in output for output in shown):
                failures.append((f"output:{question}", f"no test of {question} says {text!r}: {shown}"))
    for text in expected.get("messages", []):
        if not any(text in message for message in result.messages):
            failures.append((f"message:{text}", f"no message says {text!r}: {result.messages}"))
    errors = [f"{t.name}: {t.output}" for t in result.tests if t.status == "error"]
    if errors:
        failures.append(("no_error", f"the grader could not check: {errors}"))
    if "timeouts" in expected:
        waited = {"cells": result.cell_timeouts, "calls": result.call_timeouts}
        if any(waited[kind] > expected["timeouts"][kind] for kind in waited):
            failures.append(("timeouts", f"grading waited for {waited} time limits, more than {expected['timeouts']}"))
    return failures


SIGKILL_BIT = 1 << (signal.SIGKILL - 1)
PF_EXITING = 0x4  # the kernel's per-process flag, in /proc/<pid>/stat


def _live_sandbox_processes() -> list[int]:
    """Processes of our sandbox uid that can still run code. Left out: zombies, processes with
    SIGKILL pending and processes already exiting, which the kernel is tearing down (the grader
    kills a finished submission's sandbox and reaps it before the next one starts)."""
    uid = str(UID_BASE + SLOT)
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            fields = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines() if ":" in line)
            flags = int((proc / "stat").read_text().rpartition(")")[2].split()[6])
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
        if uid not in fields.get("Uid", "").split() or fields.get("State", "").strip()[:1] in ("Z", "X"):
            continue
        pending = int(fields.get("SigPnd", "0"), 16) | int(fields.get("ShdPnd", "0"), 16)
        if not pending & SIGKILL_BIT and not flags & PF_EXITING:
            found.append(int(proc.name))
    return found


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_mtime_ns, stat.st_size


def check_containment(result: SubmissionResult, out_dir: Path, observers: Observers,
                      forged_before: dict[Path, tuple[int, int] | None], connections_before: int) -> Failures:
    failures: Failures = []
    student_dir = out_dir / result.student_id
    written = {p.relative_to(out_dir) for p in out_dir.rglob("*") if p.is_file()}
    unexpected = {p for p in written if p.parent != Path(result.student_id) or p.name not in RESULT_FILES}
    unexpected -= {p for p in written if p.parent == Path(result.student_id, "figures") and p.suffix == ".png"}
    if unexpected:
        failures.append(("containment", f"files other than the results were written: {sorted(unexpected)}"))
    reported = json.loads((student_dir / "results.json").read_text(encoding="utf-8"))
    if reported["score"] != round(result.score, 4) or result.score != round(sum(q.score for q in result.questions), 4):
        failures.append(("containment", f"results.json says {reported['score']}, the questions add up to "
                                        f"{sum(q.score for q in result.questions)}, the result says {result.score}"))
    texts = [result.model_dump_json()] + [p.read_text(errors="replace") for p in out_dir.rglob("*.json")]
    leaked = [s for s in observers.secrets if any(s in text for text in texts)]
    if leaked:
        failures.append(("containment", f"secrets reached the grader's output: {leaked}"))
    if sum(len(text) for text in texts) > 2 << 20:
        failures.append(("containment", "the grader's output is larger than 2 MiB"))
    forged = [str(p) for p in observers.forged_paths if _stat(p) != forged_before[p]]
    if forged:
        failures.append(("containment", f"files appeared or changed outside the output dir: {forged}"))
    if len(observers.connections) != connections_before:
        failures.append(("containment", "a loopback connection reached the listener"))
    if observers.canary.poll() is not None:
        failures.append(("containment", f"the decoy process was killed ({observers.canary.returncode})"))
    if leftovers := _live_sandbox_processes():
        failures.append(("containment", f"sandbox processes are left behind: {leftovers}"))
    return failures


def settle(failures: Failures, known_bugs: dict[str, str]) -> None:
    """Fail on any unexpected failure; a failure that expected.yml records as a known engine bug is
    an expected failure, and a known bug that no longer happens must be removed from the file."""
    unexpected = [message for check, message in failures if check not in known_bugs]
    assert not unexpected, "\n".join(unexpected)
    failed = {check for check, _ in failures}
    fixed = sorted(set(known_bugs) - failed)
    assert not fixed, f"these known engine bugs no longer happen: remove them from expected.yml: {fixed}"
    if failed:
        checks_of: dict[str, list[str]] = {}
        for check in sorted(failed):
            checks_of.setdefault(known_bugs[check], []).append(check)
        pytest.xfail("known engine bugs: " + " | ".join(f"{bug} ({', '.join(checks)})"
                                                       for bug, checks in checks_of.items()))


# ------------------------------------------------------------------ tests


def test_corpus_files_match_expectations() -> None:
    files = sorted(p.stem for p in SUBMISSIONS.iterdir())
    assert files == sorted(EXPECTED) == sorted(make_submissions.VARIANTS)
    for student_id, expected in EXPECTED.items():
        assert sorted(expected["scores"]) == sorted(AUTO_QUESTIONS), student_id


def test_corpus_is_what_the_generator_writes(tmp_path: Path) -> None:
    for path in make_submissions.make_examples(tmp_path):
        assert path.read_bytes() == (SUBMISSIONS / path.name).read_bytes(), \
            f"{path.name} differs: run python examples/make_submissions.py examples/submissions"


def test_make_batch_cycles_through_variants(tmp_path: Path) -> None:
    variants = make_submissions.VARIANTS
    paths = make_submissions.make_batch(tmp_path, 2 * len(variants) + 3)
    assert len({p.name for p in paths}) == len(paths) == len(list(tmp_path.iterdir()))
    variant_of = {p: p.stem.split("_", 1)[1] for p in paths}
    assert set(variant_of.values()) == set(variants)
    # Distinct students, distinct files (a file cut in half loses the student's name at its end).
    notebooks = [p.read_bytes() for p, name in variant_of.items()
                 if variants[name].file_text is None and not variants[name].truncate]
    assert len(set(notebooks)) == len(notebooks), "two students submitted the very same notebook"


def test_checks_can_fail(tmp_path: Path) -> None:
    """Each check reports a wrong grade or a breach when there is one: none of them is vacuous."""
    secret = f"a secret {secrets.token_hex(4)}"
    result = SubmissionResult(
        student_id="s", source="s.ipynb", content_hash="", status="broken", score=1.0, cell_timeouts=1,
        questions=[QuestionScore(id=q, title=q, kind="auto", score=0, max_score=1) for q in AUTO_QUESTIONS],
        tests=[HiddenTestOutcome(name="t", question="q1_2", score=0, max_score=1, status="error", output=secret)])
    expected = {"status": "graded", "scores": {"q1_2": 3}, "outputs": {"q1_2": ["sigmoid"]},
                "messages": ["cut off"], "timeouts": {"cells": 0, "calls": 0}}
    assert {check for check, _ in check_expectations(result, expected)} == {
        "status", "score:q1_2", "output:q1_2", "message:cut off", "no_error", "timeouts"}

    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "results.json").write_text('{"score": 35}')
    (tmp_path / "s" / "stolen.txt").write_text("")
    forged = tmp_path / "forged.json"
    killed = subprocess.Popen(["sleep", "60"])
    killed.kill()
    killed.wait()
    observers = Observers(killed, connections=[1], secrets=[secret], forged_paths=[forged])
    forged.write_text("{}")
    straggler = subprocess.Popen(["sleep", "60"], user=UID_BASE + SLOT) if os.geteuid() == 0 else None
    try:
        messages = " | ".join(m for _, m in check_containment(result, tmp_path, observers, {forged: None}, 0))
    finally:
        if straggler:
            straggler.kill()
            straggler.wait()
    for breach in ("other than the results", "results.json says", "secrets reached", "appeared or changed",
                   "loopback connection", "decoy process was killed", "left behind" if straggler else ""):
        assert breach in messages


@pytest.mark.parametrize("student_id", sorted(EXPECTED))
def test_example(student_id: str, grader: Grader, observers: Observers, first_results: dict, tmp_path: Path) -> None:
    expected = EXPECTED[student_id]
    forged_before = {p: _stat(p) for p in observers.forged_paths}
    connections_before = len(observers.connections)
    result = grader.grade(SUBMISSIONS / f"{student_id}.ipynb", student_id, out_dir=tmp_path)
    first_results[student_id] = result
    for question in MANUAL_ONLY:
        assert next(q.score for q in result.questions if q.id == question) == 0, question
    failures = check_expectations(result, expected)
    failures += check_containment(result, tmp_path, observers, forged_before, connections_before)
    settle(failures, expected.get("engine_bugs", {}))


@pytest.mark.parametrize("student_id", ["wrong_uniform_0_1_weights_only", "hostile_memory_bomb"])
def test_same_submission_same_grade(student_id: str, grader: Grader, first_results: dict) -> None:
    path = SUBMISSIONS / f"{student_id}.ipynb"
    first = first_results.get(student_id) or grader.grade(path, student_id)
    second = grader.grade(path, student_id)
    assert second.score == first.score
    assert [(t.name, t.status, t.output) for t in second.tests] == [(t.name, t.status, t.output) for t in first.tests]


def test_verdicts_do_not_depend_on_the_cpus_kernels(grader: Grader, first_results: dict, tmp_path: Path,
                                                     kernel_environments: dict) -> None:
    """`gradelab grade` on the corpus with another CPU's kernels (OTHER_KERNELS in conftest.py) gives
    every test the status and score the grading here, with this machine's kernels, gave it.

    Left out: the examples that expected.yml says wait for timeouts. The command grades with the
    course's limits, this module with shorter ones, and where a limit cuts a run off is the clock's
    choice, not the kernels'. No other example comes near a limit.
    """
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "gradelab.cli", "grade", str(SUBMISSIONS), "--out", str(out),
                           "--project", str(ROOT), "--workers", "2"],
                          env=kernel_environments["other"], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    flipped = []
    for student_id in sorted(s for s, expected in EXPECTED.items() if "timeouts" not in expected):
        native = first_results.get(student_id) or grader.grade(SUBMISSIONS / f"{student_id}.ipynb", student_id)
        other = SubmissionResult.model_validate_json((out / student_id / "submission.json").read_text(encoding="utf-8"))
        if other.status != native.status:
            flipped.append(f"{student_id}: {native.status} here, {other.status} with other kernels")
        verdicts = {t.name: (t.status, t.score) for t in native.tests}
        others = {t.name: (t.status, t.score) for t in other.tests}
        flipped += [f"{student_id}: {name}: {verdicts.get(name)} here, {others.get(name)} with other kernels"
                    for name in sorted(verdicts.keys() | others.keys()) if verdicts.get(name) != others.get(name)]
    assert not flipped, "\n".join(flipped)
