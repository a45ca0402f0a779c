"""Training rebuilt models, on the trusted side only (the hidden tests of part 3)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


# Activations the analytic training pass knows, in numpy, writing into preallocated arrays:
# forward(z, out, module) and the derivative derivative(z, h, out, module) from the input z and
# output h (None: the derivative is 1, nothing to multiply).
def _sigmoid(z, out, m):
    np.negative(z, out=out)
    np.exp(out, out=out)
    out += 1
    np.reciprocal(out, out=out)


def _sigmoid_derivative(z, h, out, m):
    np.subtract(1, h, out=out)
    out *= h


def _tanh_derivative(z, h, out, m):
    np.multiply(h, h, out=out)
    np.subtract(1, out, out=out)


def _leaky_relu(z, out, m):
    np.multiply(z, m.negative_slope, out=out)
    np.copyto(out, z, where=z > 0)


def _leaky_relu_derivative(z, h, out, m):
    out.fill(m.negative_slope)
    np.copyto(out, 1, where=z > 0)


_NUMPY_ACTIVATIONS = {
    nn.Sigmoid: (_sigmoid, _sigmoid_derivative),
    nn.Tanh: (lambda z, out, m: np.tanh(z, out=out), _tanh_derivative),
    nn.ReLU: (lambda z, out, m: np.maximum(z, 0, out=out), lambda z, h, out, m: np.greater(z, 0, out=out)),
    nn.LeakyReLU: (_leaky_relu, _leaky_relu_derivative),
    nn.Identity: (lambda z, out, m: np.copyto(out, z), None),
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
    overhead, and numpy's is a fraction of autograd's (the reference's 5 models x 10 000 steps:
    0.33 s instead of 1.9 s).
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
    """Every array is allocated once and each step writes into them: at these sizes a step costs
    its number of numpy calls. A Linear layer's bias is the last row of an augmented weight
    matrix, its input carries a column of ones, so that one matmul is the layer forward and one
    its whole gradient; lr / batch is folded into the output's delta (every gradient is linear in it)."""
    weights, biases = _stacked_parameters(models, layers)
    dtype = weights[0].numpy().dtype
    count, batch = len(models), inputs.shape[0]
    # Per Linear layer: weights (models, in [+ 1], out), and its input (models, batch, in [+ 1]).
    w = [np.ascontiguousarray(np.concatenate([t.numpy().transpose(0, 2, 1)] + ([] if b is None else [b.numpy()[:, None, :]]),
                                             axis=1)) for t, b in zip(weights, biases)]
    fed = [np.ones((count, batch, wk.shape[1]), dtype) for wk in w]
    fed_values = [f[..., : wk.shape[1] - (b is not None)] for f, wk, b in zip(fed, w, biases)]
    # The modules in stages: activations before the first Linear (on the constant input: once),
    # then per Linear layer the activations after it, the last of which feeds the next Linear.
    leading = layers[: next(i for i, m in enumerate(layers) if isinstance(m, nn.Linear))]
    after: list[list[nn.Module]] = []
    for module in layers[len(leading):]:
        if isinstance(module, nn.Linear):
            after.append([])
        else:
            after[-1].append(module)
    h = inputs.numpy().astype(dtype)
    h = np.broadcast_to(h, (count, *h.shape)).copy()
    for module in leading:
        h_next = np.empty_like(h)
        _NUMPY_ACTIVATIONS[type(module)][0](h, h_next, module)
        h = h_next
    fed_values[0][...] = h
    # Per stage: the Linear output z, then each activation's output; the stage's last array is the
    # next layer's input (z itself for a Linear right after a Linear), or the network's output.
    # A scratch array per activation takes its derivative.
    outs = []
    for k, chain in enumerate(after):
        stage = [np.empty((count, batch, w[k].shape[2]), dtype) for _ in range(len(chain) + 1)]
        if k + 1 < len(w):
            stage[-1] = fed_values[k + 1]
        outs.append(stage)
    scratch = [[np.empty((count, batch, w[k].shape[2]), dtype) for _ in chain] for k, chain in enumerate(after)]
    deltas = [np.empty((count, batch, wk.shape[2]), dtype) for wk in w]
    grads = [np.empty_like(wk) for wk in w]
    fed_t = [f.transpose(0, 2, 1) for f in fed]
    w_values_t = [wk[:, : f.shape[2], :].transpose(0, 2, 1) for wk, f in zip(w, fed_values)]
    scale = dtype.type(lr / batch)
    scaled_targets = (scale * targets.numpy().astype(dtype)).reshape(1, batch, 1)

    def forward() -> None:
        for k, chain in enumerate(after):
            stage = outs[k]
            np.matmul(fed[k], w[k], out=stage[0])
            for i, module in enumerate(chain):
                _NUMPY_ACTIVATIONS[type(module)][0](stage[i], stage[i + 1], module)

    with np.errstate(over="ignore"):  # exp of large inputs in a sigmoid: 1 / inf is the right 0
        for _ in range(steps):
            forward()
            delta = deltas[-1]  # d(loss)/d(output) * lr: lr * (sigmoid(output) - target) / batch
            np.negative(outs[-1][-1], out=delta)
            np.exp(delta, out=delta)
            delta += 1
            np.divide(scale, delta, out=delta)
            delta -= scaled_targets
            for k in range(len(w) - 1, -1, -1):
                delta = deltas[k]  # of the output (k last), else computed by layer k + 1
                for i in range(len(after[k]) - 1, -1, -1):  # back through the activations after layer k
                    module = after[k][i]
                    derivative = _NUMPY_ACTIVATIONS[type(module)][1]
                    if derivative is not None:
                        derivative(outs[k][i], outs[k][i + 1], scratch[k][i], module)
                        delta *= scratch[k][i]
                np.matmul(fed_t[k], delta, out=grads[k])
                if k > 0:  # the previous layer's delta, with this layer's weights before the step
                    np.matmul(delta, w_values_t[k], out=deltas[k - 1])
                w[k] -= grads[k]
        forward()
    return torch.from_numpy(np.ascontiguousarray(outs[-1][-1].reshape(count, -1)))


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
