"""Hidden tests of the bonus questions: He initialisation, saturation, initial loss."""

import math

import pytest
import torch
from torch import nn

from gradelab.hidden import describe_standard, expect_number, linear_shapes, seed_torch
from gradelab.hidden.assertions import expect_finite_parameters, largest_magnitude
from gradelab.boundary.wire import describe_value

PROBE = torch.rand(4, 256, generator=torch.Generator().manual_seed(2))


# A layer's weight std from 32 768 or 65 536 draws is within 0.4% (one standard deviation) of the
# true one: 5% is more than 12 standard deviations away (bench/fairness.py has the rates).
HE_STD_TOLERANCE = 0.05


def he_std(slope: float, fan_in: int) -> float:
    """He initialisation's weight std for a leaky ReLU with negative slope `slope`."""
    return math.sqrt(2 / (1 + slope**2)) / math.sqrt(fan_in)


def he_initialised(student, slope, seed) -> nn.Sequential:
    """A 256-256-128 leaky-ReLU network after the student's he_init_, rebuilt here."""
    seed_torch(seed)
    model = nn.Sequential(nn.Linear(256, 256), nn.LeakyReLU(slope), nn.Linear(256, 128))
    changed, described = student.apply("he_init_", model, slope, probe=PROBE, mode="call")
    assert described["layers"] == describe_standard(model)[0], (
        f"he_init_ changed the model's layers into {linear_shapes(described)}; it should only set the "
        f"weights and biases of the model it is given")
    expect_finite_parameters(changed, "after he_init_ the model")
    return changed


@pytest.mark.question("qb_1")
@pytest.mark.parametrize("slope", [0.0, 0.2])
def test_he_init(student, slope, seed):
    """he_init_ draws weights with std gain / sqrt(fan_in) and zero biases"""
    changed = he_initialised(student, slope, seed)
    for layer in (changed[0], changed[2]):
        expected = he_std(slope, layer.in_features)
        std = float(layer.weight.detach().std())
        assert abs(std / expected - 1) < HE_STD_TOLERANCE, (
            f"a Linear({layer.in_features}, {layer.out_features}) layer has weight std {std:.4f}; He "
            f"initialisation for negative slope {slope} gives {expected:.4f}")
        assert largest_magnitude(layer.bias) == 0, "the biases should be zero"


def _saturation(model, inputs, threshold=0.99):
    outputs = []
    h = inputs
    with torch.no_grad():
        for layer in model:
            h = layer(h)
            if isinstance(layer, nn.Tanh):
                outputs.append(h.flatten())
    return float((torch.cat(outputs).abs() > threshold).to(torch.float64).mean())


@pytest.mark.question("qb_2")
@pytest.mark.parametrize("scale", [1.0, 0.05])
def test_saturation_fraction(student, rng, scale):
    """saturation_fraction counts the tanh outputs with |value| > 0.99"""
    model = nn.Sequential(nn.Linear(50, 80), nn.Tanh(), nn.Linear(80, 80), nn.Tanh(), nn.Linear(80, 10))
    with torch.no_grad():
        for layer in model[::2]:
            layer.weight.copy_((torch.rand(layer.weight.shape, generator=rng) * 2 - 1) * scale)
    inputs = torch.randn(64, 50, generator=rng)
    got = student.call_on_model("saturation_fraction", model, inputs)
    expected = _saturation(model, inputs)
    assert type(got) is float, f"saturation_fraction should return a float, got {describe_value(got)}"
    assert abs(got - expected) < 1e-6, f"saturation_fraction gave {got:.4f}, expected {expected:.4f}"


@pytest.mark.question("qb_3")
def test_expected_initial_loss(student, seed):
    """expected_initial_loss(C) = ln C"""
    for classes in (2, 10, 3 + seed % 997):
        got = expect_number(student.call("expected_initial_loss", classes), f"expected_initial_loss({classes})")
        assert abs(got - math.log(classes)) < 1e-6, \
            f"expected_initial_loss({classes}) gave {got}, expected ln({classes}) = {math.log(classes):.4f}"
