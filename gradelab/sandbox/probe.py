"""Which isolation layers this machine offers the current user, found without applying any: the
answer `gradelab.sandbox.launch.probe_layers` gives, and what a sandbox tries to apply.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

from gradelab.sandbox import cgroups, confinement, layers, slots
from gradelab.sandbox.layers import LAYERS

_CAP_SETGID, _CAP_SETUID = 6, 7
_PR_GET_SECCOMP = 21


def probe_layers() -> dict[str, str]:
    """Which isolation layers this machine offers, without applying any: keys "namespaces", "uid",
    "rlimits", "cgroup_memory", "cgroup_pids", "landlock", "seccomp", "no_new_privs"; values "available" or
    "unavailable: <reason>". Cheap; cached."""
    return dict(_probe())


@functools.cache
def _probe() -> tuple[tuple[str, str], ...]:
    root = os.geteuid() == 0
    namespaces = _probe_namespaces(root)
    if root:
        uid = "available" if layers.has_caps(_CAP_SETUID, _CAP_SETGID) else "unavailable: root without CAP_SETUID/CAP_SETGID"
    else:  # the subordinate uids exist only inside a user namespace
        uid = slots.uid_probe() if namespaces == "available" else f"unavailable: no user namespace ({namespaces})"
    found = {
        "namespaces": namespaces,
        "uid": uid,
        "rlimits": "available",
        "cgroup_memory": cgroups.probe("memory"),
        "cgroup_pids": cgroups.probe("pids"),
        "landlock": _probe_landlock(),
        "seccomp": _probe_seccomp(),
        "no_new_privs": "available" if confinement.libc.prctl(confinement.PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) >= 0
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
    # Nothing else tells: a container's seccomp profile, say, refuses unshare() without a sysctl saying so.
    flags = confinement.CLONE_NEWUSER | confinement.CLONE_NEWNS | confinement.CLONE_NEWPID | confinement.CLONE_NEWNET
    child = os.fork()
    if child == 0:
        os._exit(0 if confinement.libc.unshare(flags) == 0 else ctypes.get_errno() or 1)
    code = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
    return "available" if code == 0 else f"unavailable: unshare(CLONE_NEWUSER | ...) failed: {os.strerror(code)}"


def _probe_landlock() -> str:
    if confinement.landlock is None:
        return f"unavailable: {confinement.LANDLOCK_MISSING}"
    try:
        return "available" if confinement.landlock.landlock_abi_version() >= 1 else "unavailable: ABI version < 1"
    except OSError as exc:
        return f"unavailable: {getattr(exc, 'reason', None) or exc}"


def _probe_seccomp() -> str:
    if confinement.pyseccomp is None:
        return f"unavailable: {confinement.SECCOMP_MISSING}"
    if confinement.libc.prctl(_PR_GET_SECCOMP, 0, 0, 0, 0) < 0:
        return "unavailable: kernel without seccomp"
    return "available"
