"""Taking over a delegated cgroup v2 subtree, as Docker-in-Docker entrypoints do, so that sandboxes
get memory and pids cgroups without root.

On cgroup v2 a controller reaches the children of a cgroup only once it is enabled in that cgroup's
`cgroup.subtree_control`, and the kernel refuses to enable it while processes sit in the cgroup
(the no-internal-process rule). A fresh delegated cgroup (`systemd-run --user --scope -p
Delegate=yes`, a unit with Delegate=yes, the root of a container's cgroup namespace) lists the
controllers in `cgroup.controllers` but holds the grader itself. So, when that cgroup is ours to
manage, every process in it moves into the leaf child LEAF and the controllers are enabled; the
sandboxes' cgroups are then made beside LEAF. Every root path is a parameter, for the tests.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

LEAF = "gradelab-leaf"  # where the grader's own processes go, beside the sandboxes' cgroups
WANTED = ("memory", "pids")
DELEGATE_XATTRS = ("trusted.delegate", "user.delegate")  # what systemd marks a delegated cgroup with
HOW_TO_DELEGATE = ("run the grader in a delegated cgroup, "
                   "e.g. `systemd-run --user --scope -p Delegate=yes gradelab grade ...`")
ATTEMPTS = 3  # processes forked into the cgroup meanwhile make enabling fail with EBUSY: move them, retry


def write_file(path: Path, value: str) -> None:
    with open(path, "w") as file:
        file.write(value)


def enabled(directory: Path, controller: str) -> bool:
    try:
        return controller in (directory / "cgroup.subtree_control").read_text().split()
    except OSError:
        return False


def sandbox_parent(directory: Path, cgroup_path: str, controller: str, *, proc: Path = Path("/proc"),
                   euid: int | None = None) -> tuple[Path | None, str]:
    """The v2 directory the sandboxes' cgroups for `controller` go in, given our own cgroup
    `directory` (whose path /proc/self/cgroup gives as `cgroup_path`), or (None, reason).

    That is our cgroup (or, if we sit in the LEAF a take-over made, by this process or another one
    in the same cgroup, its parent) once it enables the controller for its children, which
    `take_over` does if it does not yet."""
    if directory.name == LEAF:
        directory, cgroup_path = directory.parent, cgroup_path.rpartition("/")[0] or "/"
    if enabled(directory, controller):
        return directory, ""
    if problem := take_over(directory, cgroup_path, controller, proc=proc, euid=os.geteuid() if euid is None else euid):
        return None, (f"cgroup v2: {controller} is not enabled in {directory}/cgroup.subtree_control and cannot be: "
                      f"{problem}; {HOW_TO_DELEGATE}")
    return directory, ""


def take_over(directory: Path, cgroup_path: str, controller: str, *, proc: Path, euid: int) -> str | None:
    """Move the processes of `directory` into its LEAF child and enable the WANTED controllers it
    offers in its cgroup.subtree_control; None if done, else why not (nothing moved then, unless
    the kernel refused the last step)."""
    try:
        offered = (directory / "cgroup.controllers").read_text().split()
    except OSError as exc:
        return f"cannot read {directory}/cgroup.controllers: {exc}"
    if controller not in offered:
        return f"{controller} is not delegated to {directory} (not in its cgroup.controllers)"
    if not all(os.access(path, os.W_OK) for path in (directory, directory / "cgroup.subtree_control",
                                                     directory / "cgroup.procs")):
        return f"{directory} is not writable by uid {euid}"
    if problem := _not_ours(directory, cgroup_path, euid):
        return problem
    change = " ".join(f"+{name}" for name in WANTED if name in offered)
    # The hierarchy's real root has no cgroup.type; it is exempt from the rule and holds kernel threads.
    hierarchy_root = not (directory / "cgroup.type").exists()
    try:
        if not hierarchy_root:
            (directory / LEAF).mkdir(exist_ok=True)
        for attempt in range(ATTEMPTS):
            if not hierarchy_root:
                if problem := _move_processes(directory, proc, euid):
                    return problem
            try:
                write_file(directory / "cgroup.subtree_control", change)
                return None
            except OSError as exc:
                if exc.errno != errno.EBUSY or hierarchy_root or attempt == ATTEMPTS - 1:
                    raise
    except OSError as exc:
        return f"enabling {change} in {directory}/cgroup.subtree_control failed: {exc}"
    return None


def _not_ours(directory: Path, cgroup_path: str, euid: int) -> str | None:
    """Why `directory` is not delegated to us, or None: it is if it is the root of our cgroup
    namespace, owned by our (non-root) uid, or marked delegated by systemd."""
    if cgroup_path == "/":
        return None
    if euid != 0 and directory.stat().st_uid == euid:
        return None
    for name in DELEGATE_XATTRS:
        try:
            os.getxattr(directory, name)
            return None
        except OSError:
            continue
    return (f"{directory} is not delegated to uid {euid} (not owned by it, no {' or '.join(DELEGATE_XATTRS)} "
            f"attribute, not the root of our cgroup namespace)")


def _move_processes(directory: Path, proc: Path, euid: int) -> str | None:
    """Move every process of `directory` into its LEAF; why not, if some is another user's (non-root)."""
    pids = [int(pid) for pid in (directory / "cgroup.procs").read_text().split()]
    if euid != 0:
        for pid in pids:
            try:
                owner = (proc / str(pid)).stat().st_uid
            except FileNotFoundError:
                continue  # exited
            if owner != euid:
                return f"process {pid} in {directory} belongs to uid {owner}, not to uid {euid}"
    for pid in pids:
        try:
            write_file(directory / LEAF / "cgroup.procs", str(pid))
        except ProcessLookupError:
            continue  # exited meanwhile
    return None
