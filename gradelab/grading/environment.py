"""Can the sandbox read the Python it runs? Checked before grading, and confirmed after a cell
fails to import something.

The sandbox is forked from a warm worker, so what the worker imported is already in memory; but
whatever a cell or a library loads later comes from disk, as the sandbox sees it: with its own
empty /tmp, /dev/shm and /run, the hidden tests and solutions covered, and an unprivileged uid.
A virtual environment under /tmp, or under a folder only root may enter, would make every cell
fail with an ImportError and every submission score 0 with no message. That is an error of the
grading machine, reported as such (`HiddenPythonError`, the command's exit code 3), never a grade.

Nothing here imports torch: the batch's parent process may use it.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import site
import stat
import sys
from pathlib import Path
from typing import Sequence

from gradelab.boundary.messages import CellOutcome
from gradelab.sandbox import launch as sandbox
from gradelab.errors import GradingEnvironmentError

# What the sandbox may load from disk after it forks: the notebook's packages. gradelab itself is
# not among them: the worker imports every sandbox-side module before it forks (the executor
# imports all it needs at module level), so a checkout under /tmp (CI's fresh clone) grades.
SANDBOX_PACKAGES = ("torch", "numpy", "matplotlib", "IPython")
# Mounted afresh (empty) in the sandbox's mount namespace.
PRIVATE_MOUNTS = ("/tmp", "/dev/shm", "/run")
_MISSING_MODULE = re.compile(r"No module named '([\w.]+)'")
_PATH = re.compile(r"(/[^\s'\":]+)")


class HiddenPythonError(GradingEnvironmentError):
    """Python, its packages or gradelab are out of the sandbox's reach on this machine."""


def python_trees() -> list[Path]:
    """The directories the sandbox must be able to read: the interpreter's prefixes and standard
    library, the site-packages directories, and where the packages it uses were installed."""
    paths = {sys.prefix, sys.exec_prefix, sys.base_prefix, os.path.dirname(os.__file__), *site.getsitepackages()}
    for name in SANDBOX_PACKAGES:
        spec = importlib.util.find_spec(name)  # a top-level name: found without importing it
        if spec is not None:
            paths.update(spec.submodule_search_locations or [os.path.dirname(spec.origin or "")])
    return sorted({Path(os.path.realpath(p)) for p in paths if p and os.path.exists(p)})


def _lacks(info: os.stat_result, uid: int, need: int) -> bool:
    """Whether the sandbox's uid (its gid is the same number, no other groups) lacks the `need`
    permission bits (stat.S_IROTH / S_IXOTH scale) on a file with `info`."""
    shift = 6 if info.st_uid == uid else 3 if info.st_gid == uid else 0
    return (info.st_mode >> shift) & need != need


def _blocked_at(path: Path, uid: int) -> str | None:
    """The first directory on the way to `path` (or `path` itself) the uid may not enter or read."""
    for step in [*reversed(path.parents), path]:
        info = os.stat(step)
        need = stat.S_IXOTH | (stat.S_IROTH if step == path else 0)
        if stat.S_ISDIR(info.st_mode) and _lacks(info, uid, need):
            return f"{step} (mode {stat.filemode(info.st_mode)}, owner uid {info.st_uid})"
    return None


def unreachable(paths: Sequence[Path], *, hide: Sequence[Path], slot: int) -> list[str]:
    """Why each of `paths` the sandbox could not read, as far as the layers available here tell."""
    layers = sandbox.probe_layers()
    private = [Path(p) for p in PRIVATE_MOUNTS] if layers["namespaces"] == "available" else []
    hidden = [Path(os.path.realpath(p)) for p in hide]
    uid = sandbox.UID_BASE + slot if layers["uid"] == "available" else None
    problems, reported = [], []
    for path in sorted(paths):
        if any(Path(path).is_relative_to(done) for done in reported):
            continue  # said already of a folder that holds it
        reported.append(Path(path))
        real = Path(os.path.realpath(path))
        covering = next((d for d in [*private, *hidden] if real.is_relative_to(d)), None)
        if covering in private:
            problems.append(f"{path} is under {covering}, which the sandbox replaces with an empty one of its own")
        elif covering is not None:
            problems.append(f"{path} is inside {covering}, which the sandbox hides from student code")
        elif uid is not None and (blocked := _blocked_at(real, uid)):
            problems.append(f"{path} cannot be read by the sandbox's unprivileged user (uid {uid}): "
                            f"{blocked} does not let others in")
        else:
            reported.pop()
    return problems


def check(*, hide: Sequence[Path], slot: int) -> None:
    """Raise HiddenPythonError, naming each path and why, if the sandbox could not read Python."""
    if problems := unreachable(python_trees(), hide=hide, slot=slot):
        raise HiddenPythonError(
            "notebooks cannot be graded here: the sandbox they run in could not read the Python they "
            "need: " + "; ".join(problems) + ". Install the virtual environment (with gradelab) in a "
            "world-readable place outside /tmp, e.g. /opt/gradelab/venv as ./run does")


def import_failures(cells: Sequence[CellOutcome], trees: Sequence[Path]) -> tuple[list[str], list[str]]:
    """From the cells' errors, the modules (and files) inside `trees` that a cell could not import
    (or read) although this process finds them: the sandbox may not see them. To be confirmed in a
    clean sandbox (`probe_target`): a student's own `raise ImportError(...)` proves nothing."""
    modules: set[str] = set()
    files: set[str] = set()
    for cell in cells:
        error = cell.error if cell.status == "error" else None
        if error is None or error.type not in ("ModuleNotFoundError", "ImportError", "PermissionError"):
            continue
        message = error.message
        modules.update(m for m in _MISSING_MODULE.findall(message) if _found_in(m, trees))
        files.update(p for p in _PATH.findall(message)
                     if any(Path(p).is_relative_to(t) for t in trees) and os.access(p, os.R_OK))
    return sorted(modules), sorted(files)


def _found_in(module: str, trees: Sequence[Path]) -> bool:
    """Whether this process finds `module` inside `trees`, without importing anything: a dotted
    name counts only when its parent package is already imported here."""
    parent = module.rpartition(".")[0]
    if parent and parent not in sys.modules:
        return False
    try:
        spec = importlib.machinery.PathFinder.find_spec(module, getattr(sys.modules.get(parent), "__path__", None))
    except (ImportError, ValueError):
        return False
    origin = spec and (spec.origin or next(iter(spec.submodule_search_locations or []), None))
    return bool(origin) and any(Path(os.path.realpath(origin)).is_relative_to(t) for t in trees)


def probe_target(modules: Sequence[str], files: Sequence[str], report: int):
    """A sandbox target that imports `modules` and reads `files`, and writes to the fd `report`
    one line per failure: what could not be loaded, and the error."""
    def target() -> int:
        failures = []
        for module in modules:
            try:
                importlib.import_module(module)
            except Exception as exc:  # noqa: BLE001 - any failure is the answer
                failures.append(f"module {module}: {type(exc).__name__}: {exc}")
        for path in files:
            try:
                with open(path, "rb") as handle:
                    handle.read(1)
            except OSError as exc:
                failures.append(f"file {path}: {type(exc).__name__}: {exc}")
        os.write(report, "\n".join(failures).encode(errors="replace")[:8000])
        return 0

    return target
