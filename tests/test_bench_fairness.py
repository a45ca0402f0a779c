"""A smoke run of bench/fairness.py: it simulates every statistical hidden test on every variant
and prints its table (a few submissions each: the rates it prints mean nothing here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

TESTS = ["q1_1 test_matrix_and_vector", "q1_4 test_build_model_uniform_weights", "q2_8 test_glorot_normal_weights",
         "q3_3 test_xor_solved_reliably", "q3_1 test_kill_gradients[sigmoid]", "q3_1 test_kill_gradients[tanh]",
         "qb_1 test_he_init[0.0]", "qb_1 test_he_init[0.2]"]


def test_quick_run_prints_a_row_per_test_and_variant():
    sys.path.insert(0, str(ROOT / "bench"))
    import fairness

    run = subprocess.run([sys.executable, str(ROOT / "bench" / "fairness.py"), "--quick"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    for test in TESTS:
        whole = [line for line in lines if line.startswith(test + " ") and " whole test " in line]
        kind = test.split()[1].removeprefix("test_").split("[")[0]
        variants = fairness.VARIANTS[{"matrix_and_vector": "matrix", "build_model_uniform_weights": "uniform",
                                      "glorot_normal_weights": "glorot", "xor_solved_reliably": "xor",
                                      "kill_gradients": "kill", "he_init": "he"}[kind]]
        assert len(whole) == len(variants), (test, whole)
        for variant in variants:
            assert any(f"  {variant.label}  " in line for line in whole), (test, variant.label)
    assert "--quick: too few submissions" in run.stdout
