"""Shared fixtures of the project's own test suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Another CPU's kernels, chosen by hand on this one (an AMD CPU, or an older Intel one, picks other
# kernels than this machine's by itself): torch's non-vectorised kernels, MKL's SSE2-compatible
# code path for matrix products, OpenBLAS's Haswell kernels (numpy; what AMD Zen CPUs get). Each
# library reads its variable once per process, so a grading worker's sandboxes and test runners,
# forked from it, use these kernels too.
OTHER_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OPENBLAS_CORETYPE": "Haswell"}


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
    from gradelab.project import load_reference

    return load_reference(ROOT / "solutions")


@pytest.fixture(scope="session")
def kernel_environments() -> dict[str, dict[str, str]]:
    """Environments for subprocesses: this machine's own kernels, and OTHER_KERNELS."""
    native = {name: value for name, value in os.environ.items() if name not in OTHER_KERNELS}
    return {"native": native, "other": {**native, **OTHER_KERNELS}}
