"""Taking over a delegated cgroup v2 subtree (gradelab.sandbox.delegation), on a directory tree that
stands in for cgroupfs: its writes go through a stand-in kernel that keeps the rules the real one
enforces (a pid moves out of the cgroup it was in; a cgroup with processes may not enable
controllers for its children, nor may one that enabled them take processes: EBUSY; an exited pid
cannot move: ESRCH).

The machine these tests were written on mounts cgroup v2 without controllers (v1 holds them), so the
real kernel path, `cgroups._own_cgroup_dir` on a v2 mount, is not exercised here; what a take-over
writes, in which order, and when it refuses are.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from gradelab.sandbox import delegation
from gradelab.sandbox.delegation import LEAF, sandbox_parent

OWNER = os.geteuid() or 4321  # the delegated user (as root, a made-up one the tree is chowned to)
SCOPE = "/user.slice/user-4321.slice/user@4321.service/app.slice/run-grade.scope"


class Kernel:
    """Stands in for cgroupfs writes, logging (path relative to the delegated cgroup, value)."""

    def __init__(self, root: Path, proc: Path) -> None:
        self.root, self.proc, self.log = root, proc, []
        self.fork_in: list[int] = []  # pids that appear in the delegated cgroup on each enabling attempt
        self.refuse_enabling: OSError | None = None

    def write(self, path: Path, value: str) -> None:
        self.log.append((str(path.relative_to(self.root)), value))
        cgroup = path.parent
        if path.name == "cgroup.procs":
            if _read(cgroup / "cgroup.subtree_control"):
                raise OSError(errno.EBUSY, "Device or resource busy")
            for other in [self.root, *self.root.iterdir()]:
                if other.is_dir() and (other / "cgroup.procs").exists():
                    (other / "cgroup.procs").write_text("".join(f"{p}\n" for p in _read(other / "cgroup.procs")
                                                                if p != value))
            if not (self.proc / value).exists():  # it exited after cgroup.procs was read: gone from every cgroup
                raise ProcessLookupError(errno.ESRCH, "No such process")
            (cgroup / "cgroup.procs").write_text("".join(f"{p}\n" for p in [*_read(cgroup / "cgroup.procs"), value]))
        elif path.name == "cgroup.subtree_control":
            if self.refuse_enabling:
                raise self.refuse_enabling
            if self.fork_in:
                pid = self.fork_in.pop(0)
                _process(self.proc, pid, OWNER)
                (cgroup / "cgroup.procs").write_text("".join(f"{p}\n" for p in [*_read(cgroup / "cgroup.procs"), pid]))
            if (cgroup / "cgroup.type").exists() and _read(cgroup / "cgroup.procs"):
                raise OSError(errno.EBUSY, "Device or resource busy")
            (cgroup / "cgroup.subtree_control").write_text(" ".join(c.lstrip("+") for c in value.split()) + "\n")
        else:
            raise AssertionError(f"unexpected write to {path}")


def _read(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _process(proc: Path, pid: int, uid: int) -> None:
    (proc / str(pid)).mkdir()
    os.chown(proc / str(pid), uid, -1)


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A delegated scope owned by OWNER holding two of its processes, 10 and 11, and no child cgroup."""
    cgroup, proc = tmp_path / "scope", tmp_path / "proc"
    cgroup.mkdir()
    proc.mkdir()
    files = {"cgroup.controllers": "cpu memory pids\n", "cgroup.subtree_control": "", "cgroup.procs": "10\n11\n",
             "cgroup.type": "domain\n"}
    for name, text in files.items():
        (cgroup / name).write_text(text)
    for path in [cgroup, *cgroup.iterdir()]:
        os.chown(path, OWNER, -1)
    for pid in (10, 11):
        _process(proc, pid, OWNER)
    kernel = Kernel(cgroup, proc)
    monkeypatch.setattr(delegation, "write_file", kernel.write)
    return cgroup, proc, kernel


def test_a_delegated_cgroup_moves_its_processes_to_a_leaf_then_enables_the_controllers(tree) -> None:
    cgroup, proc, kernel = tree
    assert sandbox_parent(cgroup, SCOPE, "memory", proc=proc, euid=OWNER) == (cgroup, "")
    assert kernel.log == [(f"{LEAF}/cgroup.procs", "10"), (f"{LEAF}/cgroup.procs", "11"),
                          ("cgroup.subtree_control", "+memory +pids")]
    assert _read(cgroup / "cgroup.procs") == [] and _read(cgroup / LEAF / "cgroup.procs") == ["10", "11"]
    # Idempotent: this process, now in the leaf, and another one that looked before the move find
    # the controllers enabled and write nothing.
    assert sandbox_parent(cgroup / LEAF, f"{SCOPE}/{LEAF}", "pids", proc=proc, euid=OWNER) == (cgroup, "")
    assert sandbox_parent(cgroup, SCOPE, "pids", proc=proc, euid=OWNER) == (cgroup, "")
    assert len(kernel.log) == 3


def test_processes_forked_into_the_cgroup_meanwhile_are_moved_too(tree) -> None:
    cgroup, proc, kernel = tree
    kernel.fork_in = [12]
    assert sandbox_parent(cgroup, SCOPE, "memory", proc=proc, euid=OWNER) == (cgroup, "")
    assert kernel.log[3:] == [(f"{LEAF}/cgroup.procs", "12"), ("cgroup.subtree_control", "+memory +pids")]
    assert _read(cgroup / LEAF / "cgroup.procs") == ["10", "11", "12"]


def test_a_process_that_exited_before_its_move_is_skipped(tree) -> None:
    cgroup, proc, kernel = tree
    (proc / "11").rmdir()
    assert sandbox_parent(cgroup, SCOPE, "memory", proc=proc, euid=OWNER) == (cgroup, "")
    assert _read(cgroup / LEAF / "cgroup.procs") == ["10"] and kernel.log[-1] == ("cgroup.subtree_control",
                                                                                  "+memory +pids")


def test_only_the_offered_controllers_are_enabled(tree) -> None:
    cgroup, proc, kernel = tree
    (cgroup / "cgroup.controllers").write_text("memory\n")
    assert sandbox_parent(cgroup, SCOPE, "memory", proc=proc, euid=OWNER) == (cgroup, "")
    assert kernel.log[-1] == ("cgroup.subtree_control", "+memory")
    directory, reason = sandbox_parent(cgroup / LEAF, f"{SCOPE}/{LEAF}", "pids", proc=proc, euid=OWNER)
    assert directory is None and f"pids is not delegated to {cgroup} " in reason and "Delegate=yes" in reason


def test_root_takes_over_the_root_of_its_cgroup_namespace(tree) -> None:
    cgroup, proc, kernel = tree
    os.chown(cgroup, 0, -1)
    assert sandbox_parent(cgroup, "/", "memory", proc=proc, euid=0) == (cgroup, "")
    assert kernel.log[-1] == ("cgroup.subtree_control", "+memory +pids") and len(kernel.log) == 3


def test_a_cgroup_systemd_marks_delegated_is_taken_over_by_root(tree) -> None:
    cgroup, proc, kernel = tree
    os.chown(cgroup, 0, -1)
    try:
        os.setxattr(cgroup, "user.delegate", b"1")
    except OSError as exc:
        pytest.skip(f"this file system keeps no user.* attributes: {exc}")
    assert sandbox_parent(cgroup, SCOPE, "memory", proc=proc, euid=0) == (cgroup, "")
    assert len(kernel.log) == 3


def test_the_hierarchy_root_enables_the_controllers_without_moving_anything(tree) -> None:
    cgroup, proc, kernel = tree
    (cgroup / "cgroup.type").unlink()  # the real root has none; it may hold processes and kernel threads
    assert sandbox_parent(cgroup, "/", "memory", proc=proc, euid=0) == (cgroup, "")
    assert kernel.log == [("cgroup.subtree_control", "+memory +pids")] and not (cgroup / LEAF).exists()


@pytest.mark.parametrize("case", ["root_undelegated", "another_users_cgroup", "not_offered", "another_users_process"])
def test_a_cgroup_not_ours_to_take_over_is_left_alone(tree, case: str) -> None:
    cgroup, proc, kernel = tree
    euid, expected = OWNER, ""
    if case == "root_undelegated":
        euid, expected = 0, "is not delegated to uid 0"
    elif case == "another_users_cgroup":
        euid, expected = OWNER + 1, f"is not delegated to uid {OWNER + 1}"
    elif case == "not_offered":
        (cgroup / "cgroup.controllers").write_text("cpu pids\n")
        expected = "memory is not delegated"
    else:
        if os.geteuid() != 0:
            pytest.skip("giving a process another owner needs root")
        os.chown(proc / "11", OWNER + 1, -1)
        expected = f"process 11 in {cgroup} belongs to uid {OWNER + 1}"
    directory, reason = sandbox_parent(cgroup, SCOPE, "memory", proc=proc, euid=euid)
    assert directory is None and expected in reason, reason
    assert "systemd-run --user --scope -p Delegate=yes" in reason
    assert kernel.log == [] and _read(cgroup / "cgroup.procs") == ["10", "11"]


@pytest.mark.parametrize("refusal", ["busy", "denied"])
def test_a_kernel_refusal_is_a_reason_not_an_exception(tree, refusal: str) -> None:
    cgroup, proc, kernel = tree
    if refusal == "busy":  # processes keep forking into the cgroup
        kernel.fork_in = list(range(100, 100 + delegation.ATTEMPTS))
    else:
        kernel.refuse_enabling = PermissionError(errno.EACCES, "Permission denied")
    directory, reason = sandbox_parent(cgroup, SCOPE, "memory", proc=proc, euid=OWNER)
    assert directory is None, reason
    assert f"enabling +memory +pids in {cgroup}/cgroup.subtree_control failed" in reason
    assert ("Device or resource busy" if refusal == "busy" else "Permission denied") in reason
    assert [entry for entry in kernel.log if entry[0] == "cgroup.subtree_control"] == \
        [("cgroup.subtree_control", "+memory +pids")] * (delegation.ATTEMPTS if refusal == "busy" else 1)
