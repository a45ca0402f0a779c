"""Training rebuilt models, on the trusted side only (the hidden tests of part 3)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

# Activations the analytic training pass knows, in numpy: forward from the input z, and the
# derivative from the input z and output h.
_NUMPY_ACTIVATIONS = {
    nn.Sigmoid: (lambda z, m: 1 / (1 + np.exp(-z)), lambda z, h, m: h * (1 - h)),
    nn.Tanh: (lambda z, m: np.tanh(z), lambda z, h, m: 1 - h * h),
    nn.ReLU: (lambda z, m: np.maximum(z, 0), lambda z, h, m: (z > 0).astype(h.dtype)),
    nn.LeakyReLU: (lambda z, m: np.where(z > 0, z, z * m.negative_slope).astype(z.dtype),
                   lambda z, h, m: np.where(z > 0, 1.0, m.negative_slope).astype(h.dtype)),
    nn.Identity: (lambda z, m: z, lambda z, h, m: np.ones_like(h)),
}


# What the trusted side agrees to train for a student. XOR needs a few hundred parameters; 5 models
# at these limits train 10 000 steps in seconds, where depth costs most (each layer is numpy calls
# per step: 40 Linear layers of width 8 take about ten times as long as 10 000 parameters in two).
MAX_TRAINED_PARAMETERS = 10_000
MAX_TRAINED_WIDTH = 256
MAX_TRAINED_LAYERS = 32  # Linear layers and activations


def check_training_budget(model: nn.Sequential, what: str) -> None:
    """An AssertionError naming the limit when `model` (rebuilt, standard layers) is too large to
    train: checked before any training, so a huge model costs the grader nothing."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    parameters = sum(m.in_features * m.out_features + (m.out_features if m.bias is not None else 0) for m in linears)
    widest = max((max(m.in_features, m.out_features) for m in linears), default=0)
    for found, limit, measure in ((parameters, MAX_TRAINED_PARAMETERS, "parameters"),
                                  (widest, MAX_TRAINED_WIDTH, "units in its widest layer"),
                                  (len(model), MAX_TRAINED_LAYERS, "layers (Linear and activations)")):
        if found > limit:
            raise AssertionError(
                f"{what} has {found:,} {measure}, so it was not trained: the grader trains networks of at "
                f"most {MAX_TRAINED_PARAMETERS:,} parameters, {MAX_TRAINED_WIDTH} units per layer and "
                f"{MAX_TRAINED_LAYERS} layers, and a few hundred parameters are plenty for this task")


def train_logits_batched(models: list[nn.Sequential], inputs: torch.Tensor, targets: torch.Tensor, *,
                         steps: int, lr: float) -> torch.Tensor:
    """Train several rebuilt models of one architecture at once with full-batch SGD on
    BCE-with-logits (mean over the batch), exactly as each would train alone; return their logits.

    Plain SGD updates each parameter with its own gradient, so a sum of the models' losses trains
    every model as if alone, in one pass per step. Linear layers with sigmoid, tanh, (leaky) ReLU
    use hand-written backpropagation in numpy: at these tiny sizes a step is all per-operation
    overhead, and numpy's is a fraction of autograd's (5 models x 10 000 steps: 0.75 s instead of 1.9 s).
    Other activations fall back to autograd. A Linear layer without a bias trains without one.
    Models past the training budget (`check_training_budget`) are refused before any step.
    """
    check_training_budget(models[0], "the model")
    layers = list(models[0])
    if all(type(m) in _NUMPY_ACTIVATIONS for m in layers if not isinstance(m, nn.Linear)):
        return _train_numpy(models, layers, inputs, targets, steps=steps, lr=lr)
    return _train_autograd(models, layers, inputs, targets, steps=steps, lr=lr)


def _stacked_parameters(models: list[nn.Sequential], layers: list[nn.Module]) -> tuple[list, list]:
    """Per Linear layer: the models' weights (models, out, in) and biases (models, out), copied;
    None for a layer built without a bias, which then trains without one, as it would alone."""
    weights, biases = [], []
    for i, module in enumerate(layers):
        if isinstance(module, nn.Linear):
            weights.append(torch.stack([m[i].weight.detach() for m in models]).clone())
            biases.append(None if module.bias is None else torch.stack([m[i].bias.detach() for m in models]).clone())
    return weights, biases


def _train_numpy(models, layers, inputs, targets, *, steps: int, lr: float) -> torch.Tensor:
    weights, biases = _stacked_parameters(models, layers)
    dtype = weights[0].numpy().dtype
    # Transposed weights (models, in, out) so that a layer is h @ w + b; biases as (models, 1, out).
    w = [np.ascontiguousarray(t.numpy().transpose(0, 2, 1)) for t in weights]
    b = [None if t is None else t.numpy()[:, None, :].copy() for t in biases]
    x = np.broadcast_to(inputs.numpy().astype(dtype), (len(models), *inputs.shape))
    y = np.broadcast_to(targets.numpy().astype(dtype), (len(models), targets.shape[0]))
    lr = dtype.type(lr)

    def forward(track: list | None) -> np.ndarray:
        h, k = x, 0
        for module in layers:
            if isinstance(module, nn.Linear):
                z = h @ w[k] if b[k] is None else h @ w[k] + b[k]
                k += 1
            else:
                z = _NUMPY_ACTIVATIONS[type(module)][0](h, module)
            if track is not None:
                track.append((module, h, z))  # input and output of each layer
            h = z
        return h.reshape(len(models), -1)

    with np.errstate(over="ignore"):  # exp of large inputs in a sigmoid: 1 / inf is the right 0
        for _ in range(steps):
            track: list = []
            logits = forward(track)
            delta = ((1 / (1 + np.exp(-logits)) - y) / y.shape[1])[..., None]
            k = len(w) - 1
            for module, h_in, h_out in reversed(track):
                if isinstance(module, nn.Linear):
                    grad_w = h_in.transpose(0, 2, 1) @ delta
                    if b[k] is not None:
                        b[k] -= lr * delta.sum(1, keepdims=True)
                    if k > 0:
                        delta = delta @ w[k].transpose(0, 2, 1)
                    w[k] -= lr * grad_w
                    k -= 1
                else:
                    delta = delta * _NUMPY_ACTIVATIONS[type(module)][1](h_in, h_out, module)
        return torch.from_numpy(np.ascontiguousarray(forward(None)))


def _train_autograd(models, layers, inputs, targets, *, steps: int, lr: float) -> torch.Tensor:
    weights, biases = _stacked_parameters(models, layers)
    x = inputs.to(weights[0].dtype).expand(len(models), *inputs.shape)
    y = targets.to(weights[0].dtype).expand(len(models), targets.shape[0])

    def forward() -> torch.Tensor:
        h, k = x, 0
        for module in layers:
            if isinstance(module, nn.Linear):
                h = (torch.bmm(h, weights[k].transpose(1, 2)) if biases[k] is None
                     else torch.baddbmm(biases[k].unsqueeze(1), h, weights[k].transpose(1, 2)))
                k += 1
            else:
                h = module(h)
        return h.reshape(len(models), -1)

    for _ in range(steps):
        params = [p.requires_grad_(True) for p in weights + biases if p is not None]
        loss = nn.functional.binary_cross_entropy_with_logits(forward(), y, reduction="none").mean(1).sum()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * g)
        weights = [w.detach() for w in weights]
        biases = [None if b is None else b.detach() for b in biases]
    with torch.no_grad():
        return forward()
