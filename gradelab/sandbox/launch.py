"""Launching the untrusted sandbox S, from the parent side: this module runs in the grading worker,
which forks each sandbox (the test-runner zygote is a separate process and never forks one).

The parent creates per-child cgroups (gradelab.sandbox.cgroups) and forks an intermediate child C,
which enters the isolation layers (gradelab.sandbox.layers) and forks G, the sandbox process that
runs the target. The parent reads G's report of which layers are active, waits for, kills and
cleans up after the sandbox, and tells whether the memory cgroup killed something.
"""

from __future__ import annotations

import functools
import json
import os
import select
import signal
import sys
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from gradelab.errors import GradingEnvironmentError
from gradelab.sandbox import cgroups, layers
from gradelab.sandbox.layers import LAYERS, close_fds_except

__all__ = ["MAX_SLOTS", "REPORT_TIMEOUT", "UID_BASE", "Sandbox", "SandboxError", "SandboxLimits", "close_fds_except",
           "probe_layers"]

UID_BASE = 61000  # slot n runs as uid/gid UID_BASE + n; no /etc/passwd entry needed
MAX_SLOTS = 4000  # keeps the uids below 65000
REPORT_TIMEOUT = 10.0  # seconds the parent waits for the child's layer report
_CAP_SETGID, _CAP_SETUID = 6, 7
_PR_GET_SECCOMP = 21


@dataclass(frozen=True)
class SandboxLimits:
    """What the kernel enforces on one sandbox (cgroups, rlimits, tmpfs sizes); the grader fills it from
    the config's `limits:` (gradelab.config.Limits)."""

    memory_mb: int = 2048          # memory cgroup limit of the whole sandbox
    address_space_mb: int = 6144   # RLIMIT_AS (torch needs ~0.7 GB of VmSize after import)
    pids: int = 64                 # pids cgroup + RLIMIT_NPROC (with a dedicated uid)
    open_files: int = 256          # RLIMIT_NOFILE (matplotlib + torch need > 64)
    file_size_mb: int = 16         # RLIMIT_FSIZE
    cpu_seconds: int = 900         # RLIMIT_CPU backstop; the parent enforces wall-clock deadlines
    tmpfs_mb: int = 64             # size of the private /tmp (the sandbox's only writable place) and /dev/shm


class SandboxError(GradingEnvironmentError, RuntimeError):
    """The sandbox could not be created, or its cgroups could not be removed."""


# ---------------------------------------------------------------- probing (no layer is applied)


def probe_layers() -> dict[str, str]:
    """Which isolation layers this machine offers, without applying any: keys "namespaces", "uid",
    "rlimits", "cgroup_memory", "cgroup_pids", "landlock", "seccomp", "no_new_privs"; values "available" or
    "unavailable: <reason>". Cheap; cached."""
    return dict(_probe())


@functools.cache
def _probe() -> tuple[tuple[str, str], ...]:
    root = os.geteuid() == 0
    found = {
        "namespaces": _probe_namespaces(root),
        "uid": "available" if root and layers.has_caps(_CAP_SETUID, _CAP_SETGID) else "unavailable: not running as root",
        "rlimits": "available",
        "cgroup_memory": cgroups.probe("memory"),
        "cgroup_pids": cgroups.probe("pids"),
        "landlock": _probe_landlock(),
        "seccomp": _probe_seccomp(),
        "no_new_privs": "available" if layers.libc.prctl(layers.PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) >= 0
        else "unavailable: prctl(PR_GET_NO_NEW_PRIVS) failed",
    }
    return tuple((key, found[key]) for key in LAYERS)


def _read_sysctl(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _probe_namespaces(root: bool) -> str:
    if root:
        return "available" if layers.has_caps(layers.CAP_SYS_ADMIN) else "unavailable: root without CAP_SYS_ADMIN"
    if _read_sysctl("/proc/sys/user/max_user_namespaces") == "0":
        return "unavailable: user namespaces disabled (user.max_user_namespaces = 0)"
    if _read_sysctl("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        return "unavailable: unprivileged user namespaces disabled (kernel.unprivileged_userns_clone = 0)"
    if _read_sysctl("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
        return "unavailable: AppArmor restricts unprivileged user namespaces"
    return "available"


def _probe_landlock() -> str:
    if layers.landlock is None:
        return f"unavailable: {layers.LANDLOCK_MISSING}"
    try:
        return "available" if layers.landlock.landlock_abi_version() >= 1 else "unavailable: ABI version < 1"
    except OSError as exc:
        return f"unavailable: {getattr(exc, 'reason', None) or exc}"


def _probe_seccomp() -> str:
    if layers.pyseccomp is None:
        return f"unavailable: {layers.SECCOMP_MISSING}"
    if layers.libc.prctl(_PR_GET_SECCOMP, 0, 0, 0, 0) < 0:
        return "unavailable: kernel without seccomp"
    return "available"


def _remove_cgroups(directories: Sequence[Path]) -> None:
    for directory in set(directories):
        try:
            cgroups.remove(directory)
        except OSError as exc:
            raise SandboxError(f"cannot remove cgroup {directory}: {exc}") from None


# ---------------------------------------------------------------- parent-side handle


@dataclass(frozen=True)
class Plan:
    """Everything the child needs, computed in the parent before fork."""
    limits: SandboxLimits
    uid: int
    root: bool
    keep_fds: tuple[int, ...]
    hide: tuple[str, ...]  # resolved
    read_trees: tuple[str, ...]  # absolute candidates for read-only Landlock rules, before removing `hide`
    require: bool
    report_fd: int
    cgroup_joins: tuple[tuple[str, str], ...]  # (layer, file C writes "0" to, to join the cgroup)
    statuses: tuple[tuple[str, str], ...]  # layers already decided in the parent (unavailable or failed)
    main_thread: bool
    parent_mount_ns: tuple[int, int]


class Sandbox:
    """Parent-side handle of one sandboxed child."""

    def __init__(self, pid: int, cgroup_dirs: dict[str, Path]) -> None:
        self.pid = pid
        self.layers: dict[str, str] = {}
        self._cgroups = dict(cgroup_dirs)  # controller -> directory; emptied by cleanup()
        self._status: int | None = None
        self._oom_killed: bool | None = None  # cached by cleanup(), before the cgroups go

    @classmethod
    def spawn(cls, target: Callable[[], int], *, limits: SandboxLimits, slot: int, keep_fds: Sequence[int] = (),
              hide: Sequence[Path] = (), require: bool = False) -> Sandbox:
        """Fork a child that enters every available layer, then runs target() and exits with its return code via
        os._exit (never returns into the caller's stack; exceptions -> exit code 70 after printing a one-line message to fd 2).
        `slot` picks a dedicated unprivileged uid/gid (e.g. 61000 + slot; no /etc/passwd entry needed) and a cgroup name,
        so parallel sandboxes never share an RLIMIT_NPROC budget. `keep_fds` stay open in the child (the RPC socket);
        every other fd above 2 is closed. `hide` are directories (or files) the child must not see: tmpfs mounted over
        directories / /dev/null bind-mounted over files in its mount namespace, AND left out of Landlock.
        With require=True the child exits with code 78 (and reports why) if any layer that probe_layers() said
        'available' fails to apply, or if any layer is unavailable at all.

        The child's stdin is /dev/null. Exit code 71 means the sandbox could not be set up at all. Raises
        SandboxError (after killing the child and removing its cgroups) if no layer report arrives within
        REPORT_TIMEOUT seconds.
        """
        if not 0 <= slot < MAX_SLOTS:
            raise ValueError(f"slot must be in [0, {MAX_SLOTS}), got {slot}")
        probe = dict(_probe())
        cgroups_made, statuses = cgroups.create(f"gradelab-{os.getpid()}-{slot}", limits, probe)
        for key in LAYERS:
            if probe[key] != "available":
                statuses[key] = probe[key]
        # "0" joins the writing thread. Through cgroup v1's `tasks` file that is cheap: moving a
        # whole thread group (cgroup.procs) takes a global lock that waits for an RCU grace period,
        # 6-25 ms here. C is single-threaded (just forked), so its thread is the whole process.
        joins = [(key, str(cgroups_made[controller] / ("cgroup.procs" if cgroups.is_v2(cgroups_made[controller]) else "tasks")))
                 for key, controller in (("cgroup_memory", "memory"), ("cgroup_pids", "pids"))
                 if controller in cgroups_made]
        # This package's directory (code only), for what the sandbox imports once its layers are in place.
        package_dir = os.path.dirname(os.path.abspath(__file__))
        # The working directory (sys.path[0] under `python -m`) is where instructors keep submissions
        # and results: never a read tree by default.
        cwd = os.getcwd()
        read_trees = [*layers.READ_ONLY_TREES, sys.prefix, sys.base_prefix, sys.exec_prefix, package_dir,
                      *(entry for entry in sys.path if entry and os.path.abspath(entry) != cwd)]
        report_read, report_write = os.pipe()
        plan = Plan(
            limits=limits, uid=UID_BASE + slot, root=os.geteuid() == 0, keep_fds=tuple(keep_fds),
            hide=tuple(os.path.realpath(p) for p in hide),
            read_trees=tuple(dict.fromkeys(os.path.abspath(p) for p in read_trees)),
            require=require, report_fd=report_write, cgroup_joins=tuple(joins), statuses=tuple(statuses.items()),
            main_thread=threading.current_thread() is threading.main_thread(),
            parent_mount_ns=layers.mount_namespace(),
        )
        for stream in (sys.stdout, sys.stderr):  # or the child would print the parent's buffered text again
            with suppress(Exception):
                stream.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(report_read)
            os.close(report_write)
            _remove_cgroups(cgroups_made.values())
            raise SandboxError(f"fork failed: {exc}") from None
        if pid == 0:
            layers.intermediate_main(target, plan)
        os.close(report_write)
        sandbox = cls(pid, cgroups_made)
        try:
            sandbox.layers = _read_report(report_read, pid)
        except SandboxError:
            sandbox.cleanup()
            raise
        finally:
            os.close(report_read)
        return sandbox

    def wait(self, timeout: float | None) -> int | None:
        """Exit status (negative = killed by that signal), or None if still running after `timeout` seconds."""
        if self._status is not None:
            return self._status
        if timeout is None:
            _, status = os.waitpid(self.pid, 0)
            self._status = os.waitstatus_to_exitcode(status)
            return self._status
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._status = os.waitstatus_to_exitcode(status)
                return self._status
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.02)

    def kill(self, *, reap: bool = True) -> None:
        """SIGKILL the child (the whole pid namespace dies with it) and reap it; with reap=False,
        return at once and let `cleanup()` reap it later (the kernel tears it down meanwhile)."""
        if self._status is None:
            with suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        for directory in set(self._cgroups.values()):  # also stragglers that no pid namespace took down
            for pid in cgroups.pids(directory):
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if reap:
            self.wait(None)

    def cleanup(self) -> None:
        """Remove the per-child cgroups (killing and reaping the child first); idempotent."""
        if self._status is None:
            self.kill()
        if self._oom_killed is None:
            self._oom_killed = self._oom_kill_count() > 0
        _remove_cgroups(self._cgroups.values())
        self._cgroups.clear()

    @property
    def oom_killed(self) -> bool:
        """Whether the memory cgroup killed something (still known after cleanup())."""
        if self._oom_killed is not None:
            return self._oom_killed
        return self._oom_kill_count() > 0

    def _oom_kill_count(self) -> int:
        memory = self._cgroups.get("memory")
        return cgroups.oom_kills(memory) if memory else 0


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
