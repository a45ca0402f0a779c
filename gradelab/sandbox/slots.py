"""Host-wide sandbox slots: the uid a sandbox runs as and the names of its cgroups, leased under a
lock so that two gradelab processes on one machine never share them.

A lease on slot number n is an flock on `<lock dir>/<n>.lock`, which the grading worker holds for
as long as it lives: the kernel drops it when the process ends, however it ends, so a free lock
means that nobody uses the slot's uid and cgroups any more. As root, slot n's sandboxes run as
uid/gid UID_BASE + n. Without root they run in a user namespace: as the n-th id of the user's
subordinate range (/etc/subuid and /etc/subgid, mapped by newuidmap/newgidmap) where the user has
one, else as the user's own uid mapped to root of the namespace, without capabilities.
"""

from __future__ import annotations

import fcntl
import functools
import os
import pwd
import shutil
import stat
import subprocess
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from gradelab.errors import GradingEnvironmentError

UID_BASE = 61000  # slot n runs as uid/gid UID_BASE + n (inside its user namespace without root)
MAX_SLOTS = 4000  # keeps the uids below 65000
ROOT_LOCK_DIRS = (Path("/run/gradelab/slots"), Path("/var/lib/gradelab/slots"))  # the first that can be made
ID_MAP_TIMEOUT = 10.0  # seconds newuidmap/newgidmap may take


class SlotError(GradingEnvironmentError, RuntimeError):
    """No sandbox slot can be leased on this machine."""


@dataclass(frozen=True)
class SubordinateIds:
    """The first uid and gid of the user's subordinate ranges, and how many slots they hold."""
    uid: int
    gid: int
    count: int


@dataclass(frozen=True)
class Lease:
    number: int
    fd: int  # holds the flock


_leases: dict[int, Lease] = {}  # requested slot -> the lease this process holds for it


def _drop_inherited_leases() -> None:
    """In a forked child: the parent's leases stay the parent's (closing our copies of their fds
    leaves its locks in place), and the child takes its own should it spawn sandboxes."""
    for lease_ in _leases.values():
        with suppress(OSError):
            os.close(lease_.fd)
    _leases.clear()


os.register_at_fork(after_in_child=_drop_inherited_leases)


@functools.cache
def lock_dir() -> Path:
    """Root's locks live in /run; a user's in a folder of their own that other users cannot write."""
    if os.geteuid() == 0:
        candidates, mode = ROOT_LOCK_DIRS, 0o755
    else:
        candidates, mode = (Path("/var/tmp", f"gradelab-{os.geteuid()}", "slots"),), 0o700
    for directory in candidates:
        try:
            for folder in (directory.parent, directory):
                folder.mkdir(mode=mode, exist_ok=True)
            break
        except OSError as exc:  # a read-only /run, say
            failure = exc
    else:
        raise SlotError(f"cannot make a folder for the sandbox slots' locks: {failure}")
    for folder in (directory, directory.parent):  # another user's folder could swap lock files under us
        info = os.lstat(folder)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
            raise SlotError(f"{folder} must be a directory of uid {os.geteuid()} that only it can write")
    return directory


def lease(requested: int) -> Lease:
    """The slot this process uses for `requested`: that number if no other process holds it, else the
    next free one. Kept until the process exits."""
    if is_held(requested):
        return _leases[requested]
    directory = lock_dir()
    count = slot_count()
    mine = {lease_.number for lease_ in _leases.values()}
    for offset in range(count):
        number = (requested + offset) % count
        if number in mine:
            continue
        fd = os.open(directory / f"{number}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _leases[requested] = Lease(number, fd)
        return _leases[requested]
    raise SlotError(f"all {count} sandbox slots in {directory} are held by other processes")


def is_held(requested: int) -> bool:
    """Whether this process holds a lease for `requested` already."""
    return requested in _leases


@contextmanager
def claimed_if_unused(number: int) -> Iterator[bool]:
    """True if slot `number` is this process's or no process holds it (then held for the block, so
    that no other process starts using it meanwhile), else False."""
    if any(lease_.number == number for lease_ in _leases.values()):
        yield True
        return
    fd = os.open(lock_dir() / f"{number}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        yield False
        return
    try:
        yield True
    finally:
        os.close(fd)


def slot_count() -> int:
    if os.geteuid() != 0 and (ids := subordinate_ids()) is not None:
        return min(MAX_SLOTS, ids.count)
    return MAX_SLOTS


def uid_probe() -> str:
    """The "uid" layer: whether each slot gets a dedicated uid here."""
    if os.geteuid() == 0:
        return "available"
    if subordinate_ids() is not None:
        return "available"
    return f"unavailable: {_why_no_subordinate_ids()}; the sandbox keeps uid {os.geteuid()} as root of its user " \
           f"namespace, without capabilities"


@functools.cache
def subordinate_ids() -> SubordinateIds | None:
    """The user's subordinate uid and gid ranges, if both exist and newuidmap/newgidmap can map them."""
    if _why_no_subordinate_ids():
        return None
    (uid, uid_count), (gid, gid_count) = (_subordinate_range(Path(f"/etc/sub{kind}id")) for kind in ("u", "g"))
    return SubordinateIds(uid=uid, gid=gid, count=min(uid_count, gid_count))


@functools.cache
def _why_no_subordinate_ids() -> str:
    for tool in ("newuidmap", "newgidmap"):
        path = shutil.which(tool, path="/usr/bin:/bin:/usr/sbin:/sbin")
        if path is None:
            return f"{tool} is not installed (Debian: apt-get install uidmap)"
        info = os.stat(path)
        if not info.st_mode & stat.S_ISUID or info.st_uid != 0:
            return f"{path} is not setuid root"
    for kind in ("u", "g"):
        if _subordinate_range(Path(f"/etc/sub{kind}id")) is None:
            return f"{_user_name()} has no range in /etc/sub{kind}id"
    return ""


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _subordinate_range(path: Path) -> tuple[int, int] | None:
    """The user's first range of at least one id in `path` ("name-or-uid:start:count" lines)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        owner, _, rest = line.strip().partition(":")
        start, _, count = rest.partition(":")
        if owner in (_user_name(), str(os.geteuid())) and start.isdigit() and count.isdigit() and int(count) > 0:
            return int(start), int(count)
    return None


def map_ids(pid: int, number: int) -> str:
    """Write process `pid`'s (it has just created a user namespace) uid and gid maps: its owner's own
    ids as root, UID_BASE + number as the slot's subordinate id. "" on success, else why not."""
    ids = subordinate_ids()
    inner = UID_BASE + number
    commands = (["newuidmap", str(pid), "0", str(os.geteuid()), "1", str(inner), str(ids.uid + number), "1"],
                ["newgidmap", str(pid), "0", str(os.getegid()), "1", str(inner), str(ids.gid + number), "1"])
    for command in commands:
        try:
            done = subprocess.run(command, capture_output=True, timeout=ID_MAP_TIMEOUT, env={"PATH": "/usr/bin:/bin"})
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{command[0]}: {exc}"
        if done.returncode != 0:
            return f"{command[0]} exited with {done.returncode}: {done.stderr.decode(errors='replace').strip()[:300]}"
    return ""
