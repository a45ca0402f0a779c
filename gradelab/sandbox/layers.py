"""The isolation layers, entered in the child processes that `gradelab.sandbox.launch` forks.

The intermediate child C joins the cgroups, unshares the namespaces and forks the sandbox process
(G, here: pid 1 of the new pid namespace). C only waits for G and mirrors its exit status; G mounts
a private /proc, /tmp and /dev/shm, hides the `hide` paths, sets rlimits, clears the environment,
drops to a dedicated uid, enters Landlock and seccomp, reports what it applied and runs the target.

Everything G needs is imported at module level: after the uid drop and Landlock, a lazy import can fail.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import select
import signal
import socket
import sys
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NoReturn

from gradelab.sandbox.cgroups import write_file

if TYPE_CHECKING:
    from gradelab.sandbox.launch import Plan

try:
    import landlock
    from landlock import FSAccess

    LANDLOCK_MISSING = ""
except ImportError as exc:  # pragma: no cover - the project depends on it
    landlock = None
    LANDLOCK_MISSING = f"package landlock not importable: {exc}"

try:
    import pyseccomp

    SECCOMP_MISSING = ""
except (ImportError, RuntimeError, OSError) as exc:  # RuntimeError: libseccomp.so.2 not found
    pyseccomp = None
    SECCOMP_MISSING = f"pyseccomp not usable: {exc}"

LAYERS = ("namespaces", "uid", "rlimits", "cgroup_memory", "cgroup_pids", "landlock", "seccomp", "no_new_privs")
EXIT_TARGET_FAILED = 70  # target() raised
EXIT_SETUP_FAILED = 71  # the sandbox could not be set up at all (e.g. fork failed)
EXIT_LAYER_MISSING = 78  # require=True and a layer is not active

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
_PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
CAP_SYS_ADMIN = 21
_TIOCSTI, _TIOCLINUX = 0x5412, 0x541C

libc = ctypes.CDLL(None, use_errno=True)
libc.unshare.argtypes = (ctypes.c_int,)
libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)

# Read-only trees for Landlock (plus sys.prefix and sys.path); the sandbox writes only to its
# private /tmp and /dev/shm.
READ_ONLY_TREES = ("/usr", "/lib", "/lib64", "/bin", "/etc", "/opt")
_DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom")
# Syscalls that only serve escapes, kernel attack surface or attacks on other processes; the new mount API
# and open_by_handle_at/pidfd_getfd are among them because they reach the same things by another door.
_DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2", "pivot_root", "chroot", "unshare",
    "setns", "bpf", "keyctl", "add_key", "request_key", "perf_event_open", "userfaultfd", "io_uring_setup",
    "io_uring_enter", "io_uring_register", "kexec_load", "kexec_file_load", "init_module", "finit_module",
    "delete_module", "reboot", "swapon", "swapoff", "settimeofday", "clock_settime",
    "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "open_by_handle_at", "pidfd_getfd",
)


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
    """C: join cgroups, unshare, fork G, then wait for G and exit with its status."""
    try:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # C dies on them, and G with it
            signal.signal(sig, signal.SIG_DFL)
        if plan.main_thread:  # PDEATHSIG fires when the forking *thread* exits, so only for the main thread
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        close_fds_except({0, 1, 2, plan.report_fd, *plan.keep_fds})
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        status = dict(plan.statuses)
        for key, join_file in plan.cgroup_joins:
            status[key] = _guarded(lambda: write_file(Path(join_file), "0"))
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


def _grandchild_main(target: Callable[[], int], plan: Plan, status: dict[str, str], lifeline: int) -> NoReturn:
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


def _unshare(plan: Plan) -> None:
    flags = _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWIPC | _CLONE_NEWUTS
    if not plan.root:
        flags |= _CLONE_NEWUSER
    uid, gid = os.getuid(), os.getgid()
    _check(libc.unshare(flags), "unshare")
    if not plan.root:  # become root of the new user namespace, so that G may mount
        write_file(Path("/proc/self/setgroups"), "deny")
        write_file(Path("/proc/self/uid_map"), f"0 {uid} 1")
        write_file(Path("/proc/self/gid_map"), f"0 {gid} 1")


def _die_with_parent(lifeline: int) -> None:
    _check(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if select.select([lifeline], [], [], 0)[0]:  # EOF: C already died before the signal was armed
        os._exit(EXIT_SETUP_FAILED)


def _mount(source: str, target: str, fstype: str | None, flags: int, options: str | None = None) -> None:
    _check(libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                       options.encode() if options else None), f"mount {target}")



def _mount_private_views(plan: Plan) -> None:
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


def _set_rlimits(plan: Plan) -> None:
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
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid) or has_caps(CAP_SYS_ADMIN):
        raise OSError(f"still privileged after dropping to uid {uid}")


def _set_no_new_privs() -> None:
    _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1:
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


def _landlock_rules(plan: Plan) -> list[tuple[str, int]]:
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
