"""Notebooks as a student has them: the release folder, and the same with the reference answers."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
from nbgrader.preprocessors import ClearHiddenTests

NOTEBOOK = "vanishing_gradients.ipynb"


def reference_notebook(root: Path) -> nbformat.NotebookNode:
    """The source notebook without its hidden tests: every answer is the reference solution."""
    source = nbformat.read(root / "source" / "vanishing_gradients" / NOTEBOOK, as_version=4)
    notebook, _ = ClearHiddenTests().preprocess(source, {})
    return notebook


def student_folder(root: Path, dest: Path, *, answered: bool = False) -> Path:
    """What a student receives (release/vanishing_gradients/, nothing else), copied to `dest`;
    with `answered`, its notebook holds the reference answers. Returns the notebook's path."""
    shutil.copytree(root / "release" / "vanishing_gradients", dest, dirs_exist_ok=True)
    if answered:
        nbformat.write(reference_notebook(root), dest / NOTEBOOK)
    return dest / NOTEBOOK
