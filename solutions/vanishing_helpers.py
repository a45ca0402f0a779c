"""Helpers for the vanishing-gradients assignment.

Students import these in the notebook; they replace the course's original `helpers12` module and
the helpers of the FCN lecture notebook. Each one does the original's job without its defects:
data is seeded, gradients are zeroed before a pass, and wrong inputs get a message that says what
to fix instead of a shape error deep inside torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

__all__ = ["plot_grad", "gradient_data", "xor_problem", "XorResult", "gradient_print", "Initializer"]


def _regression_data(n_samples: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The 2-in, 2-out regression task of the original helper: x1 ~ U(-pi, pi), x2 ~ U(0, 1),
    y = (sin x1 + x2, cos x1 + x2) + N(0, 0.05)."""
    gen = torch.Generator().manual_seed(seed)
    x1 = (torch.rand(n_samples, generator=gen, dtype=torch.float64) * 2 - 1) * math.pi
    x2 = torch.rand(n_samples, generator=gen, dtype=torch.float64)
    noise = torch.randn(n_samples, 2, generator=gen, dtype=torch.float64) * 0.05
    inputs = torch.stack([x1, x2], dim=1)
    targets = torch.stack([torch.sin(x1) + x2, torch.cos(x1) + x2], dim=1) + noise
    return inputs.to(dtype), targets.to(dtype)


def _first_parameter(model: nn.Module) -> torch.Tensor:
    if not isinstance(model, nn.Module):
        raise TypeError(f"plot_grad expects a torch.nn.Module, got {type(model).__name__}")
    params = list(model.parameters())
    if not params:
        raise ValueError("plot_grad: the model has no parameters (did build_model return the layers?)")
    return params[0]


def gradient_data(model: nn.Module, *, seed: int = 0, n_samples: int = 100) -> dict[str, np.ndarray]:
    """One forward and backward pass of `model` on the seeded regression data (MSE loss).

    Returns the flattened gradient of every weight matrix (parameters with two or more
    dimensions, in registration order), keyed by parameter name. Gradients are zeroed first, so
    calling this twice gives the same values.
    """
    first = _first_parameter(model)
    dtype = first.dtype if first.is_floating_point() else torch.float32
    n_inputs = first.shape[1] if first.dim() == 2 else None
    if n_inputs is not None and n_inputs != 2:
        raise ValueError(f"plot_grad: the model's first layer takes {n_inputs} inputs; this task has 2 inputs")
    inputs, targets = _regression_data(n_samples, seed, dtype)

    model.zero_grad(set_to_none=True)
    outputs = model(inputs)
    if not isinstance(outputs, torch.Tensor):
        raise TypeError(f"plot_grad: the model returned a {type(outputs).__name__}; it must return one tensor")
    if outputs.shape != targets.shape:
        raise ValueError(f"plot_grad: the model's output has shape {tuple(outputs.shape)}; "
                         f"this task needs {tuple(targets.shape)} (2 outputs)")
    nn.functional.mse_loss(outputs, targets).backward()

    grads: dict[str, np.ndarray] = {}
    for name, param in model.named_parameters():
        if param.dim() < 2:
            continue  # biases: the plot shows weight matrices only, like the original
        if param.requires_grad and param.grad is None:
            raise ValueError(f"plot_grad: parameter {name!r} received no gradient; is it used in forward()?")
        if param.grad is not None:
            grads[name] = param.grad.detach().to(torch.float64).flatten().numpy().copy()
    if not grads:
        raise ValueError("plot_grad: the model has no weight matrices with gradients")
    return grads


def plot_grad(model: nn.Module, *, seed: int = 0, n_samples: int = 100, title: str | None = None):
    """Violin plot of the weight gradients of each layer after one pass on seeded data.

    Returns the matplotlib Figure. The data behind it stays reachable as `fig.gradient_data`
    (parameter name -> flattened gradients), so the plot can be checked by content.
    """
    grads = gradient_data(model, seed=seed, n_samples=n_samples)
    fig, ax = plt.subplots()
    positions = list(range(1, len(grads) + 1))
    ax.violinplot(list(grads.values()), positions=positions)
    ax.grid(True)
    ax.set_xticks(positions)
    ax.set_xlabel("Layer")
    ax.set_ylabel("Gradient values")
    if title:
        ax.set_title(title)
    fig.gradient_data = grads
    return fig


@dataclass
class XorResult:
    """What `xor_problem` trained and how well."""

    model: nn.Module
    logits: torch.Tensor
    predicted: torch.Tensor
    targets: torch.Tensor
    final_loss: float

    @property
    def accuracy(self) -> float:
        return float((self.predicted == self.targets).float().mean())

    @property
    def solved(self) -> bool:
        return self.accuracy == 1.0


XOR_INPUTS = ((0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0))
XOR_TARGETS = (0.0, 1.0, 1.0, 0.0)


def xor_problem(model: nn.Module, *, steps: int = 10_000, lr: float = 1e-3, verbose: bool = True) -> XorResult:
    """Train `model` on XOR with the lecture's fixed recipe (SGD, lr=1e-3, 10 000 full-batch steps,
    BCE on logits), print what it learned, and return it."""
    inputs = torch.tensor(XOR_INPUTS)
    targets = torch.tensor(XOR_TARGETS)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loss = torch.tensor(float("nan"))
    # Four inputs and a few hundred weights: each op is far too small to split over threads, and
    # torch's thread pool spends the 10 000 steps synchronising (173 s instead of 27 s on a busy
    # 2-core machine). The caller's setting is restored.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            outputs = model(inputs).squeeze()
            loss = nn.functional.binary_cross_entropy_with_logits(outputs, targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)

    with torch.no_grad():
        logits = model(inputs)
    predicted = (logits.squeeze() > 0).float()
    result = XorResult(model, logits, predicted, targets, float(loss.detach()))
    if verbose:
        print("Predicted logits:\n", logits)
        print("Predicted labels:\n", predicted)
        print("Targets:\n", targets)
        print(f"Accuracy: {result.accuracy:.2f}")
    return result


def gradient_print(model: nn.Module, *, seed: int | None = 0, verbose: bool = True) -> list[torch.Tensor]:
    """One pass of a 10-input, 5-class classifier on random data; print (and return) every
    parameter's gradient, as in the lecture. Gradients are zeroed first."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    inputs = torch.rand(32, 10, generator=gen)
    targets = torch.randint(low=0, high=5, size=(32,), generator=gen)
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(inputs), targets)
    loss.backward()
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    if verbose:
        for i, grad in enumerate(grads):
            print(f"\n--------- PARAMETER {i} GRADIENT ---------\n")
            print(grad)
    return grads


class Initializer:
    """Set the weights of the `target_layer`-th module that `Module.apply` visits to a constant.

    `Module.apply` visits submodules in post-order (children first, the container last), and
    the count includes activations, so the index is that of the visit, not of the Linear layer.
    """

    def __init__(self, target_layer: int, multiplier: float):
        self._counter = -1
        self.target_layer = target_layer
        self.multiplier = multiplier

    def __call__(self, submodule: nn.Module) -> None:
        self._counter += 1
        if self._counter == self.target_layer:
            if not isinstance(getattr(submodule, "weight", None), torch.Tensor):
                raise TypeError(f"Initializer: module #{self.target_layer} visited by apply() is a "
                                f"{type(submodule).__name__}, which has no weight; pick the index of a Linear layer")
            with torch.no_grad():
                submodule.weight.fill_(self.multiplier)
