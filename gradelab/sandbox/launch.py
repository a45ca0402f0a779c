"""Isolation layers that the untrusted sandbox child S enters right after it forks from the zygote.

Design and measurements: shared notes `sandbox.md` §4. The parent creates per-child cgroups and forks an
intermediate child C, which joins the cgroups, unshares the namespaces and forks the grandchild G (pid 1
of the new pid namespace). C only waits for G and mirrors its exit status; G mounts a private /proc,
/tmp and /dev/shm, hides the `hide` paths, sets rlimits, clears the environment, drops to a dedicated
uid, enters Landlock and seccomp, reports what it applied and runs the target.

Everything G needs is imported at module level: after the uid drop and Landlock, a lazy import can fail.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import resource
import select
import signal
import socket
import sys
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NoReturn, Sequence

from gradelab.errors import GradingEnvironmentError

try:
    import landlock
    from landlock import FSAccess

    _LANDLOCK_MISSING = ""
except ImportError as exc:  # pragma: no cover - the project depends on it
    landlock = None
    _LANDLOCK_MISSING = f"package landlock not importable: {exc}"

try:
    import pyseccomp

    _SECCOMP_MISSING = ""
except (ImportError, RuntimeError, OSError) as exc:  # RuntimeError: libseccomp.so.2 not found
    pyseccomp = None
    _SECCOMP_MISSING = f"pyseccomp not usable: {exc}"

LAYERS = ("namespaces", "uid", "rlimits", "cgroup_memory", "cgroup_pids", "landlock", "seccomp", "no_new_privs")
UID_BASE = 61000  # slot n runs as uid/gid UID_BASE + n; no /etc/passwd entry needed
MAX_SLOTS = 4000  # keeps the uids below 65000
EXIT_TARGET_FAILED = 70  # target() raised
EXIT_SETUP_FAILED = 71  # the sandbox could not be set up at all (e.g. fork failed)
EXIT_LAYER_MISSING = 78  # require=True and a layer is not active
REPORT_TIMEOUT = 10.0  # seconds the parent waits for the child's layer report
CLEANUP_TIMEOUT = 5.0  # seconds cleanup() keeps trying to empty and remove a cgroup

_CLONE_NEWNS = 0x00020000
_CLONE_NEWCGROUP = 0x02000000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_CLONE_NEWTIME = 0x00000080
_CLONE_NEW_ANY = (_CLONE_NEWNS, _CLONE_NEWCGROUP, _CLONE_NEWUTS, _CLONE_NEWIPC, _CLONE_NEWUSER, _CLONE_NEWPID,
                  _CLONE_NEWNET, _CLONE_NEWTIME)
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
_MS_BIND, _MS_REC, _MS_PRIVATE = 0x1000, 0x4000, 0x40000
_PR_SET_PDEATHSIG = 1
_PR_GET_SECCOMP = 21
_PR_SET_NO_NEW_PRIVS = 38
_PR_GET_NO_NEW_PRIVS = 39
_CAP_SETGID, _CAP_SETUID, _CAP_SYS_ADMIN = 6, 7, 21
_TIOCSTI, _TIOCLINUX = 0x5412, 0x541C

_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = (ctypes.c_int,)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)

# Read-only trees for Landlock (plus sys.prefix, sys.path and `readable`); the sandbox writes only to its
# private /tmp and /dev/shm.
_READ_ONLY_TREES = ("/usr", "/lib", "/lib64", "/bin", "/etc", "/opt")
_DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom")
# Syscalls that only serve escapes, kernel attack surface or attacks on other processes. The spec's list,
# plus the new mount API and open_by_handle_at/pidfd_getfd, which reach the same things by another door.
_DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2", "pivot_root", "chroot", "unshare",
    "setns", "bpf", "keyctl", "add_key", "request_key", "perf_event_open", "userfaultfd", "io_uring_setup",
    "io_uring_enter", "io_uring_register", "kexec_load", "kexec_file_load", "init_module", "finit_module",
    "delete_module", "reboot", "swapon", "swapoff", "settimeofday", "clock_settime",
    "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "open_by_handle_at", "pidfd_getfd",
)


@dataclass(frozen=True)
class Limits:
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
        "uid": "available" if root and _has_caps(_CAP_SETUID, _CAP_SETGID) else "unavailable: not running as root",
        "rlimits": "available",
        "cgroup_memory": _probe_cgroup("memory"),
        "cgroup_pids": _probe_cgroup("pids"),
        "landlock": _probe_landlock(),
        "seccomp": _probe_seccomp(),
        "no_new_privs": "available" if _libc.prctl(_PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) >= 0
        else "unavailable: prctl(PR_GET_NO_NEW_PRIVS) failed",
    }
    return tuple((key, found[key]) for key in LAYERS)


def _has_caps(*caps: int) -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            effective = int(line.split()[1], 16)
            return all(effective >> cap & 1 for cap in caps)
    return False


def _read_sysctl(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _probe_namespaces(root: bool) -> str:
    if root:
        return "available" if _has_caps(_CAP_SYS_ADMIN) else "unavailable: root without CAP_SYS_ADMIN"
    if _read_sysctl("/proc/sys/user/max_user_namespaces") == "0":
        return "unavailable: user namespaces disabled (user.max_user_namespaces = 0)"
    if _read_sysctl("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        return "unavailable: unprivileged user namespaces disabled (kernel.unprivileged_userns_clone = 0)"
    if _read_sysctl("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
        return "unavailable: AppArmor restricts unprivileged user namespaces"
    return "available"


def _probe_cgroup(controller: str) -> str:
    directory, reason = _own_cgroup_dir(controller)
    if directory is None:
        return f"unavailable: {reason}"
    if not os.access(directory, os.W_OK):
        return f"unavailable: {directory} is not writable"
    return "available"


def _probe_landlock() -> str:
    if landlock is None:
        return f"unavailable: {_LANDLOCK_MISSING}"
    try:
        return "available" if landlock.landlock_abi_version() >= 1 else "unavailable: ABI version < 1"
    except OSError as exc:
        return f"unavailable: {getattr(exc, 'reason', None) or exc}"


def _probe_seccomp() -> str:
    if pyseccomp is None:
        return f"unavailable: {_SECCOMP_MISSING}"
    if _libc.prctl(_PR_GET_SECCOMP, 0, 0, 0, 0) < 0:
        return "unavailable: kernel without seccomp"
    return "available"


# ---------------------------------------------------------------- cgroups (created and removed by the parent)


@functools.cache
def _own_cgroup_dir(controller: str) -> tuple[Path | None, str]:
    """The directory of this process's own cgroup for `controller` (v1 mount, else a v2 mount that
    delegates the controller to children), or (None, reason)."""
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
            try:
                delegated = controller in (directory / "cgroup.subtree_control").read_text().split()
            except OSError as exc:
                return None, str(exc)
            if delegated:
                return directory, ""
            return None, f"cgroup v2: {controller} is not enabled in {directory}/cgroup.subtree_control"
    return None, f"no cgroup hierarchy with the {controller} controller"


def _mounted_path(mount_point: str, mount_root: str, cgroup_path: str) -> tuple[Path | None, str]:
    relative = os.path.relpath(cgroup_path, mount_root)
    if relative.startswith(".."):
        return None, f"cgroup {cgroup_path} is outside the mounted hierarchy {mount_root}"
    directory = Path(mount_point, relative)
    return (directory, "") if directory.is_dir() else (None, f"{directory} does not exist")


def _is_cgroup_v2(directory: Path) -> bool:
    return (directory / "cgroup.controllers").exists()


def _write(path: Path, value: str) -> None:
    with open(path, "w") as file:
        file.write(value)


def _create_cgroups(name: str, limits: Limits, probe: dict[str, str]) -> tuple[dict[str, Path], dict[str, str]]:
    """Create the child's cgroups: ({controller: directory}, {layer: failure}). On cgroup v2 both
    controllers share one directory."""
    directories: dict[str, Path] = {}
    failures: dict[str, str] = {}
    for key, controller in (("cgroup_memory", "memory"), ("cgroup_pids", "pids")):
        if probe[key] != "available":
            continue
        parent, _ = _own_cgroup_dir(controller)
        directory = parent / name
        shared = directory in directories.values()
        try:
            if not shared:
                with suppress(FileNotFoundError):
                    os.rmdir(directory)  # left over from a crashed run of the same zygote pid and slot
                directory.mkdir()
            _set_cgroup_limit(directory, controller, limits)
            directories[controller] = directory
        except OSError as exc:
            failures[key] = f"failed: {exc}"
            if not shared:
                with suppress(OSError):
                    os.rmdir(directory)
    return directories, failures


def _set_cgroup_limit(directory: Path, controller: str, limits: Limits) -> None:
    if controller == "pids":
        _write(directory / "pids.max", str(limits.pids))
    elif _is_cgroup_v2(directory):
        _write(directory / "memory.max", str(limits.memory_mb << 20))
        if (directory / "memory.swap.max").exists():
            _write(directory / "memory.swap.max", "0")
    else:
        _write(directory / "memory.limit_in_bytes", str(limits.memory_mb << 20))
        if (directory / "memory.memsw.limit_in_bytes").exists():  # only with swap accounting
            _write(directory / "memory.memsw.limit_in_bytes", str(limits.memory_mb << 20))


def _cgroup_pids(directory: Path) -> list[int]:
    try:
        return [int(pid) for pid in (directory / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def _remove_cgroup(directory: Path) -> None:
    deadline = time.monotonic() + CLEANUP_TIMEOUT
    while True:
        try:
            os.rmdir(directory)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise SandboxError(f"cannot remove cgroup {directory}: {exc}") from None
        # Every member is a sandbox process (a fork-bomb straggler without a pid namespace, or one still
        # exiting): kill them and retry.
        for pid in _cgroup_pids(directory):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)


def _oom_kills(directory: Path) -> int:
    name = "memory.events" if _is_cgroup_v2(directory) else "memory.oom_control"
    try:
        for line in (directory / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------- parent-side handle


@dataclass(frozen=True)
class _Plan:
    """Everything the child needs, computed in the parent before fork."""
    limits: Limits
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

    def __init__(self, pid: int, cgroups: dict[str, Path]) -> None:
        self.pid = pid
        self.layers: dict[str, str] = {}
        self._cgroups = dict(cgroups)  # controller -> directory; emptied by cleanup()
        self._status: int | None = None
        self._oom_killed: bool | None = None  # cached by cleanup(), before the cgroups go

    @classmethod
    def spawn(cls, target: Callable[[], int], *, limits: Limits, slot: int, keep_fds: Sequence[int] = (),
              hide: Sequence[Path] = (), readable: Sequence[Path] = (), require: bool = False) -> Sandbox:
        """Fork a child that enters every available layer, then runs target() and exits with its return code via
        os._exit (never returns into the caller's stack; exceptions -> exit code 70 after printing a one-line message to fd 2).
        `slot` picks a dedicated unprivileged uid/gid (e.g. 61000 + slot; no /etc/passwd entry needed) and a cgroup name,
        so parallel sandboxes never share an RLIMIT_NPROC budget. `keep_fds` stay open in the child (the RPC socket);
        every other fd above 2 is closed. `hide` are directories (or files) the child must not see: tmpfs mounted over
        directories / /dev/null bind-mounted over files in its mount namespace, AND left out of Landlock. `readable`
        are extra read-only paths allowed by Landlock (e.g. the directory with the assignment's helper module).
        With require=True the child exits with code 78 (and reports why) if any layer that probe_layers() said
        'available' fails to apply, or if any layer is unavailable at all.

        The child's stdin is /dev/null. Exit code 71 means the sandbox could not be set up at all. Raises
        SandboxError (after killing the child and removing its cgroups) if no layer report arrives within
        REPORT_TIMEOUT seconds.
        """
        if not 0 <= slot < MAX_SLOTS:
            raise ValueError(f"slot must be in [0, {MAX_SLOTS}), got {slot}")
        probe = dict(_probe())
        cgroups, statuses = _create_cgroups(f"gradelab-{os.getpid()}-{slot}", limits, probe)
        for key in LAYERS:
            if probe[key] != "available":
                statuses[key] = probe[key]
        # "0" joins the writing thread. Through cgroup v1's `tasks` file that is cheap: moving a
        # whole thread group (cgroup.procs) takes a global lock that waits for an RCU grace period,
        # 6-25 ms here. C is single-threaded (just forked), so its thread is the whole process.
        joins = [(key, str(cgroups[controller] / ("cgroup.procs" if _is_cgroup_v2(cgroups[controller]) else "tasks")))
                 for key, controller in (("cgroup_memory", "memory"), ("cgroup_pids", "pids"))
                 if controller in cgroups]
        # The gradelab package is code only; the RPC server that runs in the sandbox may import from it.
        package_dir = os.path.dirname(os.path.abspath(__file__))
        # The working directory (sys.path[0] under `python -m`) is where instructors keep submissions
        # and results: never a read tree by default.
        cwd = os.getcwd()
        read_trees = [*_READ_ONLY_TREES, sys.prefix, sys.base_prefix, sys.exec_prefix, package_dir,
                      *(entry for entry in sys.path if entry and os.path.abspath(entry) != cwd),
                      *map(os.fspath, readable)]
        report_read, report_write = os.pipe()
        plan = _Plan(
            limits=limits, uid=UID_BASE + slot, root=os.geteuid() == 0, keep_fds=tuple(keep_fds),
            hide=tuple(os.path.realpath(p) for p in hide),
            read_trees=tuple(dict.fromkeys(os.path.abspath(p) for p in read_trees)),
            require=require, report_fd=report_write, cgroup_joins=tuple(joins), statuses=tuple(statuses.items()),
            main_thread=threading.current_thread() is threading.main_thread(),
            parent_mount_ns=_mount_namespace(),
        )
        for stream in (sys.stdout, sys.stderr):  # or the child would print the parent's buffered text again
            with suppress(Exception):
                stream.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(report_read)
            os.close(report_write)
            for directory in set(cgroups.values()):
                _remove_cgroup(directory)
            raise SandboxError(f"fork failed: {exc}") from None
        if pid == 0:
            _intermediate_main(target, plan)
        os.close(report_write)
        sandbox = cls(pid, cgroups)
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
            for pid in _cgroup_pids(directory):
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
        for directory in set(self._cgroups.values()):
            _remove_cgroup(directory)
        self._cgroups.clear()

    @property
    def oom_killed(self) -> bool:
        """Whether the memory cgroup killed something (still known after cleanup())."""
        if self._oom_killed is not None:
            return self._oom_killed
        return self._oom_kill_count() > 0

    def _oom_kill_count(self) -> int:
        memory = self._cgroups.get("memory")
        return _oom_kills(memory) if memory else 0


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


# ---------------------------------------------------------------- child side (never returns)


def _intermediate_main(target: Callable[[], int], plan: _Plan) -> NoReturn:
    """C: join cgroups, unshare, fork G, then wait for G and exit with its status."""
    try:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # C dies on them, and G with it
            signal.signal(sig, signal.SIG_DFL)
        if plan.main_thread:  # PDEATHSIG fires when the forking *thread* exits, so only for the main thread
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        close_fds_except({0, 1, 2, plan.report_fd, *plan.keep_fds})
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        status = dict(plan.statuses)
        for key, join_file in plan.cgroup_joins:
            status[key] = _guarded(lambda: _write(Path(join_file), "0"))
        if "namespaces" not in status:
            status["namespaces"] = _guarded(lambda: _unshare(plan))
        lifeline_read, lifeline_write = os.pipe()
        try:
            grandchild = os.fork()
        except OSError as exc:
            status = {key: status.get(key, f"failed: fork failed: {exc}") for key in LAYERS}
            _send_report(plan.report_fd, status)
            _die(EXIT_SETUP_FAILED, f"sandbox: fork failed: {exc}")
        if grandchild == 0:
            os.close(lifeline_write)
            _grandchild_main(target, plan, status, lifeline_read)
        for fd in (lifeline_read, plan.report_fd, *plan.keep_fds):  # so that the peers see EOF when G dies
            with suppress(OSError):
                os.close(fd)
        _, wait_status = os.waitpid(grandchild, 0)
        _mirror_exit(wait_status)
    except BaseException as exc:
        _die(EXIT_SETUP_FAILED, f"sandbox: intermediate process failed: {exc!r}")


def _grandchild_main(target: Callable[[], int], plan: _Plan, status: dict[str, str], lifeline: int) -> NoReturn:
    """G: pid 1 of the new pid namespace; enter the remaining layers, report, run the target."""
    try:
        _die_with_parent(lifeline)
        os.setsid()  # no controlling terminal, own process group
        if status["namespaces"] == "active":
            status["namespaces"] = _guarded(lambda: _mount_private_views(plan))
        _set_environment()
        if "rlimits" not in status:
            status["rlimits"] = _guarded(lambda: _set_rlimits(plan))
        rules: list[tuple[str, int]] = []
        if "landlock" not in status:
            try:  # while still root: the sandbox uid may not traverse to every allowed path
                rules = _landlock_rules(plan)
            except Exception as exc:
                status["landlock"] = f"failed: {exc}"
        if "uid" not in status:
            status["uid"] = _guarded(lambda: _drop_privileges(plan.uid))
        _die_with_parent(lifeline)  # a credential change clears PR_SET_PDEATHSIG
        os.close(lifeline)
        if "no_new_privs" not in status:
            status["no_new_privs"] = _guarded(_set_no_new_privs)
        if "landlock" not in status:
            status["landlock"] = _guarded(lambda: _apply_landlock(rules))
        if "seccomp" not in status:
            status["seccomp"] = _guarded(_apply_seccomp)
        missing = [f"{key}: {status[key]}" for key in LAYERS if status[key] != "active"]
        _send_report(plan.report_fd, status)
        if plan.require and missing:
            _die(EXIT_LAYER_MISSING, "sandbox: required layers not active: " + "; ".join(missing))
    except BaseException as exc:
        _die(EXIT_SETUP_FAILED, f"sandbox: setup failed: {exc!r}")
    _run_target(target)


def _guarded(step: Callable[[], None]) -> str:
    try:
        step()
        return "active"
    except Exception as exc:
        return f"failed: {exc}"


def _die(code: int, message: str) -> NoReturn:
    with suppress(Exception):
        os.write(2, (" ".join(message.split())[:1000] + "\n").encode(errors="replace"))
    os._exit(code)


def _run_target(target: Callable[[], int]) -> NoReturn:
    try:
        code = target()
        if type(code) is not int:
            raise TypeError(f"target returned {type(code).__name__}, not int")
    except BaseException as exc:
        _flush_std_streams()
        try:
            message = f"sandbox target failed: {type(exc).__name__}: {exc}"
        except BaseException:
            message = "sandbox target failed"
        _die(EXIT_TARGET_FAILED, message)
    _flush_std_streams()
    os._exit(code & 0xFF)


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        with suppress(BaseException):
            stream.flush()


def close_fds_except(keep: set[int]) -> None:
    """Close every file descriptor of this process but 0, 1, 2 and `keep`."""
    low = 3
    for fd in sorted(k for k in keep if k >= 3):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def _send_report(fd: int, status: dict[str, str]) -> None:
    data = (json.dumps({key: status[key] for key in LAYERS}) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]
    os.close(fd)


def _mirror_exit(wait_status: int) -> NoReturn:
    """Exit like G did, so that the parent's wait() sees the real status."""
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # C runs as root in the parent's cwd
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # only if the signal did not end us
    os._exit(os.waitstatus_to_exitcode(wait_status))


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _unshare(plan: _Plan) -> None:
    flags = _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWIPC | _CLONE_NEWUTS
    if not plan.root:
        flags |= _CLONE_NEWUSER
    uid, gid = os.getuid(), os.getgid()
    _check(_libc.unshare(flags), "unshare")
    if not plan.root:  # become root of the new user namespace, so that G may mount
        _write(Path("/proc/self/setgroups"), "deny")
        _write(Path("/proc/self/uid_map"), f"0 {uid} 1")
        _write(Path("/proc/self/gid_map"), f"0 {gid} 1")


def _die_with_parent(lifeline: int) -> None:
    _check(_libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if select.select([lifeline], [], [], 0)[0]:  # EOF: C already died before the signal was armed
        os._exit(EXIT_SETUP_FAILED)


def _mount(source: str, target: str, fstype: str | None, flags: int, options: str | None = None) -> None:
    _check(_libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                       options.encode() if options else None), f"mount {target}")


def _mount_namespace() -> tuple[int, int]:
    info = os.stat("/proc/self/ns/mnt")
    return info.st_dev, info.st_ino


def _mount_private_views(plan: _Plan) -> None:
    if _mount_namespace() == plan.parent_mount_ns:  # never stack tmpfs over the host's /tmp, /run, /proc
        raise OSError("still in the parent's mount namespace; refusing to mount")
    _mount("none", "/", None, _MS_REC | _MS_PRIVATE)  # or our mounts would propagate to the host
    secure = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    # Hidden paths first: one under /tmp vanishes once the private /tmp is mounted. /run is hidden too
    # (Landlock does not mediate connect() to the UNIX sockets that live there).
    for path in (*plan.hide, "/run"):
        if os.path.isdir(path):
            _mount("tmpfs", path, "tmpfs", secure | _MS_RDONLY, "size=4k,mode=0555")
        elif os.path.exists(path):
            _mount("/dev/null", path, None, _MS_BIND)
    _mount("proc", "/proc", "proc", secure)
    owner = f",uid={plan.uid},gid={plan.uid}" if plan.root else ""
    _mount("tmpfs", "/tmp", "tmpfs", secure, f"size={plan.limits.tmpfs_mb}m,mode=1777{owner}")
    if os.path.isdir("/dev/shm"):
        _mount("tmpfs", "/dev/shm", "tmpfs", secure, f"size={plan.limits.tmpfs_mb}m,mode=1777")
    os.chdir("/tmp")


def _set_environment() -> None:
    os.environ.clear()  # also empties posix.environ, which os.environ wraps
    with suppress(OSError, ValueError, IndexError):  # an extra: os.environ is what matters
        _wipe_initial_environ()
    os.environ.update(PATH="/usr/bin:/bin", HOME="/tmp", MPLCONFIGDIR="/tmp/.matplotlib", OMP_NUM_THREADS="1",
                      MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", LANG="C.UTF-8")
    sys.dont_write_bytecode = True


def _wipe_initial_environ() -> None:
    """Zero the environment strings the kernel put on the stack at exec (/proc/self/environ and raw memory
    reads would still show them); after os.environ.clear() nothing points there any more."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    env_start, env_end = int(fields[47]), int(fields[48])  # stat fields 50 and 51
    if 0 < env_start < env_end:
        ctypes.memset(env_start, 0, env_end - env_start)


def _set_rlimits(plan: _Plan) -> None:
    limits = plan.limits
    wanted = [
        (resource.RLIMIT_AS, limits.address_space_mb << 20, limits.address_space_mb << 20),
        (resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 1),  # SIGXCPU, then SIGKILL
        (resource.RLIMIT_FSIZE, limits.file_size_mb << 20, limits.file_size_mb << 20),
        (resource.RLIMIT_NOFILE, limits.open_files, limits.open_files),
        (resource.RLIMIT_CORE, 0, 0),
    ]
    if plan.root:  # NPROC counts every process of the real uid: only meaningful for a dedicated uid
        wanted.append((resource.RLIMIT_NPROC, limits.pids, limits.pids))
    for which, soft, hard in wanted:
        _, current_hard = resource.getrlimit(which)
        if current_hard != resource.RLIM_INFINITY:  # we may only lower a hard limit
            hard = min(hard, current_hard)
        resource.setrlimit(which, (min(soft, hard), hard))


def _drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid) or _has_caps(_CAP_SYS_ADMIN):
        raise OSError(f"still privileged after dropping to uid {uid}")


def _set_no_new_privs() -> None:
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    if _libc.prctl(_PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1:
        raise OSError("no_new_privs did not stick")


def _is_within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _allowed_paths(path: str, hidden: tuple[str, ...], depth: int = 0) -> list[str]:
    """`path` itself, or, if a hidden path lies beneath it, its children minus the hidden ones."""
    real = os.path.realpath(path)
    if not os.path.exists(real) or any(_is_within(real, h) for h in hidden):
        return []
    if not any(_is_within(h, real) for h in hidden):
        return [real]
    if depth > 16 or not os.path.isdir(real):
        return []
    return [allowed for entry in sorted(os.listdir(real))
            for allowed in _allowed_paths(os.path.join(real, entry), hidden, depth + 1)]


def _landlock_rules(plan: _Plan) -> list[tuple[str, int]]:
    """(path, access) pairs: read-only trees minus `hide`, /proc, a few devices, and the private /tmp and /dev/shm."""
    read = FSAccess.READ_FILE | FSAccess.READ_DIR
    read_exec = read | FSAccess.EXECUTE
    write = FSAccess.all() & ~FSAccess.EXECUTE
    device = FSAccess.READ_FILE | FSAccess.WRITE_FILE
    if landlock.landlock_abi_version() >= 3:
        device |= FSAccess.TRUNCATE  # open("/dev/null", "w") truncates
    rules = [(path, read_exec) for tree in plan.read_trees for path in _allowed_paths(tree, plan.hide)]
    rules += [("/proc", read), ("/dev", FSAccess.READ_DIR), ("/tmp", write), ("/dev/shm", write)]
    rules += [(path, device) for path in _DEVICES]
    only_file_rights = FSAccess.EXECUTE | FSAccess.READ_FILE | FSAccess.WRITE_FILE | FSAccess.TRUNCATE
    return [(path, access if os.path.isdir(path) else access & only_file_rights)
            for path, access in rules if os.path.exists(path)]


def _apply_landlock(rules: list[tuple[str, int]]) -> None:
    ruleset = landlock.Ruleset()
    for path, access in rules:
        ruleset.allow(path, rules=access)
    ruleset.apply()


def _apply_seccomp() -> None:
    deny = pyseccomp.ERRNO(errno.EPERM)
    syscall_filter = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    syscall_filter.set_attr(pyseccomp.Attr.CTL_TSYNC, 1)
    for name in ("socket", "socketpair"):  # AF_UNIX stays: DataLoader workers pass fds over it
        syscall_filter.add_rule(deny, name, pyseccomp.Arg(0, pyseccomp.NE, socket.AF_UNIX))
    for name in _DENIED_SYSCALLS:
        syscall_filter.add_rule(deny, name)
    for flag in _CLONE_NEW_ANY:
        syscall_filter.add_rule(deny, "clone", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, flag, flag))
    for request in (_TIOCSTI, _TIOCLINUX):  # typing into, or poking at, a terminal inherited on fds 0-2
        syscall_filter.add_rule(deny, "ioctl", pyseccomp.Arg(1, pyseccomp.MASKED_EQ, 0xFFFFFFFF, request))
    # clone3 passes its flags in memory, which seccomp cannot read: ENOSYS makes glibc fall back to clone.
    syscall_filter.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    syscall_filter.load()
