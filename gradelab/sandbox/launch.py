"""Launching the untrusted sandbox S, from the parent side: this module runs in the grading worker,
which forks each sandbox (the test-runner zygote is a separate process and never forks one).

The parent leases a host-wide slot (gradelab.sandbox.slots: the sandbox's uid and cgroup names),
creates per-child cgroups (gradelab.sandbox.cgroups) and forks an intermediate child C, which
enters the isolation layers (gradelab.sandbox.layers) and forks G, the sandbox process that runs
the target. Without root, C creates a user namespace first, whose ids the parent maps. The parent
reads G's report of the layers it applied, waits for, kills and cleans up after the sandbox, and
tells whether the memory cgroup killed something. A sandbox never outlives its worker: C kills it
when the worker's end of a lifeline pipe closes, however the worker ended.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from gradelab.errors import GradingEnvironmentError
from gradelab.sandbox import cgroups, confinement, layers, slots
from gradelab.sandbox.layers import LAYERS, close_fds_except
from gradelab.sandbox.probe import probe_layers
from gradelab.sandbox.slots import MAX_SLOTS, UID_BASE

__all__ = ["MAX_SLOTS", "REPORT_TIMEOUT", "UID_BASE", "Sandbox", "SandboxError", "SandboxLimits", "close_fds_except",
           "probe_layers", "sweep_stale_cgroups"]

REPORT_TIMEOUT = 10.0  # seconds the parent waits for the child's layer report (and its id-map request)
STALE_RETRY_TIMEOUT = 0.2  # seconds a spawn spends on cgroups an earlier cleanup could not remove


@dataclass(frozen=True)
class SandboxLimits:
    """What the kernel enforces on one sandbox (cgroups, rlimits, tmpfs sizes); the grader fills it from
    the config's `limits:` (gradelab.config.Limits)."""

    memory_mb: int = 2048          # memory cgroup limit of the whole sandbox
    address_space_mb: int = 6144   # RLIMIT_AS (torch needs ~0.7 GB of VmSize after import)
    pids: int = 64                 # pids cgroup + RLIMIT_NPROC (with a dedicated uid or a user namespace)
    open_files: int = 256          # RLIMIT_NOFILE (matplotlib + torch need > 64)
    file_size_mb: int = 16         # RLIMIT_FSIZE
    cpu_seconds: int = 900         # RLIMIT_CPU backstop; the parent enforces wall-clock deadlines
    tmpfs_mb: int = 64             # size of the private /tmp (the sandbox's only writable place) and /dev/shm


class SandboxError(GradingEnvironmentError, RuntimeError):
    """The sandbox could not be created (no free slot, a fork that failed, no layer report)."""


# ---------------------------------------------------------------- slots and their cgroups

_live: dict[int, list[Sandbox]] = {}  # requested slot -> this process's sandboxes not yet cleaned up
_unremoved: list[Path] = []  # cgroups a cleanup could not remove (retried by later spawns)


def _forget_the_parents_sandboxes() -> None:
    """In a forked child: the parent's sandboxes are not ours to tear down, and our copies of their
    lifelines must not keep them alive once the parent is gone."""
    for boxes in _live.values():
        for box in boxes:
            with suppress(OSError):
                os.close(box._lifeline)
    _live.clear()
    _unremoved.clear()


os.register_at_fork(after_in_child=_forget_the_parents_sandboxes)


def sweep_stale_cgroups(timeout: float = cgroups.CLEANUP_TIMEOUT) -> list[str]:
    """Remove the cgroups that sandboxes of crashed workers (this machine's, any process) left
    behind, killing what still runs in them; why some could not be removed. The first spawn of
    each slot in a process does this too."""
    keep = {directory for boxes in _live.values() for box in boxes for directory in box.cgroup_dirs}
    removed, failed = cgroups.sweep(slots.claimed_if_unused, keep, timeout)
    _unremoved[:] = [directory for directory in _unremoved if directory.exists() and directory not in removed]
    return failed


def _lease(slot: int) -> slots.Lease:
    new = not slots.is_held(slot)
    try:
        lease = slots.lease(slot)
    except (slots.SlotError, OSError) as exc:
        raise SandboxError(f"no sandbox slot: {exc}") from None
    if new or _unremoved:
        sweep_stale_cgroups(timeout=cgroups.CLEANUP_TIMEOUT if new else STALE_RETRY_TIMEOUT)
    return lease


# ---------------------------------------------------------------- parent-side handle


@dataclass(frozen=True)
class Plan:
    """Everything the child needs, computed in the parent before fork."""
    limits: SandboxLimits
    uid: int  # what G drops to, unless the "uid" layer is unavailable
    root: bool
    user_namespace: bool  # C creates one first (without root)
    keep_fds: tuple[int, ...]
    hide: tuple[str, ...]  # resolved
    read_trees: tuple[str, ...]  # absolute candidates for read-only Landlock rules, before removing `hide`
    require: bool
    report_fd: int
    lifeline_fd: int  # read end of a pipe whose write end only the parent holds
    id_map_fd: int  # C's end of the socket over which the parent maps its ids, or -1 (C maps its own)
    parent_pid: int
    cgroup_joins: tuple[tuple[str, str], ...]  # (layer, file C writes "0" to, to join the cgroup)
    statuses: tuple[tuple[str, str], ...]  # layers already decided in the parent (unavailable or failed)
    main_thread: bool
    parent_mount_ns: tuple[int, int]


class Sandbox:
    """Parent-side handle of one sandboxed child."""

    def __init__(self, pid: int, cgroup_dirs: dict[str, Path], *, slot: int = 0, lifeline: int = -1) -> None:
        self.pid = pid
        # After spawn: each layer -> "available" (this box applied it), "unavailable: why" (this
        # machine does not offer it) or "failed: why" (offered, but it could not be applied to this box).
        self.layers: dict[str, str] = {}
        self.uid: int | None = None  # the uid the sandbox runs as (inside its user namespace, if any)
        self.cleanup_problem: str | None = None  # why cleanup() could not remove a cgroup
        self._cgroups = dict(cgroup_dirs)  # controller -> directory; emptied by cleanup()
        self._slot = slot
        self._lifeline = lifeline  # closing it makes C kill the sandbox
        self._status: int | None = None
        self._oom_killed: bool | None = None  # cached by cleanup(), before the cgroups go
        _live.setdefault(slot, []).append(self)

    @property
    def cgroup_dirs(self) -> list[Path]:
        return list(dict.fromkeys(self._cgroups.values()))

    @classmethod
    def spawn(cls, target: Callable[[], int], *, limits: SandboxLimits, slot: int, keep_fds: Sequence[int] = (),
              hide: Sequence[Path] = (), require: bool = False) -> Sandbox:
        """Fork a child that enters every available layer, then runs target() and exits with its return code via
        os._exit (never returns into the caller's stack; exceptions -> exit code 70 after printing a one-line message to fd 2).
        `slot` asks for a host-wide sandbox slot (that number if no other process on the machine holds it, else
        the next free one, kept until this process exits): a dedicated unprivileged uid/gid (UID_BASE + n; no
        /etc/passwd entry needed) and fresh cgroups, so parallel sandboxes never share an RLIMIT_NPROC budget.
        The previous sandboxes of this process on the same slot are torn down first. `keep_fds` stay open in the
        child (the RPC socket); every other fd above 2 is closed. `hide` are directories (or files) the child must
        not see: tmpfs mounted over directories / /dev/null bind-mounted over files in its mount namespace, AND
        left out of Landlock. `layers` then says what this sandbox applied. With require=True the child exits
        with code 78 (and reports why) if any layer is not applied, whether unavailable here or failed.

        The child's stdin is /dev/null. Exit code 71 means the sandbox could not be set up at all. Raises
        SandboxError (after killing the child and removing its cgroups) if no slot is free or no layer report
        arrives within REPORT_TIMEOUT seconds.
        """
        if not 0 <= slot < MAX_SLOTS:
            raise ValueError(f"slot must be in [0, {MAX_SLOTS}), got {slot}")
        for previous in _live.pop(slot, []):
            previous.cleanup()
        lease = _lease(slot)
        probe = probe_layers()
        cgroups_made, statuses = cgroups.create(lease.number, limits, probe)
        for key in LAYERS:
            if probe[key] != "available":
                statuses[key] = probe[key]
        # "0" joins the writing thread. Through cgroup v1's `tasks` file that is cheap: moving a
        # whole thread group (cgroup.procs) takes a global lock that waits for an RCU grace period,
        # 6-25 ms here. C is single-threaded (just forked), so its thread is the whole process.
        joins = [(key, str(cgroups_made[controller] / ("cgroup.procs" if cgroups.is_v2(cgroups_made[controller]) else "tasks")))
                 for key, controller in cgroups.CONTROLLERS.items() if controller in cgroups_made]
        # This package's directory (code only), for what the sandbox imports once its layers are in place.
        package_dir = os.path.dirname(os.path.abspath(__file__))
        # The working directory (sys.path[0] under `python -m`) is where instructors keep submissions
        # and results: never a read tree by default.
        cwd = os.getcwd()
        read_trees = [*confinement.READ_ONLY_TREES, sys.prefix, sys.base_prefix, sys.exec_prefix, package_dir,
                      *(entry for entry in sys.path if entry and os.path.abspath(entry) != cwd)]
        root = os.geteuid() == 0
        # Without root, the slot's subordinate ids exist only once the parent has mapped them.
        map_ids = not root and probe["uid"] == "available" and probe["namespaces"] == "available"
        id_map_parent, id_map_child = socket.socketpair() if map_ids else (None, None)
        report_read, report_write = os.pipe()
        lifeline_read, lifeline_write = os.pipe2(os.O_CLOEXEC)
        plan = Plan(
            limits=limits, uid=UID_BASE + lease.number, root=root, user_namespace=not root, keep_fds=tuple(keep_fds),
            hide=tuple(os.path.realpath(p) for p in hide),
            read_trees=tuple(dict.fromkeys(os.path.abspath(p) for p in read_trees)),
            require=require, report_fd=report_write, lifeline_fd=lifeline_read,
            id_map_fd=id_map_child.fileno() if id_map_child else -1, parent_pid=os.getpid(),
            cgroup_joins=tuple(joins), statuses=tuple(statuses.items()),
            main_thread=threading.current_thread() is threading.main_thread(),
            parent_mount_ns=layers.mount_namespace(),
        )
        for stream in (sys.stdout, sys.stderr):  # or the child would print the parent's buffered text again
            with suppress(Exception):
                stream.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            pid = -1
            failure = exc
        if pid == 0:
            layers.intermediate_main(target, plan)
        for fd in (report_write, lifeline_read):
            os.close(fd)
        if id_map_child:
            id_map_child.close()
        sandbox = cls(max(pid, 0), cgroups_made, slot=slot, lifeline=lifeline_write)
        try:
            if pid < 0:
                sandbox._status = layers.EXIT_SETUP_FAILED
                raise SandboxError(f"fork failed: {failure}")
            if id_map_parent:
                _map_child_ids(id_map_parent, pid, lease.number)
            sandbox.layers = _read_report(report_read, pid)
        except SandboxError:
            sandbox.cleanup()
            raise
        finally:
            os.close(report_read)
            if id_map_parent:
                id_map_parent.close()
        if sandbox.layers["uid"] == "available":
            sandbox.uid = plan.uid
        return sandbox

    def wait(self, timeout: float | None) -> int | None:
        """Exit status (negative = killed by that signal), or None if still running after `timeout` seconds."""
        if self._status is not None:
            return self._status
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.001
        while True:
            try:
                pid, status = os.waitpid(self.pid, 0 if deadline is None else os.WNOHANG)
            except ChildProcessError:  # reaped by someone else: gone, how is not known
                self._status = -signal.SIGKILL
                return self._status
            if pid:
                self._status = os.waitstatus_to_exitcode(status)
                return self._status
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.02)

    def kill(self, *, reap: bool = True) -> None:
        """SIGKILL the child (the whole pid namespace dies with it) and what is left in its cgroups, and
        reap it; with reap=False, return at once and let `cleanup()` reap it later (the kernel tears it
        down meanwhile). Never raises."""
        if self._status is None and self.pid > 0:
            with suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, signal.SIGKILL)
        for directory in self.cgroup_dirs:  # also stragglers that no pid namespace took down
            cgroups.kill_members(directory)
        if reap and self.pid > 0:
            self.wait(None)

    def cleanup(self) -> None:
        """Kill and reap the child, kill whatever is left in its cgroups and remove them; idempotent and
        never raises. A cgroup that stays busy is left (`cleanup_problem` says why): later spawns retry
        it, and never reuse its name."""
        try:
            if self._status is None:
                self.kill()
            if self._oom_killed is None:
                self._oom_killed = self._oom_kill_count() > 0
            for directory in self.cgroup_dirs:
                try:
                    cgroups.remove(directory)
                except OSError as exc:
                    self.cleanup_problem = f"cannot remove cgroup {directory}: {exc}"
                    _unremoved.append(directory)
        except Exception as exc:  # noqa: BLE001 - a cleanup that raised would keep the next sandbox from starting
            self.cleanup_problem = f"cleanup failed: {type(exc).__name__}: {exc}"
        self._cgroups.clear()
        if self._lifeline >= 0:
            os.close(self._lifeline)
            self._lifeline = -1
        with suppress(ValueError):
            _live.get(self._slot, []).remove(self)

    @property
    def oom_killed(self) -> bool:
        """Whether the memory cgroup killed something (still known after cleanup())."""
        if self._oom_killed is not None:
            return self._oom_killed
        return self._oom_kill_count() > 0

    def _oom_kill_count(self) -> int:
        memory = self._cgroups.get("memory")
        return cgroups.oom_kills(memory) if memory else 0


def _map_child_ids(channel: socket.socket, pid: int, number: int) -> None:
    """Answer C's request (sent once it has created its user namespace) by mapping its ids."""
    channel.settimeout(REPORT_TIMEOUT)
    try:
        if channel.recv(1) != b"?":
            return  # C died, or did not get as far: its layer report says why
        channel.sendall((slots.map_ids(pid, number) or layers.ID_MAP_DONE).encode())
    except OSError as exc:
        raise SandboxError(f"sandbox child {pid}: mapping its uids failed: {exc}") from None


def _read_report(fd: int, pid: int) -> dict[str, str]:
    deadline = time.monotonic() + REPORT_TIMEOUT
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise SandboxError(f"sandbox child {pid} sent no layer report within {REPORT_TIMEOUT} s")
        chunk = os.read(fd, 65536)
        if not chunk:
            raise SandboxError(f"sandbox child {pid} exited before reporting its layers")
        data += chunk
    try:
        report = json.loads(data)
    except ValueError as exc:
        raise SandboxError(f"malformed layer report: {exc}") from None
    if type(report) is not dict or set(report) != set(LAYERS) or not all(type(v) is str for v in report.values()):
        raise SandboxError(f"malformed layer report: {data[:200]!r}")
    return report
