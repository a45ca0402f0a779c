"""The isolation layers, entered in the child processes that `gradelab.sandbox.launch` forks.

The intermediate child C joins the cgroups, unshares the namespaces (without root, a user
namespace comes with them, whose ids the worker maps) and forks the sandbox process (G, here: pid 1
of the new pid namespace). C only waits for G and mirrors its exit status, or kills G should the
worker die first; G mounts a private /proc, /tmp and /dev/shm, hides the `hide` paths, sets
rlimits, clears the environment, drops to a dedicated uid (or, in a user namespace without one,
drops every capability), enters Landlock and seccomp (gradelab.sandbox.confinement), reports what
it applied and runs the target.

Everything G needs is imported at module level: after the uid drop and Landlock, a lazy import can fail.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import select
import signal
import sys
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NoReturn

from gradelab.sandbox import confinement
from gradelab.sandbox.cgroups import write_file
from gradelab.sandbox.confinement import check, libc

if TYPE_CHECKING:
    from gradelab.sandbox.launch import Plan

LAYERS = ("namespaces", "uid", "rlimits", "cgroup_memory", "cgroup_pids", "landlock", "seccomp", "no_new_privs")
EXIT_TARGET_FAILED = 70  # target() raised
EXIT_SETUP_FAILED = 71  # the sandbox could not be set up at all (e.g. fork failed)
EXIT_LAYER_MISSING = 78  # require=True and a layer is not active
ID_MAP_DONE = "\0"  # the worker's reply once it has mapped C's ids

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
_MS_BIND, _MS_REC, _MS_PRIVATE = 0x1000, 0x4000, 0x40000
_PR_SET_PDEATHSIG = 1
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_CAPABILITY_VERSION_3 = 0x20080522
CAP_SYS_ADMIN = 21


def has_caps(*caps: int) -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            effective = int(line.split()[1], 16)
            return all(effective >> cap & 1 for cap in caps)
    return False


def mount_namespace() -> tuple[int, int]:
    info = os.stat("/proc/self/ns/mnt")
    return info.st_dev, info.st_ino


# ---------------------------------------------------------------- child side (never returns)


def intermediate_main(target: Callable[[], int], plan: Plan) -> NoReturn:
    """C: join cgroups, unshare, fork G, then wait for G and exit with its status; if the worker
    dies first, kill G (pid 1 of the sandbox's pid namespace: everything in it dies too)."""
    try:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # C dies on them, and G with it
            signal.signal(sig, signal.SIG_DFL)
        # PDEATHSIG fires when the forking *thread* exits, which for another thread need not be the
        # worker's end: there, and in every case, C watches the worker's lifeline pipe instead.
        if plan.main_thread:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != plan.parent_pid:  # the worker died before the signal was armed
            os._exit(EXIT_SETUP_FAILED)
        close_fds_except({0, 1, 2, plan.report_fd, plan.lifeline_fd, plan.id_map_fd, *plan.keep_fds})
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        status = dict(plan.statuses)
        for key, join_file in plan.cgroup_joins:
            status[key] = _guarded(lambda: write_file(Path(join_file), "0"))
        if "namespaces" not in status:
            status["namespaces"] = _guarded(lambda: _unshare(plan, status))
        if plan.id_map_fd >= 0:  # so that a worker still waiting for the request sees EOF
            os.close(plan.id_map_fd)
        lifeline_read, lifeline_write = os.pipe()
        try:
            grandchild = os.fork()
        except OSError as exc:
            status = {key: status.get(key, f"failed: fork failed: {exc}") for key in LAYERS}
            _send_report(plan.report_fd, status)
            _die(EXIT_SETUP_FAILED, f"sandbox: fork failed: {exc}")
        if grandchild == 0:
            os.close(lifeline_write)
            os.close(plan.lifeline_fd)
            _grandchild_main(target, plan, status, lifeline_read)
        for fd in (lifeline_read, plan.report_fd, *plan.keep_fds):  # so that the peers see EOF when G dies
            with suppress(OSError):
                os.close(fd)
        _mirror_exit(_wait_unless_orphaned(grandchild, plan.lifeline_fd))
    except BaseException as exc:
        _die(EXIT_SETUP_FAILED, f"sandbox: intermediate process failed: {exc!r}")


def _wait_unless_orphaned(child: int, lifeline: int) -> int:
    """Wait for `child`; kill it first should `lifeline` (whose other end only the worker holds) close."""
    child_fd = os.pidfd_open(child)
    if child_fd not in select.select([lifeline, child_fd], [], [])[0]:
        os.kill(child, signal.SIGKILL)
    return os.waitpid(child, 0)[1]


def _grandchild_main(target: Callable[[], int], plan: Plan, status: dict[str, str], lifeline: int) -> NoReturn:
    """G: pid 1 of the new pid namespace; enter the remaining layers, report, run the target."""
    try:
        _die_with_parent(lifeline)
        os.setsid()  # no controlling terminal, own process group
        in_user_namespace = plan.user_namespace and status["namespaces"] == "available"
        if status["namespaces"] == "available":
            status["namespaces"] = _guarded(lambda: _mount_private_views(plan, own_tmp="uid" not in status))
        _set_environment()
        if "rlimits" not in status:
            # RLIMIT_NPROC counts the processes of a uid (in a user namespace: of that namespace's uid),
            # so it bounds the sandbox only with a uid of its own or a user namespace.
            status["rlimits"] = _guarded(lambda: _set_rlimits(plan, processes=plan.root or in_user_namespace))
        ruleset = None
        if "landlock" not in status:
            try:  # while still root: the sandbox uid may not traverse to every allowed path
                ruleset = confinement.landlock_ruleset(plan)
            except Exception as exc:
                status["landlock"] = f"failed: {exc}"
        if "uid" not in status:
            status["uid"] = _guarded(lambda: _drop_privileges(plan.uid))
        elif in_user_namespace and (dropped := _guarded(_drop_capabilities)) != "available":
            status["uid"] = f"{dropped} (still root of its user namespace)"
        _die_with_parent(lifeline)  # a credential change clears PR_SET_PDEATHSIG
        os.close(lifeline)
        if "no_new_privs" not in status:
            status["no_new_privs"] = _guarded(confinement.set_no_new_privs)
        if "landlock" not in status:
            status["landlock"] = _guarded(ruleset.apply)
        if "seccomp" not in status:
            status["seccomp"] = _guarded(confinement.apply_seccomp)
        missing = [f"{key}: {status[key]}" for key in LAYERS if status[key] != "available"]
        _send_report(plan.report_fd, status)
        if plan.require and missing:
            _die(EXIT_LAYER_MISSING, "sandbox: required layers not active: " + "; ".join(missing))
    except BaseException as exc:
        _die(EXIT_SETUP_FAILED, f"sandbox: setup failed: {exc!r}")
    _run_target(target)


def _guarded(step: Callable[[], None]) -> str:
    """ "available" once `step` has applied its layer, else "failed: why"."""
    try:
        step()
        return "available"
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


def _unshare(plan: Plan, status: dict[str, str]) -> None:
    flags = confinement.CLONE_NEWNS | confinement.CLONE_NEWNET | confinement.CLONE_NEWPID | \
        confinement.CLONE_NEWIPC | confinement.CLONE_NEWUTS
    if plan.user_namespace:
        flags |= confinement.CLONE_NEWUSER
    uid, gid = os.getuid(), os.getgid()
    check(libc.unshare(flags), "unshare")
    if not plan.user_namespace:
        return
    if plan.id_map_fd >= 0:  # the worker maps the slot's subordinate ids with newuidmap/newgidmap
        os.write(plan.id_map_fd, b"?")
        reply = os.read(plan.id_map_fd, 4096).decode(errors="replace")
        if reply == ID_MAP_DONE:
            return
        status["uid"] = f"failed: {reply or 'the worker did not map the ids'}"
    # Root of the new user namespace, so that G may mount: the user's own ids, the only ones it may map.
    with suppress(PermissionError):  # written already, by a newuidmap whose newgidmap then failed
        write_file(Path("/proc/self/uid_map"), f"0 {uid} 1")
    write_file(Path("/proc/self/setgroups"), "deny")
    write_file(Path("/proc/self/gid_map"), f"0 {gid} 1")


def _die_with_parent(lifeline: int) -> None:
    check(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if select.select([lifeline], [], [], 0)[0]:  # EOF: C already died before the signal was armed
        os._exit(EXIT_SETUP_FAILED)


def _mount(source: str, target: str, fstype: str | None, flags: int, options: str | None = None) -> None:
    check(libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                       options.encode() if options else None), f"mount {target}")



def _mount_private_views(plan: Plan, *, own_tmp: bool) -> None:
    if mount_namespace() == plan.parent_mount_ns:  # never stack tmpfs over the host's /tmp, /run, /proc
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
    owner = f",uid={plan.uid},gid={plan.uid}" if own_tmp else ""
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


def _set_rlimits(plan: Plan, *, processes: bool) -> None:
    limits = plan.limits
    wanted = [
        (resource.RLIMIT_AS, limits.address_space_mb << 20, limits.address_space_mb << 20),
        (resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 1),  # SIGXCPU, then SIGKILL
        (resource.RLIMIT_FSIZE, limits.file_size_mb << 20, limits.file_size_mb << 20),
        (resource.RLIMIT_NOFILE, limits.open_files, limits.open_files),
        (resource.RLIMIT_CORE, 0, 0),
    ]
    if processes:
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
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid) or has_caps(CAP_SYS_ADMIN):
        raise OSError(f"still privileged after dropping to uid {uid}")


def _drop_capabilities() -> None:
    """Give up every capability (root of a user namespace has them all there), for good: an exec
    cannot bring back what the bounding set no longer holds."""
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last + 1):
        check(libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0), f"prctl(PR_CAPBSET_DROP, {cap})")
    check(libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "prctl(PR_CAP_AMBIENT_CLEAR_ALL)")
    header = (ctypes.c_uint32 * 2)(_CAPABILITY_VERSION_3, 0)
    check(libc.capset(header, (ctypes.c_uint32 * 6)()), "capset")
    sets = {line.split(":")[0]: int(line.split()[1], 16) for line in Path("/proc/self/status").read_text().splitlines()
            if line.startswith(("CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"))}
    if any(sets.values()):
        raise OSError(f"capabilities left after dropping them: {sets}")
