"""Helpers of the hidden tests (trusted side): finding figures, gradients, batched XOR training.

Everything here works on plain data from the sandbox and on models rebuilt from standard layers.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradelab.boundary.figures import FigureData
from gradelab.hidden.plotcheck import figures_in_cell
from gradelab.hidden import describe_standard, layer, seed_torch, train_logits_batched

XOR_INPUTS = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
XOR_TARGETS = torch.tensor([0.0, 1.0, 1.0, 0.0])


@pytest.fixture
def probe(rng) -> torch.Tensor:
    """A random batch for the 2-input models, different for every submission."""
    return torch.rand(16, 2, generator=rng) * 4 - 2


@pytest.fixture
def find_figure(figures, executed_cells):
    """The captured figure made by the cell with `grade_id`, or held in the variable `name`.
    A figure that could not be read is not among `figures`: it counts as no figure."""
    cell_of = {c.grade_id: c.index for c in executed_cells if c.grade_id}

    def find(*, grade_id: str | None = None, name: str | None = None) -> FigureData | None:
        if name is not None:
            for fig in figures:
                if name in fig.names:
                    return fig
        if grade_id is not None and grade_id in cell_of:
            found = figures_in_cell(figures, cell_of[grade_id])
            return found[0] if found else None
        return None

    return find


def expected_gradients(model: nn.Module, seed: int = 0) -> dict:
    """The gradients `plot_grad(model)` shows, recomputed here on the rebuilt model."""
    from vanishing_helpers import gradient_data

    return gradient_data(model, seed=seed)


def classifier_gradients(model: nn.Module, seed: int, *, what: str | None = None) -> list[torch.Tensor]:
    """gradient_print's pass (10 inputs, 5 classes, cross-entropy) on the rebuilt model. With
    `what` (the model comes from the student's code), a model that cannot take that pass is an
    AssertionError saying so."""
    from vanishing_helpers import gradient_print

    try:
        grads = gradient_print(model, seed=seed, verbose=False)
    except (RuntimeError, ValueError, IndexError) as exc:
        if what is None:
            raise
        raise AssertionError(f"{what} cannot take gradient_print's pass (a batch of 10 float32 inputs, "
                             f"5 classes): {type(exc).__name__}: {exc}"[:600]) from None
    if not grads and what is not None:
        raise AssertionError(f"{what} has no parameters")
    return grads


def deep_reference(depth: int, activation: type[nn.Module], seed: int) -> nn.Sequential:
    seed_torch(seed)
    layers: list[nn.Module] = [nn.Linear(10, 5)]
    for _ in range(depth - 1):
        layers += [activation(), nn.Linear(5, 5)]
    return nn.Sequential(*layers)


def train_xor_batched(models: list[nn.Sequential], *, steps: int = 10_000, lr: float = 1e-3) -> torch.Tensor:
    """xor_problem's training (SGD, BCE on logits, full batch) of each model; their accuracies.
    The models come from make_xor_model: one architecture and dtype, one logit per input."""
    described = [describe_standard(m) for m in models]
    if not all(state for _, state in described):
        raise AssertionError("make_xor_model's model has no Linear layer: nothing to train")
    layers, dtypes = described[0][0], {state[0].dtype for _, state in described}
    if any(other != layers for other, _ in described) or len(dtypes) != 1:
        raise AssertionError("make_xor_model builds models of different architectures or dtypes on different "
                             "seeds; it should build the same network each time, with fresh weights")
    with torch.no_grad():
        out = models[0](XOR_INPUTS.to(next(iter(dtypes))))
    if out.numel() != len(XOR_INPUTS):
        raise AssertionError(f"the model's output for the 4 XOR inputs has shape {tuple(out.shape)}; "
                             f"xor_problem trains one logit per input")
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
