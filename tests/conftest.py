"""Shared fixtures of the project's own test suite."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    # Tests fork sandboxes: a process that ran a multi-threaded torch op deadlocks its forks.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def reference():
    """The reference solutions as released (solutions/reference_solutions.py)."""
    from gradelab.refdata import load_reference

    return load_reference(ROOT / "solutions")
