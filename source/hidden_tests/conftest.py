"""Helpers of the hidden tests (trusted side): finding figures, gradients, batched XOR training.

Everything here works on plain data from the sandbox and on models rebuilt from standard layers.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradelab import plots
from gradelab.modelspec import layer, train_logits_batched
from gradelab.testing import seed_torch

XOR_INPUTS = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
XOR_TARGETS = torch.tensor([0.0, 1.0, 1.0, 0.0])


@pytest.fixture
def probe(rng) -> torch.Tensor:
    """A random batch for the 2-input models, different for every submission."""
    return torch.rand(16, 2, generator=rng) * 4 - 2


@pytest.fixture
def find_figure(figures, executed_cells):
    """The captured figure made by the cell with `grade_id`, or held in the variable `name`."""
    parsed = [plots.FigureData.from_capture(f) for f in figures if "error" not in f]
    cell_of = {c.get("grade_id"): c["index"] for c in executed_cells if c.get("grade_id")}
    raw_names = [f.get("names", []) for f in figures if "error" not in f]

    def find(*, grade_id: str | None = None, name: str | None = None) -> plots.FigureData | None:
        if name is not None:
            for fig, names in zip(parsed, raw_names):
                if name in names:
                    return fig
        if grade_id is not None and grade_id in cell_of:
            found = plots.figures_in_cell(parsed, cell_of[grade_id])
            return found[0] if found else None
        return None

    return find


def expected_gradients(model: nn.Module, seed: int = 0) -> dict:
    """The gradients `plot_grad(model)` shows, recomputed here on the rebuilt model."""
    from vanishing_helpers import gradient_data

    return gradient_data(model, seed=seed)


def classifier_gradients(model: nn.Module, seed: int) -> list[torch.Tensor]:
    """gradient_print's pass (10 inputs, 5 classes, cross-entropy) on the rebuilt model."""
    from vanishing_helpers import gradient_print

    return gradient_print(model, seed=seed, verbose=False)


def deep_reference(depth: int, activation: type[nn.Module], seed: int) -> nn.Sequential:
    seed_torch(seed)
    layers: list[nn.Module] = [nn.Linear(10, 5)]
    for _ in range(depth - 1):
        layers += [activation(), nn.Linear(5, 5)]
    return nn.Sequential(*layers)


def train_xor_batched(models: list[nn.Sequential], *, steps: int = 10_000, lr: float = 1e-3) -> torch.Tensor:
    """xor_problem's training (SGD, BCE on logits, full batch) of each model; their accuracies."""
    logits = train_logits_batched(models, XOR_INPUTS, XOR_TARGETS, steps=steps, lr=lr)
    return ((logits > 0).to(XOR_TARGETS.dtype) == XOR_TARGETS).to(torch.float64).mean(1)


def weights_over_draws(student, builder: str, activation: str, *, draws: int, probe: torch.Tensor,
                       seed: int) -> torch.Tensor:
    """The weight matrices of `draws` models from the student's `builder`, each built with torch
    seeded differently, flattened into one float64 tensor: distributions are judged over many draws."""
    _, checked = student.module(builder, layer(activation), probe=probe, seed=seed)  # rebuilt and checked
    others = student.module_draws(builder, layer(activation), seeds=[seed + draw for draw in range(1, draws)])
    weights = [t.flatten() for state in [checked["state"], *others] for t in state if t.dim() == 2]
    if not weights:
        raise AssertionError(f"{builder} returns models without weight matrices")
    return torch.cat(weights).to(torch.float64)
