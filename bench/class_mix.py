"""A class-sized batch with the mix a real course sees, for `run_bench.py batch`.

The example batch (examples/make_submissions.py) is built for coverage: most of its variants leave
XOR unanswered and a third are attacks. A class hands in mostly correct or nearly correct
notebooks, every question answered, a few wrong ones, and one or two that go wrong in a way that
costs time. The class is made of identical units of UNIT submissions in that mix, so that any
whole number of units (the sample nbgrader grades) has the class's mix exactly.
"""

from __future__ import annotations

import random
from pathlib import Path

import nbformat
from make_submissions import (BONUS_LEFT_AS_TEMPLATE, CORRECT, D_AS_VECTOR, HANGING_CELL, LINEAR_XOR,
                              NEGATIVE_WEIGHTS_ONLY, NUMPY_SIGMOID, RELEASE_NOTEBOOK, SIGMOID_GRAD_AGAIN,
                              TANH_PLOT_OF_SIGMOID_MODEL, UNIFORM_0_1, VARIANTS, Variant, render)

# Correct: the instructor's answers and the example corpus's correct answers, written differently.
CORRECT_VARIANTS = {"reference": Variant(CORRECT),
                    **{name.removeprefix("correct_"): v for name, v in VARIANTS.items() if name.startswith("correct_")}}
# Nearly correct: every question answered, one of them wrong (or the bonus left undone).
NEARLY_CORRECT = {
    "sigmoid_grad_again": {"q1_2_sigmoid": SIGMOID_GRAD_AGAIN},
    "d_as_vector": {"q1_1_tensors": D_AS_VECTOR},
    "numpy_sigmoid": {"q1_2_sigmoid": NUMPY_SIGMOID},
    "bonus_not_done": BONUS_LEFT_AS_TEMPLATE,
    "negative_weights_only": {"q3_2_negative": NEGATIVE_WEIGHTS_ONLY},
    "uniform_0_1": {"q1_4_build_model": UNIFORM_0_1},
    "tanh_plot_of_sigmoid_model": {"q2_4_plot": TANH_PLOT_OF_SIGMOID_MODEL},
    "linear_xor": {"q3_3_xor": LINEAR_XOR},
}
WRONG = ("wrong_two_hidden_layers", "wrong_activation_ignored", "wrong_types_everywhere")
# Pathological, the kind a class really has: a cell that loops until the cell time limit stops it.
PATHOLOGICAL = {"looping_depth_cell": {"q3_1_depth": HANGING_CELL}}

UNIT_MIX = {"correct": 18, "nearly correct": 8, "wrong": 3, "pathological": 1}
UNIT = sum(UNIT_MIX.values())


def _unit() -> list[tuple[str, str, Variant]]:
    """One unit: (kind, variant name, variant), in a fixed shuffled order (a class list is not sorted by kind)."""
    correct = list(CORRECT_VARIANTS.items())
    unit = [("correct", *correct[i % len(correct)]) for i in range(UNIT_MIX["correct"])]
    unit += [("nearly correct", name, Variant({**CORRECT, **edits})) for name, edits in NEARLY_CORRECT.items()]
    unit += [("wrong", name.removeprefix("wrong_"), VARIANTS[name]) for name in WRONG]
    unit += [("pathological", name, Variant({**CORRECT, **edits})) for name, edits in PATHOLOGICAL.items()]
    assert [sum(kind == k for kind, _, _ in unit) for k in UNIT_MIX] == list(UNIT_MIX.values())
    random.Random(0).shuffle(unit)
    return unit


def make_class_batch(out_dir: Path, units: int) -> list[Path]:
    """units x UNIT submissions, <student id>_<kind>_<variant>.ipynb, each file distinct."""
    release = nbformat.read(RELEASE_NOTEBOOK, as_version=4)
    out_dir.mkdir(parents=True, exist_ok=True)
    unit, paths = _unit(), []
    for number in range(units * UNIT):
        kind, name, variant = unit[number % UNIT]
        student_id = f"c{number:04d}"
        path = out_dir / f"{student_id}_{kind.replace(' ', '_')}_{name}.ipynb"
        path.write_text(render(variant, release, student_id), encoding="utf-8")
        paths.append(path)
    return paths


def describe_mix() -> str:
    return ", ".join(f"{count} {kind}" for kind, count in UNIT_MIX.items()) + f" per {UNIT}"
