"""The confinement layers the sandbox process G enters last, just before the target runs, and
which hold whatever its uid: no_new_privs, Landlock (read-only system and Python trees, writes
only to its private /tmp and /dev/shm) and seccomp (no sockets but AF_UNIX, none of the syscalls
that only serve escapes or attacks on other processes).

Imported by gradelab.sandbox.layers, and by the launcher for its probe.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from typing import TYPE_CHECKING

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

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWTIME = 0x00000080
CLONE_NEW_ANY = (CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET,
                 CLONE_NEWTIME)
_PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
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



def check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def set_no_new_privs() -> None:
    check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
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


def landlock_rules(plan: Plan) -> list[tuple[str, int]]:
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


def landlock_ruleset(plan: Plan) -> landlock.Ruleset:
    """The ruleset of `landlock_rules`, built now and applied (`.apply()`) once privileges are
    dropped: each allowed path is opened while the process may still reach it, since the sandbox
    uid may not traverse to every one (a checkout in a folder only its owner may enter)."""
    ruleset = landlock.Ruleset()
    for path, access in landlock_rules(plan):
        ruleset.allow(path, rules=access)
    return ruleset


def apply_seccomp() -> None:
    deny = pyseccomp.ERRNO(errno.EPERM)
    syscall_filter = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    syscall_filter.set_attr(pyseccomp.Attr.CTL_TSYNC, 1)
    for name in ("socket", "socketpair"):  # AF_UNIX stays: DataLoader workers pass fds over it
        syscall_filter.add_rule(deny, name, pyseccomp.Arg(0, pyseccomp.NE, socket.AF_UNIX))
    for name in _DENIED_SYSCALLS:
        syscall_filter.add_rule(deny, name)
    for flag in CLONE_NEW_ANY:
        syscall_filter.add_rule(deny, "clone", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, flag, flag))
    for request in (_TIOCSTI, _TIOCLINUX):  # typing into, or poking at, a terminal inherited on fds 0-2
        syscall_filter.add_rule(deny, "ioctl", pyseccomp.Arg(1, pyseccomp.MASKED_EQ, 0xFFFFFFFF, request))
    # clone3 passes its flags in memory, which seccomp cannot read: ENOSYS makes glibc fall back to clone.
    syscall_filter.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    syscall_filter.load()
