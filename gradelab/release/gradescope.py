"""The Gradescope autograder bundle: setup.sh and run_autograder at the top, the project under
gradelab/, with fixed timestamps so two releases give the same bytes."""

from __future__ import annotations

import io
import stat
import zipfile

from gradelab.config import CONFIG_FILE
from gradelab.project import Project

ZIP_TIMESTAMP = (1980, 1, 1, 0, 0, 0)


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


def gradescope_zip(project: Project) -> bytes:
    """setup.sh and run_autograder at the top; the project (package, config, artefacts) under gradelab/."""
    root = project.root
    include = [root / "pyproject.toml", root / "README.md", root / CONFIG_FILE]
    for folder in (root / "gradelab", project.release_dir.parent, project.solutions_dir, project.tests_dir):
        include += [p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        _zip_add(archive, "setup.sh", SETUP_SH.encode(), executable=True)
        _zip_add(archive, "run_autograder", RUN_AUTOGRADER.encode(), executable=True)
        for path in sorted(p for p in include if p.exists()):
            _zip_add(archive, f"gradelab/{path.relative_to(root).as_posix()}", path.read_bytes())
    return buffer.getvalue()
