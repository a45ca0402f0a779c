"""Hidden tests of Part 2: the gradient plots and Glorot initialisation."""

import pytest
from conftest import expected_gradients, weights_over_draws
from test_part1 import check_architecture

from gradelab.boundary.figures import CAPTURE_DPI, render_png
from gradelab.hidden import plotcheck
from gradelab.hidden import Normal, activations_between, assert_distribution

# question, notebook variables of the model and the figure, the cell that draws it, its activation
PLOTS = [
    ("q2_2", "model_sig", "fig_sig", "q2_2_plot", "Sigmoid"),
    ("q2_4", "model_tanh", "fig_tanh", "q2_4_plot", "Tanh"),
    ("q2_6", "model_relu", "fig_relu", "q2_6_plot", "ReLU"),
    ("q2_8", "model2_sig", "fig2_sig", "q2_8_plots", "Sigmoid"),
    ("q2_8", "model2_tanh", "fig2_tanh", "q2_8_plots", "Tanh"),
    ("q2_8", "model2_relu", "fig2_relu", "q2_8_plots", "ReLU"),
]


def _student_plot(student, find_figure, probe, model_name, fig_name, cell):
    model, described = student.model(model_name, probe=probe)
    fig = find_figure(name=fig_name) or find_figure(grade_id=cell)
    return model, described, fig


_REFERENCE_PNGS: dict[str, bytes] = {}  # per figure name; the runner process grades one submission


def _reference_png(fig_name: str, model) -> bytes:
    """The helper's figure of the student's own model: what the plot should look like."""
    if fig_name not in _REFERENCE_PNGS:
        import matplotlib.pyplot as plt
        from vanishing_helpers import plot_grad

        figure = plot_grad(model)
        _REFERENCE_PNGS[fig_name] = render_png(figure, CAPTURE_DPI)
        plt.close(figure)
    return _REFERENCE_PNGS[fig_name]


def _check(question, model_name, fig_name, cell, activation, student, find_figure, probe, attach):
    """The plot shows the gradients of the student's own model: judged by content, with no
    randomness (the gradients are recomputed here on the same data), so a correct plot always passes."""
    model, described, fig = _student_plot(student, find_figure, probe, model_name, fig_name, cell)
    used = sorted({a for group in activations_between(described) for a in group})
    assert used == [activation], f"{model_name} should be built with nn.{activation}(); it uses {used or 'none'}"
    assert fig is not None, f"{fig_name}: no figure was produced (plot {model_name} with plot_grad)"
    try:
        grads = expected_gradients(model)
    except ValueError as exc:
        raise AssertionError(f"{model_name} cannot be plotted: {exc}") from None
    attach(f"{question}_{fig_name}_reference.png", _reference_png(fig_name, model))
    attach(f"{question}_{fig_name}_student.png", fig.png)
    verdict = plotcheck.check_gradient_plot(fig, expected_violins=4, expected_grads=grads)
    assert verdict.ok, f"{fig_name}: " + "; ".join(verdict.problems)


@pytest.mark.question("q2_2", weight=3)
def test_sigmoid_gradient_plot(student, find_figure, probe, attach):
    """the sigmoid model's gradient plot shows its gradients"""
    _check(*PLOTS[0], student, find_figure, probe, attach)


@pytest.mark.question("q2_4", weight=3)
def test_tanh_gradient_plot(student, find_figure, probe, attach):
    """the tanh model's gradient plot shows its gradients"""
    _check(*PLOTS[1], student, find_figure, probe, attach)


@pytest.mark.question("q2_6", weight=3)
def test_relu_gradient_plot(student, find_figure, probe, attach):
    """the ReLU model's gradient plot shows its gradients"""
    _check(*PLOTS[2], student, find_figure, probe, attach)


@pytest.mark.question("q2_8", weight=1)
@pytest.mark.parametrize("entry", PLOTS[3:], ids=lambda e: e[2])
def test_glorot_gradient_plots(student, find_figure, probe, attach, entry):
    """the Glorot models' gradient plots show their gradients"""
    _check(*entry, student, find_figure, probe, attach)


@pytest.mark.parametrize("entry", [pytest.param(e, id=e[2], marks=pytest.mark.question(e[0])) for e in PLOTS])
def test_plot_matches_reference_image(student, find_figure, probe, grading_config, entry):
    """the figure looks like the reference figure drawn from your own model"""
    _question, model_name, fig_name, cell, _activation = entry
    model, _, fig = _student_plot(student, find_figure, probe, model_name, fig_name, cell)
    assert fig is not None, f"{fig_name}: no figure was produced"
    if fig.helper != "plot_grad":
        return  # drawn another way: judged by its content alone (the tests above)
    comparison = plotcheck.compare_images(fig.png, _reference_png(fig_name, model), grading_config.plots.image_tolerance)
    assert comparison.passed, f"{fig_name}: {comparison.message}"


@pytest.mark.question("q2_8", weight=2)
@pytest.mark.parametrize("activation", ["Tanh", "ReLU"])
def test_glorot_architecture(student, probe, activation):
    """build_model_glorot builds the same 2-2-2-2-2 network"""
    check_architecture(student, "build_model_glorot", activation, probe)


# 25 models, 400 weights: enough for xavier_uniform_ (the same spread, nothing beyond 2 standard
# deviations), N(0, 1) and U(-1, 1) to fail every time (bench/fairness.py has the rates).
GLOROT_DRAWS = 25
GLOROT_WEIGHTS = Normal(0.0, (2 / (2 + 2)) ** 0.5)


@pytest.mark.question("q2_8", weight=3)
def test_glorot_normal_weights(student, probe, seed):
    """build_model_glorot's weights follow N(0, sqrt(2 / (2 + 2))) (checked over many models)"""
    w = weights_over_draws(student, "build_model_glorot", "Tanh", draws=GLOROT_DRAWS, probe=probe, seed=seed)
    assert_distribution(w, GLOROT_WEIGHTS, what="build_model_glorot's weights", hints={
        "spread": "Glorot normal for 2x2 layers has standard deviation sqrt(2 / (fan_in + fan_out)) = "
                  "sqrt(2 / (2 + 2)) = 0.707",
        "tail": "a normal distribution has about 4.6% there, xavier_uniform_'s uniform distribution of the "
                "same spread none: use xavier_normal_"})
