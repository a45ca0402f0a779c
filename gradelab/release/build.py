"""The whole release: `source/` in, `release/`, `solutions/` and `autograder/` out.

The reference data the hidden tests compare against is computed here (refdata), with fixed seeds,
so two releases are byte-identical.
"""

from __future__ import annotations

import ast
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat

from gradelab.project import Project
from gradelab.release.checks import check_source
from gradelab.release.gradescope import gradescope_zip
from gradelab.release.student import reference_module, student_notebook


@dataclass
class ReleaseReport:
    files: list[Path]
    seconds: float = 0.0


def _write(path: Path, data: bytes | str, written: list[Path]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    written.append(path)


def release(root: Path) -> ReleaseReport:
    """Regenerate release/, solutions/ and autograder/ from source/ and grading_config.yml."""
    from gradelab.release import refdata  # torch: only once the release is under way

    started = time.monotonic()
    project = Project.load(root)
    config = project.config
    source = nbformat.read(project.source_notebook, as_version=4)
    check_source(source, config, notebook_path=project.source_notebook, tests_dir=project.hidden_tests_source)

    written: list[Path] = []
    for out in project.release_outputs():
        shutil.rmtree(out, ignore_errors=True)
    _write(project.release_notebook, nbformat.writes(student_notebook(source)) + "\n", written)
    helpers = sorted(p for p in project.source_dir.iterdir() if p.is_file() and p.suffix == ".py")
    reference = reference_module(source)
    imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(reference))
                if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in ([ast.alias(node.module)] if isinstance(node, ast.ImportFrom) else node.names)}
    for helper in helpers:
        _write(project.release_dir / helper.name, helper.read_bytes(), written)
        if helper.stem in imported:  # the reference needs it beside it; the public checks it does not
            _write(project.solutions_dir / helper.name, helper.read_bytes(), written)
    _write(project.reference_file, reference, written)
    data = refdata.compute(project.solutions_dir)
    _write(project.reference_data_file, json.dumps(data, indent=1, sort_keys=True) + "\n", written)
    for test in sorted(project.hidden_tests_source.glob("*.py")):
        _write(project.tests_dir / test.name, test.read_bytes(), written)
    _write(project.gradescope_zip, gradescope_zip(project), written)
    return ReleaseReport(files=written, seconds=time.monotonic() - started)
