"""Public checks: quick feedback in the notebook, before submitting.

`check("q1_2")` looks at the answers defined in the notebook that calls it and prints what is
right; the first problem found raises `PublicCheckFailed` with a message that says what to fix.
These checks are deliberately few and simple. The hidden tests grade the same questions with
other inputs, after submission, in a separate process.
"""

from __future__ import annotations

import inspect
import math

import matplotlib.figure
import torch
from torch import nn

__all__ = ["check", "PublicCheckFailed"]


class PublicCheckFailed(AssertionError):
    """A public check found a problem; the message says what to fix."""


class NotAnsweredYet(PublicCheckFailed):
    """The answer still raises NotImplementedError or is missing."""


def _need(ns: dict, name: str):
    if name not in ns:
        raise NotAnsweredYet(f"`{name}` is not defined: run the cell that defines it (or write it)")
    return ns[name]


def _ensure(condition: bool, message: str) -> None:
    if not condition:
        raise PublicCheckFailed(message)


def _call(fn, *args):
    try:
        return fn(*args)
    except NotImplementedError as exc:
        raise NotAnsweredYet(f"`{getattr(fn, '__name__', fn)}` is not answered yet") from exc


def _linear_layers(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _check_q1_1(ns):
    x, y, z = _need(ns, "x"), _need(ns, "y"), _need(ns, "z")
    _ensure(all(isinstance(v, torch.Tensor) for v in (x, y, z)), "x, y and z must be torch tensors")
    _ensure(float(z) == 21.0, f"z should be x * y = 21, got {float(z)}")
    A, b, c = _need(ns, "A"), _need(ns, "b"), _need(ns, "c")
    _ensure(tuple(A.shape) == (3, 3), f"A must have shape (3, 3), got {tuple(A.shape)}")
    _ensure(tuple(b.shape) == (3, 1), f"b must be a column vector of shape (3, 1), got {tuple(b.shape)}")
    _ensure(bool(((A >= -1) & (A <= 1)).all()), "A's values must lie in [-1, 1]")
    _ensure(tuple(c.shape) == (3, 1), f"c must have shape (3, 1), got {tuple(c.shape)}: is d a column vector?")
    return "x, y, z, A, b and c have the right types and shapes"


def _check_q1_2(ns):
    sig, grad = _need(ns, "my_sigmoid"), _need(ns, "my_sigmoid_grad")
    x = torch.tensor([-2.0, 0.0, 3.0], dtype=torch.float64)
    a = _call(sig, x)
    _ensure(isinstance(a, torch.Tensor), f"my_sigmoid must return a tensor, got {type(a).__name__}")
    _ensure(torch.allclose(a, torch.sigmoid(x)), "my_sigmoid(x) does not match 1 / (1 + exp(-x))")
    g = _call(grad, a)
    _ensure(isinstance(g, torch.Tensor), f"my_sigmoid_grad must return a tensor, got {type(g).__name__}")
    _ensure(torch.allclose(g, a * (1 - a)),
            "my_sigmoid_grad(a) should be a * (1 - a): it receives the activation, not x")
    return "my_sigmoid and my_sigmoid_grad give the right values"


def _check_q1_3(ns):
    pg, x = _need(ns, "pytorch_gradients"), _need(ns, "x")
    _ensure(isinstance(pg, torch.Tensor), "pytorch_gradients must be a tensor (x.grad after backward())")
    _ensure(pg.shape == x.shape, f"pytorch_gradients must have the shape of x {tuple(x.shape)}, got {tuple(pg.shape)}")
    s = torch.sigmoid(x.detach().to(torch.float64))
    _ensure(torch.allclose(pg.detach().to(torch.float64), s * (1 - s), atol=1e-6),
            "pytorch_gradients does not match the derivative of the sigmoid at x")
    return "autograd gradients match the sigmoid's derivative"


def _build(ns, name, activation):
    fn = _need(ns, name)
    model = _call(fn, activation)
    _ensure(isinstance(model, nn.Module), f"{name} must return an nn.Module, got {type(model).__name__}")
    return model


def _check_q1_4(ns):
    model = _build(ns, "build_model", nn.Sigmoid())
    linears = _linear_layers(model)
    shapes = [(l.in_features, l.out_features) for l in linears]
    _ensure(shapes == [(2, 2)] * 4, f"expected four Linear(2, 2) layers (2-2-2-2-2), found {shapes}")
    out = model(torch.zeros(5, 2))
    _ensure(tuple(out.shape) == (5, 2), f"the model's output for 5 inputs should be (5, 2), got {tuple(out.shape)}")
    weights = torch.cat([l.weight.detach().flatten() for l in linears])
    _ensure(bool((weights.abs() <= 1).all()), "weights must lie in [-1, 1]")
    _ensure(bool((weights < 0).any()), "no weight is negative: nn.init.uniform_ defaults to [0, 1]; pass a=-1, b=1")
    return "build_model gives a 2-2-2-2-2 network with weights in [-1, 1]"


def _figure(ns, name):
    fig = _need(ns, name)
    _ensure(isinstance(fig, matplotlib.figure.Figure), f"{name} must be the Figure that plot_grad returns")
    _ensure(len(fig.axes) > 0 and len(fig.axes[0].collections) > 0, f"{name} has no violins")
    return fig


def _check_plot(model_name, fig_name):
    def run(ns):
        _need(ns, model_name)
        _figure(ns, fig_name)
        return f"{fig_name} shows the gradients of {model_name}"
    return run


def _check_q2_8(ns):
    model = _build(ns, "build_model_glorot", nn.Tanh())
    _ensure([(l.in_features, l.out_features) for l in _linear_layers(model)] == [(2, 2)] * 4,
            "build_model_glorot must build the same 2-2-2-2-2 network")
    for name in ("fig2_sig", "fig2_tanh", "fig2_relu"):
        _figure(ns, name)
    return "build_model_glorot builds the network and the three figures exist"


def _check_q3_1(ns):
    deep = _need(ns, "deep_network")
    model = _call(deep, 4, nn.Sigmoid())
    shapes = [(l.in_features, l.out_features) for l in _linear_layers(model)]
    _ensure(shapes == [(10, 5)] + [(5, 5)] * 3, f"deep_network(4, ...) should have Linear layers 10-5-5-5-5, got {shapes}")
    killed = _call(_need(ns, "kill_gradients"), deep(7, nn.Sigmoid()))
    _ensure(isinstance(killed, nn.Module), "kill_gradients must return the model")
    gradient_print = _need(ns, "gradient_print")
    first = gradient_print(killed, verbose=False)[0].abs().max().item()
    _ensure(first < 1e-8, f"after kill_gradients the first layer's largest gradient is {first:.2e}, not ~0")
    for name in ("sigmoid_depth_without_initializer", "tanh_depth_without_initializer"):
        value = _need(ns, name)
        _ensure(isinstance(value, int) and 2 <= value <= 25, f"{name} should be a depth between 2 and 25")
    return "deep_network, kill_gradients and the depths look right"


def _check_q3_2(ns):
    cls = _need(ns, "NegativeInitializer")
    model = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 5))
    _call(model.apply, _call(cls, 2))
    negative = [bool((l.weight < 0).all()) for l in _linear_layers(model)]
    _ensure(any(negative), "NegativeInitializer(2) made no layer's weights all negative")
    return "NegativeInitializer makes a layer's weights negative"


def _check_q3_3(ns):
    model = _call(_need(ns, "make_xor_model"))
    _ensure(isinstance(model, nn.Module), "make_xor_model must return an nn.Module")
    out = model(torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]))
    _ensure(out.numel() == 4, f"the model must output one logit per input, got shape {tuple(out.shape)}")
    result = _need(ns, "xor_result")
    _ensure(bool(result.solved), "xor_problem(make_xor_model()) did not classify all four points correctly")
    return "make_xor_model solves XOR for seed 0 (the hidden tests try other seeds)"


def _check_qb_1(ns):
    model = _call(_need(ns, "he_init_"), nn.Sequential(nn.Linear(400, 400)), 0.0)
    std = model[0].weight.std().item()
    _ensure(abs(std - math.sqrt(2 / 400)) < 0.01, f"weight std {std:.4f}, expected about sqrt(2/400) = 0.0707")
    return "he_init_ gives the He standard deviation"


def _check_qb_2(ns):
    fn = _need(ns, "saturation_fraction")
    model = nn.Sequential(nn.Linear(1, 1), nn.Tanh())
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.fill_(0.0)
    value = _call(fn, model, torch.tensor([[0.0], [10.0]]))
    _ensure(isinstance(value, float), f"saturation_fraction must return a float, got {type(value).__name__}")
    _ensure(abs(value - 0.5) < 1e-9, f"half of these tanh outputs are saturated; got {value}")
    return "saturation_fraction counts saturated tanh units"


def _check_qb_3(ns):
    value = _call(_need(ns, "expected_initial_loss"), 10)
    _ensure(abs(float(value) - math.log(10)) < 1e-9, f"for 10 classes expected ln(10) = {math.log(10):.4f}, got {value}")
    return "expected_initial_loss is ln(C)"


_CHECKS = {
    "q1_1": _check_q1_1,
    "q1_2": _check_q1_2,
    "q1_3": _check_q1_3,
    "q1_4": _check_q1_4,
    "q2_2": _check_plot("model_sig", "fig_sig"),
    "q2_4": _check_plot("model_tanh", "fig_tanh"),
    "q2_6": _check_plot("model_relu", "fig_relu"),
    "q2_8": _check_q2_8,
    "q3_1": _check_q3_1,
    "q3_2": _check_q3_2,
    "q3_3": _check_q3_3,
    "qb_1": _check_qb_1,
    "qb_2": _check_qb_2,
    "qb_3": _check_qb_3,
}


def check(question: str) -> None:
    """Run the public checks of `question` (e.g. "q1_2") on the calling notebook's answers."""
    if question not in _CHECKS:
        raise ValueError(f"unknown question {question!r}; known: {', '.join(_CHECKS)}")
    caller = inspect.currentframe().f_back
    namespace = dict(caller.f_globals)
    summary = _CHECKS[question](namespace)
    print(f"{question}: public checks passed ({summary}).")

