"""Helpers of the hidden tests (trusted side): finding figures, gradients, batched XOR training.

Everything here works on plain data from the sandbox and on models rebuilt from standard layers.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradelab import plots

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
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(10, 5)]
    for _ in range(depth - 1):
        layers += [activation(), nn.Linear(5, 5)]
    return nn.Sequential(*layers)


def train_xor_batched(models: list[nn.Sequential], *, steps: int = 10_000, lr: float = 1e-3) -> torch.Tensor:
    """xor_problem's training (SGD, BCE on logits, full batch) of several models of the same
    architecture at once; returns each model's accuracy.

    Plain SGD updates each parameter with its own gradient, so summing the models' losses trains
    every model exactly as alone, in one pass per step instead of one per model.
    """
    first = models[0]
    kinds = [type(m) for m in first]
    weights = [torch.stack([m[i].weight.detach() for m in models]).requires_grad_(True)
               for i, k in enumerate(kinds) if k is nn.Linear]
    biases = [torch.stack([(m[i].bias.detach() if m[i].bias is not None else torch.zeros(m[i].out_features))
                           for m in models]).requires_grad_(True)
              for i, k in enumerate(kinds) if k is nn.Linear]
    activations = [m for m in first if not isinstance(m, nn.Linear)]
    x = XOR_INPUTS.to(weights[0].dtype).expand(len(models), 4, 2)
    targets = XOR_TARGETS.to(weights[0].dtype).expand(len(models), 4)

    def forward() -> torch.Tensor:
        h, w_i, a_i = x, 0, 0
        for kind in kinds:
            if kind is nn.Linear:
                h = torch.baddbmm(biases[w_i].unsqueeze(1), h, weights[w_i].transpose(1, 2))
                w_i += 1
            else:
                h = activations[a_i](h)
                a_i += 1
        return h.reshape(len(models), 4)

    params = weights + biases
    for _ in range(steps):
        loss = nn.functional.binary_cross_entropy_with_logits(forward(), targets, reduction="none").mean(1).sum()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * g)
    with torch.no_grad():
        predicted = (forward() > 0).to(targets.dtype)
    return (predicted == targets).to(torch.float64).mean(1)
