"""The life of a sandbox around its worker: it dies with the worker however the worker ends and
whichever thread forked it, its slot's uid is never shared with another process on the machine,
its cgroups go with it (or, left busy, never weaken the next sandbox), the cgroups of crashed
workers are swept, and `Sandbox.layers` says what the sandbox applied.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gradelab.sandbox import cgroups, launch
from gradelab.sandbox.launch import Sandbox, SandboxLimits, probe_layers, sweep_stale_cgroups

ROOT = Path(__file__).resolve().parents[1]
LAYERS = probe_layers()
SLOT = 2000 + os.getpid() % 1000

# A worker in a subprocess: spawns a sandbox (from its main thread or another one) whose target
# forks a child and sleeps, prints what the test needs, then waits to be killed.
WORKER = textwrap.dedent("""
    import json, os, sys, threading, time
    from gradelab.sandbox.launch import Sandbox, SandboxLimits

    def target():
        if os.fork() == 0:
            time.sleep(600)
            os._exit(0)
        time.sleep(600)
        return 0

    def spawn():
        box = Sandbox.spawn(target, limits=SandboxLimits(), slot=int(sys.argv[2]))
        print(json.dumps({"pid": box.pid, "cgroups": [str(d) for d in box.cgroup_dirs], "uid": box.uid}), flush=True)

    if sys.argv[1] == "thread":
        thread = threading.Thread(target=spawn)
        thread.start()
        thread.join()
    else:
        spawn()
    time.sleep(600)
""")


def start_worker(how: str, slot: int = SLOT) -> tuple[subprocess.Popen, dict]:
    worker = subprocess.Popen([sys.executable, "-c", WORKER, how, str(slot)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = worker.stdout.readline()
    assert line, f"the worker printed nothing (exit status {worker.wait()})"
    return worker, json.loads(line)


def start_time(pid: int) -> str | None:
    """The start time of process `pid` (None once it is gone or a zombie): tells a pid's reuse apart."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in "ZX" else fields[19]


def descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        for child in (task / "children").read_text().split():
            found += [int(child), *descendants(int(child))]
    return found


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.parametrize("how", ["main", "thread"])
def test_sandbox_dies_with_its_killed_worker_and_its_cgroups_are_swept(how: str) -> None:
    worker, spawned = start_worker(how)
    try:
        assert wait_until(lambda: len(descendants(spawned["pid"])) >= 2, 10), "the sandbox did not fork"
        processes = {pid: start_time(pid) for pid in [spawned["pid"], *descendants(spawned["pid"])]}
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        assert wait_until(lambda: all(start_time(pid) != started for pid, started in processes.items()), 10), \
            f"sandbox processes outlived their worker: {processes}"
    finally:
        worker.kill()
        worker.wait()
    left = [Path(d) for d in spawned["cgroups"]]
    assert all(d.is_dir() for d in left)  # a SIGKILLed worker cannot remove them: the next worker does
    assert sweep_stale_cgroups() == []
    assert not any(d.exists() for d in left)


@pytest.mark.skipif(LAYERS["uid"] != "available", reason=f"no dedicated uid: {LAYERS['uid']}")
def test_two_workers_asking_for_the_same_slot_get_different_uids() -> None:
    first, first_box = start_worker("main", slot=SLOT + 1)
    second, second_box = start_worker("main", slot=SLOT + 1)
    try:
        assert first_box["uid"] is not None and second_box["uid"] is not None
        assert first_box["uid"] != second_box["uid"]
        assert not set(first_box["cgroups"]) & set(second_box["cgroups"])
    finally:
        for worker in (first, second):
            worker.terminate()
            worker.wait()


def own_uid_in_sandbox(slot: int) -> int:
    ours, theirs = socket.socketpair()
    box = Sandbox.spawn(lambda: theirs.sendall(str(os.getuid()).encode()) or 0, limits=SandboxLimits(), slot=slot,
                        keep_fds=[theirs.fileno()])
    theirs.close()
    try:
        assert box.wait(30) == 0
        return int(ours.recv(64))
    finally:
        box.cleanup()
        ours.close()


@pytest.mark.skipif(LAYERS["uid"] != "available", reason=f"no dedicated uid: {LAYERS['uid']}")
def test_a_slot_keeps_its_uid_for_the_process_and_a_forked_child_takes_another() -> None:
    uid = own_uid_in_sandbox(SLOT + 2)
    assert own_uid_in_sandbox(SLOT + 2) == uid
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the parent still holds the slot: the child must not reuse its uid
        try:
            os.write(write, str(own_uid_in_sandbox(SLOT + 2)).encode())
        finally:
            os._exit(0)
    os.close(write)
    child_uid = int(os.read(read, 64) or b"-1")
    os.waitpid(child, 0)
    os.close(read)
    assert child_uid not in (-1, uid)


def memory_hog() -> int:
    hoard = [b"x" * (32 << 20) for _ in range(64)]  # 2 GiB, far above the limit below
    return len(hoard)


@pytest.mark.skipif(LAYERS["cgroup_memory"] != "available", reason=f"cgroup_memory: {LAYERS['cgroup_memory']}")
def test_a_cgroup_left_busy_does_not_weaken_the_next_sandbox() -> None:
    first = Sandbox.spawn(lambda: time.sleep(600) or 0, limits=SandboxLimits(), slot=SLOT + 3)
    (memory,) = [d for d in first.cgroup_dirs if (d / "memory.limit_in_bytes").exists() or (d / "memory.max").exists()]
    squatter = subprocess.Popen(["sleep", "600"])
    blocker = memory / "blocker"  # a child cgroup: rmdir of the parent fails however long cleanup waits
    try:
        cgroups.write_file(memory / "cgroup.procs", str(squatter.pid))
        blocker.mkdir()
        first.cleanup()  # must not raise
        assert first.cleanup_problem and str(memory) in first.cleanup_problem
        assert memory.is_dir()
        assert squatter.wait(10) == -signal.SIGKILL  # whatever ran in the cgroup is killed all the same

        second = Sandbox.spawn(memory_hog, limits=SandboxLimits(memory_mb=256), slot=SLOT + 3)
        try:
            assert memory not in second.cgroup_dirs
            assert second.layers["cgroup_memory"] == "available"
            assert second.wait(60) == -signal.SIGKILL
            assert second.oom_killed
        finally:
            second.cleanup()
        assert second.cleanup_problem is None
    finally:
        squatter.kill()
        squatter.wait()
        if blocker.exists():
            blocker.rmdir()
    assert sweep_stale_cgroups() == []
    assert not memory.exists()


@pytest.mark.skipif(LAYERS["cgroup_memory"] != "available", reason=f"cgroup_memory: {LAYERS['cgroup_memory']}")
def test_layers_say_what_the_sandbox_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse_memory_limit(directory: Path, controller: str, limits: SandboxLimits) -> None:
        if controller == "memory":
            raise PermissionError("memory.limit_in_bytes: refused for this test")
        set_limit(directory, controller, limits)

    set_limit = cgroups._set_limit
    monkeypatch.setattr(cgroups, "_set_limit", refuse_memory_limit)
    box = Sandbox.spawn(lambda: 0, limits=SandboxLimits(), slot=SLOT + 4)
    try:
        assert box.wait(30) == 0
        assert box.layers["cgroup_memory"] == "failed: memory.limit_in_bytes: refused for this test"
        assert {key: state for key, state in box.layers.items() if key != "cgroup_memory"} == \
            {key: state for key, state in LAYERS.items() if key != "cgroup_memory"}
    finally:
        box.cleanup()
    required = Sandbox.spawn(lambda: 0, limits=SandboxLimits(), slot=SLOT + 4, require=True)
    try:
        assert required.wait(30) == launch.layers.EXIT_LAYER_MISSING
    finally:
        required.cleanup()


@pytest.mark.skipif(os.geteuid() == 0 or LAYERS["uid"] != "available",
                    reason="only without root, with subordinate ids to map")
def test_ids_that_cannot_be_mapped_are_reported_and_leave_no_capabilities(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch.slots, "map_ids", lambda pid, number: "newuidmap: refused for this test")
    ours, theirs = socket.socketpair()

    def target() -> int:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        theirs.sendall(json.dumps({"uid": os.getuid(), "caps": status["CapEff"].strip()}).encode())
        return 0

    box = Sandbox.spawn(target, limits=SandboxLimits(), slot=SLOT + 5, keep_fds=[theirs.fileno()])
    theirs.close()
    try:
        assert box.wait(30) == 0
        assert box.layers["uid"].startswith("failed: newuidmap: refused for this test"), box.layers
        assert box.layers["namespaces"] == "available" and box.uid is None
        assert json.loads(ours.recv(4096)) == {"uid": 0, "caps": "0000000000000000"}
    finally:
        box.cleanup()
        ours.close()
