"""The per-sandbox cgroups, created, limited and removed by the parent (the grading worker):
a memory cgroup (whose OOM kills are counted) and a pids cgroup, on cgroup v1 or v2.

Each sandbox gets cgroups of a fresh name, `gradelab-s<slot>-<n>`: one left behind busy (a
process that would not die in time) never stands in for the next sandbox's. The slot's lease
(gradelab.sandbox.slots) tells whether the worker that made a cgroup still lives; `sweep` removes
those of dead workers.
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
import re
import signal
import time
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Collection, ContextManager

from gradelab.sandbox import delegation
from gradelab.sandbox.delegation import write_file

if TYPE_CHECKING:
    from gradelab.sandbox.launch import SandboxLimits

CLEANUP_TIMEOUT = 5.0  # seconds remove() keeps trying to empty and remove a cgroup
CONTROLLERS = {"cgroup_memory": "memory", "cgroup_pids": "pids"}  # layer -> controller
_NAME = re.compile(r"gradelab-s(\d+)-(\d+)")
_serial = itertools.count(1)


def probe(controller: str) -> str:
    directory, reason = _own_cgroup_dir(controller)
    if directory is None:
        return f"unavailable: {reason}"
    if not os.access(directory, os.W_OK):
        return f"unavailable: {directory} is not writable"
    return "available"


@functools.cache
def _own_cgroup_dir(controller: str) -> tuple[Path | None, str]:
    """The directory the sandboxes' cgroups for `controller` go in: this process's own cgroup on a v1
    mount, else on v2 its cgroup once that enables the controller for its children (taking over a
    cgroup delegated to us: gradelab.sandbox.delegation), or (None, reason)."""
    memberships = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else ("",):
            memberships[name] = path
    mounts = []  # (fstype, super options, mount root, mount point)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        fields, (fstype, _, super_options) = left.split(), right.split(" ", 2)
        if fstype in ("cgroup", "cgroup2"):
            mounts.append((fstype, super_options.split(","), fields[3], fields[4]))
    for fstype, options, mount_root, mount_point in mounts:
        if fstype == "cgroup" and controller in options and controller in memberships:
            return _mounted_path(mount_point, mount_root, memberships[controller])
    for fstype, _, mount_root, mount_point in mounts:
        if fstype == "cgroup2" and "" in memberships:
            directory, reason = _mounted_path(mount_point, mount_root, memberships[""])
            if directory is None:
                return None, reason
            return delegation.sandbox_parent(directory, memberships[""], controller)
    return None, f"no cgroup hierarchy with the {controller} controller"


def _mounted_path(mount_point: str, mount_root: str, cgroup_path: str) -> tuple[Path | None, str]:
    relative = os.path.relpath(cgroup_path, mount_root)
    if relative.startswith(".."):
        return None, f"cgroup {cgroup_path} is outside the mounted hierarchy {mount_root}"
    directory = Path(mount_point, relative)
    return (directory, "") if directory.is_dir() else (None, f"{directory} does not exist")


def is_v2(directory: Path) -> bool:
    return (directory / "cgroup.controllers").exists()


def _parents(offered: Collection[str]) -> dict[str, Path]:
    """{controller: the directory our sandboxes' cgroups go in} for the offered layers."""
    found = {}
    for key, controller in CONTROLLERS.items():
        if key in offered and (parent := _own_cgroup_dir(controller)[0]) is not None:
            found[controller] = parent
    return found


def create(slot: int, limits: SandboxLimits, offered: dict[str, str]) -> tuple[dict[str, Path], dict[str, str]]:
    """Create the child's cgroups under a name no directory has yet: ({controller: directory},
    {layer: failure}). On cgroup v2 both controllers share one directory."""
    parents = _parents([key for key, state in offered.items() if state == "available"])
    name = next(name for name in (f"gradelab-s{slot}-{n}" for n in _serial)
                if not any((parent / name).exists() for parent in parents.values()))
    directories: dict[str, Path] = {}
    failures: dict[str, str] = {}
    for key, controller in CONTROLLERS.items():
        if controller not in parents:
            continue
        directory = parents[controller] / name
        shared = directory in directories.values()
        try:
            if not shared:
                directory.mkdir()
            _set_limit(directory, controller, limits)
            directories[controller] = directory
        except OSError as exc:
            failures[key] = f"failed: {exc}"
            if not shared:
                with suppress(OSError):
                    os.rmdir(directory)
    return directories, failures


def _set_limit(directory: Path, controller: str, limits: SandboxLimits) -> None:
    if controller == "pids":
        write_file(directory / "pids.max", str(limits.pids))
    elif is_v2(directory):
        write_file(directory / "memory.max", str(limits.memory_mb << 20))
        if (directory / "memory.swap.max").exists():
            write_file(directory / "memory.swap.max", "0")
    else:
        write_file(directory / "memory.limit_in_bytes", str(limits.memory_mb << 20))
        if (directory / "memory.memsw.limit_in_bytes").exists():  # only with swap accounting
            write_file(directory / "memory.memsw.limit_in_bytes", str(limits.memory_mb << 20))


def pids(directory: Path) -> list[int]:
    try:
        return [int(pid) for pid in (directory / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def kill_members(directory: Path) -> None:
    """SIGKILL every process in the cgroup: at once through cgroup.kill (v2), else one by one."""
    if (directory / "cgroup.kill").exists():
        with suppress(OSError):
            write_file(directory / "cgroup.kill", "1")
            return
    for pid in pids(directory):
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def remove(directory: Path, timeout: float = CLEANUP_TIMEOUT) -> None:
    """Remove a cgroup, killing what is left in it; raises OSError if it stays busy for `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.rmdir(directory)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
        # Every member is a sandbox process (a fork-bomb straggler without a pid namespace, or one still
        # exiting), forking perhaps: kill them until none is left.
        kill_members(directory)
        time.sleep(0.005)


def sweep(claim: Callable[[int], ContextManager[bool]], keep: Collection[Path],
          timeout: float = CLEANUP_TIMEOUT) -> tuple[list[Path], list[str]]:
    """Remove the sandbox cgroups (not in `keep`) of the slots that `claim` says are dead (holding
    them meanwhile, so that no worker starts using the slot), killing what is left in them:
    (removed, why others could not be)."""
    parents = set(_parents([key for key, controller in CONTROLLERS.items() if probe(controller) == "available"]).values())
    slots = set()
    for parent in parents:
        with suppress(OSError):
            slots.update(int(match[1]) for entry in parent.iterdir() if (match := _NAME.fullmatch(entry.name)))
    removed, failed = [], []
    for slot in sorted(slots):
        with claim(slot) as dead:
            if not dead:
                continue
            for directory in sorted(d for parent in parents for d in parent.glob(f"gradelab-s{slot}-*")):
                if directory in keep or not _NAME.fullmatch(directory.name):
                    continue
                try:
                    remove(directory, timeout)
                    removed.append(directory)
                except OSError as exc:
                    failed.append(f"{directory}: {exc}")
    return removed, failed


def oom_kills(directory: Path) -> int:
    name = "memory.events" if is_v2(directory) else "memory.oom_control"
    try:
        for line in (directory / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except OSError:
        pass
    return 0
