"""Authoring and release: `source/` in, `release/`, `solutions/` and `autograder/` out.

The student notebook is made with nbgrader's own preprocessors (one job each), in the order of
nbgrader's `generate_assignment`; the reference module is extracted from the solution cells, not
written twice; the reference data the hidden tests compare against is computed here, with fixed
seeds, so two releases are byte-identical.
"""

from __future__ import annotations

import ast
import io
import json
import re
import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbgrader.preprocessors import (CheckCellMetadata, ClearHiddenTests, ClearMarkScheme, ClearOutput,
                                    ClearSolutions, ComputeChecksums, LockCells)

from gradelab.config import CONFIG_FILE, GradingConfig, load_config, question_of
from gradelab.errors import GradelabError

MARKERS = (("### BEGIN SOLUTION", "### END SOLUTION"), ("### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"))
TEST_MARKER = re.compile(r"""@pytest\.mark\.question\(\s*["'](q(?:\d+|b)_\d+)["']""")
REFERENCE_MODULE = "reference_solutions"
ZIP_TIMESTAMP = (1980, 1, 1, 0, 0, 0)


class ReleaseError(GradelabError, ValueError):
    """A mistake in source/; the message names the file, the cell and the line."""


@dataclass
class ReleaseReport:
    files: list[Path]
    seconds: float = 0.0


# ------------------------------------------------------------------ checks of the source


def check_source(nb: nbformat.NotebookNode, config: GradingConfig, *, notebook_path: Path,
                 tests_dir: Path) -> None:
    """Stop on the mistakes that would make a broken release, naming file, cell and line."""
    name = notebook_path.name
    seen: dict[str, int] = {}
    points = {q.id: [0.0, 0.0] for q in config.questions}  # hidden-test points, manual points
    known = {q.id for q in config.questions}
    for index, cell in enumerate(nb.cells):
        meta = cell.metadata.get("nbgrader")
        where = f"{name}, cell {index}"
        _check_markers(cell.source, where)
        if not meta:
            continue
        grade_id = meta.get("grade_id")
        if not grade_id:
            raise ReleaseError(f"{where}: nbgrader cell without a grade_id")
        if grade_id in seen:
            raise ReleaseError(f"{where}: grade_id {grade_id!r} is also used by cell {seen[grade_id]}")
        seen[grade_id] = index
        graded = meta.get("grade") or meta.get("solution")
        qid = question_of(grade_id)
        if graded and qid not in known:
            raise ReleaseError(f"{where}: answer cell {grade_id!r} does not start with a question id "
                               f"of {CONFIG_FILE} (e.g. q1_2_...)")
        if meta.get("grade"):
            slot = 1 if meta.get("solution") or cell.cell_type == "markdown" else 0
            points[qid][slot] += float(meta.get("points", 0))
    locked_demos = {meta["grade_id"] for cell in nb.cells
                    if (meta := cell.metadata.get("nbgrader")) and cell.cell_type == "code"
                    and meta.get("locked") and not meta.get("grade") and not meta.get("solution")}
    for grade_id in config.skip_when_grading:
        if grade_id not in locked_demos:
            raise ReleaseError(f"{CONFIG_FILE}: skip_when_grading lists {grade_id!r}, which is not a locked code "
                               f"cell of {name} without points (only demonstrations may be skipped)")
    for q in config.questions:
        auto, manual = points[q.id]
        if (auto, manual) != (q.points, q.manual_points):
            raise ReleaseError(f"{name}: question {q.id} has {auto:g} test-cell points and {manual:g} manual "
                               f"points in the notebook, but {CONFIG_FILE} says {q.points:g} and {q.manual_points:g}")
    tested = {m for f in sorted(tests_dir.glob("test_*.py")) for m in TEST_MARKER.findall(f.read_text())}
    for q in config.questions:
        if q.points and q.id not in tested:
            raise ReleaseError(f"question {q.id} has {q.points:g} points for hidden tests but no test in "
                               f"{tests_dir} is marked @pytest.mark.question({q.id!r})")


def _check_markers(source: str, where: str) -> None:
    for begin, end in MARKERS:
        open_line = None
        for lineno, line in enumerate(source.splitlines(), start=1):
            text = line.strip()
            if text == begin:
                if open_line is not None:
                    raise ReleaseError(f"{where}, line {lineno}: {begin} inside the region opened at line {open_line}")
                open_line = lineno
            elif text == end:
                if open_line is None:
                    raise ReleaseError(f"{where}, line {lineno}: {end} without {begin}")
                open_line = None
        if open_line is not None:
            raise ReleaseError(f"{where}, line {open_line}: {begin} is never closed by {end}")


# ------------------------------------------------------------------ the student notebook


class ClearSolutionsWithHint(ClearSolutions):
    """nbgrader's ClearSolutions, with a stub that names the question to answer."""

    def preprocess_cell(self, cell, resources, index):
        qid = question_of(cell.metadata.get("nbgrader", {}).get("grade_id", "")) or "this cell"
        self.code_stub = {"python": f'# YOUR CODE HERE\nraise NotImplementedError("{qid}: replace this line with your answer")'}
        return super().preprocess_cell(cell, resources, index)


# nbgrader's generate_assignment order, without the steps that need its database.
RELEASE_PREPROCESSORS = (LockCells, ClearSolutionsWithHint, ClearOutput, CheckCellMetadata, ComputeChecksums,
                         ClearHiddenTests, ClearMarkScheme, ComputeChecksums, CheckCellMetadata)


def student_notebook(source: nbformat.NotebookNode) -> nbformat.NotebookNode:
    nb = nbformat.from_dict(json.loads(json.dumps(source)))
    resources: dict = {"nbgrader": {}}
    for step in RELEASE_PREPROCESSORS:
        nb, resources = step().preprocess(nb, resources)
    return nb


# ------------------------------------------------------------------ the reference module


def reference_module(source: nbformat.NotebookNode) -> str:
    """Imports of the setup cell and the function and class definitions of the solution cells."""
    chunks = ['"""Reference solutions, extracted from source/ by `gradelab release`. Do not edit."""']
    for cell in source.cells:
        meta = cell.metadata.get("nbgrader", {})
        if cell.cell_type != "code" or not (meta.get("solution") or meta.get("grade_id") == "setup"):
            continue
        code = "\n".join(l for l in cell.source.splitlines() if not l.lstrip().startswith(("%", "!")))
        tree = ast.parse(code)
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)):
                if isinstance(node, ast.ImportFrom) and node.module == "public_checks":
                    continue
                chunks.append(ast.get_source_segment(code, node))
    return "\n\n\n".join(chunks) + "\n"


# ------------------------------------------------------------------ the Gradescope bundle


SETUP_SH = """#!/usr/bin/env bash
# Gradescope runs this once, as root, when it builds the autograder image (Ubuntu 22.04 or 24.04).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${GRADELAB_VENV:-/opt/gradelab/venv}"
# gradelab runs on Python 3.11 and 3.12: matplotlib 3.11.2 and nbgrader 0.9.6 need 3.11 or newer,
# and 3.12 is the newest the pins were checked for. Ubuntu 24.04's python3 is 3.12; 22.04's is
# 3.10, so there Ubuntu's own python3.11 package is installed beside it. Where a suitable Python
# that can make a venv is already there, apt is not touched.
python=""
for candidate in python3 python3.12 python3.11; do
    if command -v "$candidate" >/dev/null \\
        && "$candidate" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 12))'; then
        python="$(command -v "$candidate")"
        break
    fi
done
if [ -z "$python" ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv >/dev/null
    python=/usr/bin/python3.11
fi
if ! "$python" -m venv "$venv" >/dev/null 2>&1; then
    # Debian and Ubuntu ship the venv's pip bootstrap in a package of its own, pythonX.Y-venv.
    rm -rf "$venv"
    apt-get update -qq
    version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python$version-venv" >/dev/null
    "$python" -m venv "$venv"
fi
"$venv/bin/pip" install -q --upgrade pip
# torch is pinned exactly; the CPU wheel index keeps CUDA's gigabytes out of the image.
"$venv/bin/pip" install -q torch==2.13.0 --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
"$venv/bin/pip" install -q "$here/gradelab"
# The sandbox runs student code as an unprivileged user, who must be able to read Python and its packages.
chmod -R a+rX "$venv"
"""

RUN_AUTOGRADER = """#!/usr/bin/env bash
# Gradescope runs this for every submission. gradelab writes results/results.json, with a score
# of 0 and the reason when the submission cannot be graded; if gradelab itself cannot run, this
# script writes that results.json.
set -uo pipefail
root="${AUTOGRADER_ROOT:-/autograder}"
venv="${GRADELAB_VENV:-/opt/gradelab/venv}"
results="$root/results/results.json"
mkdir -p "$root/results"
rm -f "$results"
"$venv/bin/gradelab" gradescope --project "$root/source/gradelab" --submission "$root/submission" \\
    --results "$results"
status=$?
if [ ! -s "$results" ]; then
    printf '{"score": 0.0, "execution_time": %d, "output": "Your submission was not graded: the autograder could not run (gradelab exited with status %d); this is not a problem of your notebook: tell your instructor.", "visibility": "visible", "stdout_visibility": "hidden", "tests": []}\\n' "$SECONDS" "$status" > "$results"
fi
"""


def _zip_add(archive: zipfile.ZipFile, name: str, data: bytes, executable: bool = False) -> None:
    info = zipfile.ZipInfo(name, date_time=ZIP_TIMESTAMP)
    info.external_attr = ((0o755 if executable else 0o644) | stat.S_IFREG) << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    archive.writestr(info, data)


def gradescope_zip(root: Path) -> bytes:
    """setup.sh and run_autograder at the top; the project (package, config, artefacts) under gradelab/."""
    include = [root / "pyproject.toml", root / "README.md", root / CONFIG_FILE]
    for folder in ("gradelab", "release", "solutions", "autograder/tests"):
        include += [p for p in (root / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        _zip_add(archive, "setup.sh", SETUP_SH.encode(), executable=True)
        _zip_add(archive, "run_autograder", RUN_AUTOGRADER.encode(), executable=True)
        for path in sorted(p for p in include if p.exists()):
            _zip_add(archive, f"gradelab/{path.relative_to(root).as_posix()}", path.read_bytes())
    return buffer.getvalue()


# ------------------------------------------------------------------ the whole release


def _write(path: Path, data: bytes | str, written: list[Path]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    written.append(path)


def release(root: Path, *, reference_data: bool = True) -> ReleaseReport:
    """Regenerate release/, solutions/ and autograder/ from source/ and grading_config.yml."""
    import time

    from gradelab.release import refdata

    started = time.monotonic()
    root = Path(root).resolve()
    config = load_config(root / CONFIG_FILE)
    source_dir = root / "source" / config.assignment.id
    notebook_path = source_dir / config.assignment.notebook
    source = nbformat.read(notebook_path, as_version=4)
    hidden_tests = root / "source" / "hidden_tests"
    check_source(source, config, notebook_path=notebook_path, tests_dir=hidden_tests)

    written: list[Path] = []
    release_dir = root / "release" / config.assignment.id
    for out in (release_dir, root / "solutions", root / "autograder"):
        shutil.rmtree(out, ignore_errors=True)
    _write(release_dir / config.assignment.notebook, nbformat.writes(student_notebook(source)) + "\n", written)
    helpers = sorted(p for p in source_dir.iterdir() if p.is_file() and p.suffix == ".py")
    reference = reference_module(source)
    imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(reference))
                if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in ([ast.alias(node.module)] if isinstance(node, ast.ImportFrom) else node.names)}
    for helper in helpers:
        _write(release_dir / helper.name, helper.read_bytes(), written)
        if helper.stem in imported:  # the reference needs it beside it; the public checks it does not
            _write(root / "solutions" / helper.name, helper.read_bytes(), written)
    _write(root / "solutions" / f"{REFERENCE_MODULE}.py", reference, written)
    if reference_data:
        data = refdata.compute(root / "solutions")
        _write(root / "solutions" / "reference_data.json", json.dumps(data, indent=1, sort_keys=True) + "\n", written)
    for test in sorted(hidden_tests.glob("*.py")):
        _write(root / "autograder" / "tests" / test.name, test.read_bytes(), written)
    _write(root / "autograder" / "gradescope_autograder.zip", gradescope_zip(root), written)
    return ReleaseReport(files=written, seconds=time.monotonic() - started)
