"""Hidden tests of Part 3: dying gradients, NegativeInitializer, XOR."""

import pytest
import torch
from conftest import XOR_INPUTS, classifier_gradients, deep_reference, train_xor_batched
from torch import nn

from gradelab.hidden import activations_between, layer, linear_shapes, seed_torch
from gradelab.hidden.assertions import expect_finite_parameters, largest_magnitude
from gradelab.hidden.training import check_training_budget

CLASSIFIER_PROBE = torch.rand(8, 10, generator=torch.Generator().manual_seed(1))
RELU_LINEAR_VISITS = {0: 0, 2: 1, 4: 2, 6: 3}  # Module.apply's visit index -> Linear layer index


@pytest.mark.question("q3_1")
@pytest.mark.parametrize("activation", ["Sigmoid", "Tanh"])
def test_deep_network_architecture(student, activation, seed):
    """deep_network(depth, activation): depth Linear layers 10-5-...-5, activation between them"""
    depth = 3 + seed % 5
    _, described = student.module("deep_network", depth, layer(activation), probe=CLASSIFIER_PROBE)
    expected = [(10, 5)] + [(5, 5)] * (depth - 1)
    assert linear_shapes(described) == expected, \
        f"deep_network({depth}, ...) builds Linear layers {linear_shapes(described)}, expected {expected}"
    assert activations_between(described) == [[activation]] * (depth - 1) + [[]], (
        f"deep_network({depth}, nn.{activation}()) should put one {activation} between consecutive Linear "
        f"layers and none after the last; got {activations_between(described)}")


# After the reference's kill_gradients the first layer's gradient is exactly 0 (saturated
# activations) or below 1e-12; without it, a depth-7 network's is about 1e-6 (sigmoid) or 2e-3
# (tanh): bench/fairness.py has the rates.
KILLED_BELOW = 1e-8


def first_layer_gradients_around_kill(student, activation, seed) -> tuple[float, float]:
    """The largest first-layer gradient of a depth-7 network before and after kill_gradients."""
    network = deep_reference(7, activation, seed)
    before = largest_magnitude(classifier_gradients(network, seed)[0])
    killed, _ = student.apply("kill_gradients", network, probe=CLASSIFIER_PROBE, mode="call")
    expect_finite_parameters(killed, "the model after kill_gradients")
    after = largest_magnitude(classifier_gradients(killed, seed, what="the model after kill_gradients")[0])
    return before, after


@pytest.mark.question("q3_1", weight=2)
@pytest.mark.parametrize("activation", [nn.Sigmoid, nn.Tanh], ids=["sigmoid", "tanh"])
def test_kill_gradients(student, activation, seed):
    """kill_gradients makes the first layer's gradient (practically) zero in a depth-7 network"""
    before, after = first_layer_gradients_around_kill(student, activation, seed)
    assert after < KILLED_BELOW, (f"after kill_gradients the first layer's largest gradient is {after:.2e} "
                          f"(before: {before:.2e}); it should be (practically) zero for a "
                          f"{activation.__name__} network")


@pytest.mark.question("q3_1")
@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_depth_without_initializer(student, reference_data, name):
    """the depth at which gradients die without Initializer"""
    expected = reference_data["dying_depth"][name]
    got = student.get(f"{name}_depth_without_initializer")
    assert type(got) is int, f"{name}_depth_without_initializer should be an int, got {type(got).__name__}"
    assert abs(got - expected) <= 1, (
        f"{name}_depth_without_initializer is {got}; following the procedure of the exercise gives a "
        f"depth within one of that value for the reference, and yours is further off")


def _seed_relu_model(seed):
    """The ReLU network given to NegativeInitializer, with every bias positive: an answer that leaves
    the target's biases alone then fails on every seed, not only on the 31 in 32 whose default
    biases include a positive one."""
    seed_torch(seed)
    model = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(),
                          nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 5))
    with torch.no_grad():
        for linear in model[::2]:
            linear.bias.abs_()
    return model


def _negative_layer(student, target, seed):
    """Apply NegativeInitializer(target); return (original, changed, index of the Linear made negative)."""
    original = _seed_relu_model(seed)
    changed, _ = student.apply("NegativeInitializer", original, target, probe=CLASSIFIER_PROBE)
    linears = [(a, b) for a, b in zip(original, changed) if isinstance(a, nn.Linear)]
    negative = [i for i, (_, b) in enumerate(linears) if bool((b.weight < 0).all())]
    untouched = [i for i, (a, b) in enumerate(linears) if torch.equal(a.weight, b.weight)]
    assert len(negative) == 1 and len(untouched) == 3, (
        f"NegativeInitializer({target}) should make the weights of exactly one layer negative and leave "
        f"the others alone; layers made negative: {negative}, layers changed: "
        f"{[i for i in range(4) if i not in untouched]}")
    assert negative[0] in (RELU_LINEAR_VISITS.get(target), target), (
        f"NegativeInitializer({target}) changed Linear layer {negative[0]}, which is neither the "
        f"{target}-th module visited by apply() nor the {target}-th Linear layer")
    return changed, negative[0]


@pytest.mark.question("q3_2")
@pytest.mark.parametrize("target", [0, 2])
def test_negative_weights(student, target, seed):
    """NegativeInitializer(target) makes the target layer's weights negative"""
    _negative_layer(student, target, seed)


@pytest.mark.question("q3_2", weight=2)
@pytest.mark.parametrize("target", [0, 2])
def test_gradient_dies_below_target(student, target, seed):
    """under ReLU, no gradient reaches the layers below the target, whatever the input"""
    changed, layer_index = _negative_layer(student, target, seed)
    # A NaN compares false with everything: a NaN bias would pass "no positive bias" and a NaN
    # gradient "no gradient above 0".
    expect_finite_parameters(changed, f"after NegativeInitializer({target}) the model")
    target_layer = [m for m in changed if isinstance(m, nn.Linear)][layer_index]
    # The layer's inputs are ReLU outputs (or the data), so they are >= 0 and may all be 0: then
    # the pre-activation is the bias alone. Only a bias <= 0 keeps every unit closed for any input.
    if target_layer.bias is not None and bool((target_layer.bias > 0).any()):
        raise AssertionError(
            f"after NegativeInitializer({target}) the target layer keeps positive biases "
            f"({int((target_layer.bias > 0).sum())} of {target_layer.bias.numel()}): negative weights alone "
            f"are not enough, since a positive bias can still open the ReLU and let gradient through")
    # weight, bias of each Linear layer, in order
    grads = classifier_gradients(changed, seed, what=f"the model after NegativeInitializer({target})")
    alive = [f"{largest_magnitude(g):.1e}" for g in grads[: 2 * (layer_index + 1)] if largest_magnitude(g) > 0]
    assert not alive, (
        f"after NegativeInitializer({target}) some gradient still reaches the layers up to the target "
        f"(largest values {alive}): negative weights alone are not enough when a positive bias "
        f"can still open the ReLU")


@pytest.mark.question("q3_3")
def test_xor_output_shape(student):
    """make_xor_model returns a new model with one logit per input"""
    model, _ = student.module("make_xor_model", probe=XOR_INPUTS)
    with torch.no_grad():
        out = model(XOR_INPUTS)
    assert out.numel() == 4 and out.shape[0] == 4, \
        f"the model's output for the 4 XOR inputs has shape {tuple(out.shape)}; expected (4, 1) or (4,)"


# The reference network fails to learn XOR on about 1 seed in 1000 (p): with "at least 3 of 5" it
# fails this test with probability ~10 p^3 (1e-8); a network that cannot represent XOR always does.
XOR_SEEDS = 5
XOR_SOLVED_AT_LEAST = 3


def xor_models(student, seed) -> list[nn.Sequential]:
    """make_xor_model's models, torch seeded with seed, seed + 1, ..., rebuilt here; a model past
    the training budget is refused after the first."""
    first, _ = student.module("make_xor_model", probe=XOR_INPUTS, seed=seed)
    check_training_budget(first, "make_xor_model's network")
    return [first] + [student.module("make_xor_model", probe=XOR_INPUTS, seed=seed + k)[0] for k in range(1, XOR_SEEDS)]


@pytest.mark.question("q3_3", weight=3)
def test_xor_solved_reliably(student, seed):
    """xor_problem's training solves XOR for at least 3 of 5 random seeds"""
    accuracy = train_xor_batched(xor_models(student, seed))
    solved = int((accuracy == 1).sum())
    assert solved >= XOR_SOLVED_AT_LEAST, (
        f"after xor_problem's training, the model classified all four points correctly for {solved} of "
        f"{XOR_SEEDS} seeds (accuracies {[round(a, 2) for a in accuracy.tolist()]}); it must work reliably, "
        f"not for one lucky draw")
