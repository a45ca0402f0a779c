"""Hidden tests of Part 1: tensors, sigmoid, autograd, build_model."""

import numpy as np
import pytest
import torch
from conftest import weights_over_draws

from gradelab.hidden import plotcheck
from gradelab.hidden.sourcecheck import torch_only_problems
from gradelab.hidden import (StudentProblem, Uniform, activations_between, assert_distribution, assert_tensor_close,
                             expect_tensor, layer, linear_shapes)
from gradelab.boundary.wire import describe_value

ARCHITECTURE = [(2, 2)] * 4


def _numbers(value, name) -> np.ndarray:
    """A tensor, numpy array or (nested) list of numbers as a float64 array; else a message naming it."""
    if type(value) is torch.Tensor:
        value = value.to(torch.float64).numpy()
    if type(value) is np.ndarray or type(value) is list:
        try:
            return np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            pass  # ragged, or not numbers
    raise AssertionError(f"{name} should be a tensor or numpy array of numbers, got {describe_value(value)}")


def _scalar(value, name):
    if type(value) is torch.Tensor and value.numel() == 1:
        return value.item()
    raise AssertionError(f"{name} should be a tensor holding one number, got {describe_value(value)}")


@pytest.mark.question("q1_1")
def test_x_y_z(student):
    """y and z = x * y (x itself is reused later in the notebook)"""
    assert _scalar(student.get("y"), "y") == 7, "y should hold 7"
    assert _scalar(student.get("z"), "z") == 21, "z should be x * y = 3 * 7 = 21"


@pytest.mark.question("q1_1")
def test_matrix_and_vector(student, executed_cells, seed):
    """A (3x3) and b (3x1) drawn uniformly from [-1, 1]"""
    draws = matrix_and_vector_draws(student, executed_cells, seed)
    values = torch.cat(draws)
    runs = " in two runs of their cell" if len(draws) > 1 else ""
    assert bool((values.abs() <= 1).all()), (f"A and b range from {float(values.min()):.3f} to "
                                             f"{float(values.max()):.3f}{runs}: they must lie in [-1, 1]")
    assert bool((values < 0).any()), (f"no value of A or b is negative{runs}: was the range [0, 1] "
                                      f"(uniform_'s default)?")


def matrix_and_vector_draws(student, executed_cells, seed) -> list[torch.Tensor]:
    """The 12 values of A and b (float64), then those of a second run of their cell with torch
    seeded with `seed`, unless the cell cannot run twice (e.g. it deletes a variable it needs).

    24 values instead of 12: a correct answer has no negative value once in 2^24 = 16.8 million
    (not once in 4096), and torch.randn's all lie in [-1, 1] once in 9400 (not once in 97)."""
    A = expect_tensor(student.get("A"), "A", shape=(3, 3))
    b = expect_tensor(student.get("b"), "b", shape=(3, 1))
    draws = [torch.cat([A.flatten(), b.flatten()]).to(torch.float64)]
    runs = [c.index for c in executed_cells if c.grade_id == "q1_1_tensors" and c.status == "ok"]
    if runs:
        try:
            ((A, b),) = student.redraw(runs[-1], ["A", "b"], seeds=[seed])
        except StudentProblem:
            return draws
        if type(A) is torch.Tensor and A.shape == (3, 3) and type(b) is torch.Tensor and b.shape == (3, 1):
            draws.append(torch.cat([A.flatten(), b.flatten()]).to(torch.float64))
    return draws


@pytest.mark.question("q1_1")
def test_c_is_Ab_plus_d(student):
    """c = A @ b + d with d the column vector [1, 2, 3]"""
    A, b, c, d = (student.get(n) for n in ("A", "b", "c", "d"))
    d_values = _numbers(d, "d")
    assert d_values.shape == (3, 1), f"d has shape {d_values.shape}; a column vector has shape (3, 1)"
    assert np.allclose(d_values.ravel(), [1, 2, 3]), "d should hold 1, 2, 3"
    A, b = expect_tensor(A, "A", shape=(3, 3)), expect_tensor(b, "b", shape=(3, 1))
    expected = A.to(torch.float64) @ b.to(torch.float64) + torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
    assert_tensor_close(c, expected, "c", atol=1e-5)


@pytest.mark.question("q1_2", weight=2)
def test_sigmoid_values(student, rng):
    """my_sigmoid on random inputs, including large ones"""
    x = torch.cat([torch.randn(60, generator=rng, dtype=torch.float64) * 4,
                   torch.tensor([-30.0, -12.5, 0.0, 12.5, 30.0], dtype=torch.float64)])
    assert_tensor_close(student.call("my_sigmoid", x), torch.sigmoid(x), "my_sigmoid(x)", sample=x)


@pytest.mark.question("q1_2")
def test_sigmoid_keeps_shape_and_dtype(student, rng):
    """my_sigmoid keeps the input's shape and dtype"""
    x = torch.randn(3, 4, generator=rng)
    got = expect_tensor(student.call("my_sigmoid", x), "my_sigmoid(x)")
    assert got.shape == x.shape, f"my_sigmoid changed the shape {tuple(x.shape)} into {tuple(got.shape)}"
    assert got.dtype == x.dtype, f"my_sigmoid turned a {x.dtype} tensor into {got.dtype}"


@pytest.mark.question("q1_2", weight=2)
def test_sigmoid_grad_from_activation(student, rng):
    """my_sigmoid_grad(a) = a (1 - a)"""
    a = torch.rand(50, generator=rng, dtype=torch.float64) * 0.98 + 0.01
    got = student.call("my_sigmoid_grad", a)
    if type(got) is torch.Tensor and got.shape == a.shape:
        s = torch.sigmoid(a)
        if torch.allclose(got.to(torch.float64), s * (1 - s)):
            raise AssertionError("my_sigmoid_grad(a) applies the sigmoid again: it receives the activation "
                                 "a = sigmoid(x), so the gradient is a * (1 - a)")
    assert_tensor_close(got, a * (1 - a), "my_sigmoid_grad(a)", sample=a)


@pytest.mark.question("q1_2")
def test_activation_plot(find_figure):
    """the activation and gradient plot shows the sigmoid and its derivative"""
    fig = find_figure(grade_id="q1_2_plot")
    x = np.linspace(-10, 10, 100)
    s = 1 / (1 + np.exp(-x))
    verdict = plotcheck.check_line_plot(fig, {"sigmoid": (x, s), "sigmoid's gradient": (x, s * (1 - s))}, atol=1e-4)
    assert verdict.ok, "; ".join(verdict.problems)


@pytest.mark.question("q1_3", weight=2)
def test_pytorch_gradients(student):
    """pytorch_gradients: autograd's derivative of my_sigmoid at the notebook's x"""
    x = torch.tensor(np.linspace(-10, 10, 100))
    s = torch.sigmoid(x)
    got = student.get("pytorch_gradients")
    assert_tensor_close(got, s * (1 - s), "pytorch_gradients", atol=1e-6, sample=x)


@pytest.mark.question("q1_3", weight=2)
def test_sigmoid_supports_autograd(student, rng, executed_cells):
    """my_sigmoid works with autograd (a torch computation, not numpy or math)"""
    x = torch.randn(40, generator=rng, dtype=torch.float64) * 3
    reply = student.call_grad("my_sigmoid", x)
    expect_tensor(reply["value"], "my_sigmoid(x)")
    assert reply["tracks_grad"], ("my_sigmoid's result does not track gradients: use torch operations "
                                  "(torch.exp), not numpy or math, so autograd can differentiate it")
    s = torch.sigmoid(x)
    assert_tensor_close(reply["grad"], s * (1 - s), "the autograd gradient of my_sigmoid", sample=x)
    # The reply above is the sandbox's own report; the code as submitted is not.
    problems = torch_only_problems([(c.index, c.source) for c in executed_cells], "my_sigmoid")
    assert not problems, ("my_sigmoid's code does not compute with torch alone, which autograd needs: "
                          + "; ".join(problems[:3]))


@pytest.mark.question("q1_3")
def test_comparison_plot(find_figure):
    """the comparison plot shows both gradients"""
    fig = find_figure(grade_id="q1_3_plot")
    x = np.linspace(-10, 10, 100)
    s = 1 / (1 + np.exp(-x))
    verdict = plotcheck.check_line_plot(fig, {"gradient from autograd": (x, s * (1 - s)),
                                          "gradient from my_sigmoid_grad": (x, s * (1 - s))}, atol=1e-4)
    assert verdict.ok, "; ".join(verdict.problems)


def check_architecture(student, name, activation, probe):
    model, described = student.module(name, layer(activation), probe=probe)
    shapes = linear_shapes(described)
    if shapes != ARCHITECTURE:
        hint = " (two hidden layers instead of three?)" if len(shapes) == 3 else ""
        hint = " (the output layer should have 2 nodes)" if shapes[-1:] == [(2, 1)] else hint
        raise AssertionError(f"{name} builds Linear layers {shapes}; expected 2-2-2-2-2, i.e. {ARCHITECTURE}{hint}")
    expected = [[activation]] * 3 + [[]]
    got = activations_between(described)
    if got != expected:
        if got[-1]:
            raise AssertionError(f"{name} applies {got[-1]} after the output layer; the last layer has no activation")
        raise AssertionError(f"{name}({activation}) puts activations {got} after its Linear layers, "
                             f"expected {expected}: is the `activation` argument used?")
    return model


@pytest.mark.question("q1_4", weight=2)
@pytest.mark.parametrize("activation", ["Sigmoid", "Tanh", "ReLU"])
def test_build_model_architecture(student, probe, activation):
    """build_model(activation): 2-2-2-2-2 with the activation after every layer but the last"""
    check_architecture(student, "build_model", activation, probe)


# 20 models, 320 weights: enough for nn.init.uniform_'s default [0, 1] and for nn.Linear's own
# U(-0.71, 0.71) to miss the ends of [-1, 1] every time (bench/fairness.py has the rates).
UNIFORM_DRAWS = 20
UNIFORM_WEIGHTS = Uniform(-1.0, 1.0)


@pytest.mark.question("q1_4", weight=3)
def test_build_model_uniform_weights(student, probe, seed):
    """build_model's weights are uniform in [-1, 1] (checked over many models)"""
    w = weights_over_draws(student, "build_model", "Sigmoid", draws=UNIFORM_DRAWS, probe=probe, seed=seed)
    every_layer = "is every layer's weight drawn with nn.init.uniform_(weight, -1, 1)?"
    assert_distribution(w, UNIFORM_WEIGHTS, what="build_model's weights", hints={
        "smallest": "is the range [0, 1] (nn.init.uniform_'s default) instead of [-1, 1], or a layer left "
                    "with nn.Linear's own initialisation?", "largest": every_layer, "spread": every_layer})

