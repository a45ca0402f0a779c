"""Plot capture (sandbox side) and plot judging (trusted side), on real figures.

Figures are made here the way a student would (with the assignment's plot_grad, or with plain
matplotlib), captured with capture_figure, validated with FigureData.from_capture, then judged.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from gradelab.boundary.figures import FigureData
from gradelab.hidden.plotcheck import check_gradient_plot, check_line_plot, compare_images, violin_spreads
from gradelab.sandbox.capture import capture_figure, install_recorders

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "source" / "vanishing_gradients"))
from vanishing_helpers import gradient_data, plot_grad  # noqa: E402  (the assignment's module, by path)

plt.switch_backend("Agg")  # pixel comparisons assume the Agg renderer whatever MPLBACKEND says

SEED = 0  # the data seed of plot_grad and gradient_data
N_LAYERS = 4


# ---------------------------------------------------------------- the 2-2-2-2-2 models


def _stack(activation: type[nn.Module], init_weight) -> nn.Sequential:
    """Input 2, three hidden layers of 2, output 2; activation after every layer but the last."""
    layers: list[nn.Module] = []
    for i in range(N_LAYERS):
        linear = nn.Linear(2, 2)
        init_weight(linear.weight)
        layers += [linear, activation()] if i < N_LAYERS - 1 else [linear]
    return nn.Sequential(*layers)


def build_model(activation: type[nn.Module]) -> nn.Sequential:
    return _stack(activation, lambda w: nn.init.uniform_(w, -1.0, 1.0))


def seeded(build, activation: type[nn.Module], seed: int = 1) -> nn.Sequential:
    torch.manual_seed(seed)
    return build(activation)


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(autouse=True, scope="module")
def recorders() -> None:
    install_recorders()


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def sigmoid_model() -> nn.Sequential:
    return seeded(build_model, nn.Sigmoid)


def judge(fig, *, cell: int = 3, index: int = 0) -> FigureData:
    """What T receives for a figure made in S."""
    return FigureData.from_capture(capture_figure(fig, cell=cell, index=index))


def labelled_violin_axes():
    fig, ax = plt.subplots()
    ax.set_xlabel("Layer")
    ax.set_ylabel("Gradient")
    return fig, ax


def assert_plain(value: object, where: str = "capture") -> None:
    """Only numbers, strings, lists, str-keyed dicts, bytes and numeric numpy arrays (and None)."""
    if value is None or type(value) in (bool, int, float, str, bytes):
        return
    if type(value) is np.ndarray:
        assert value.dtype.kind in "biuf", f"{where}: array of dtype {value.dtype}"
    elif type(value) is list:
        for i, item in enumerate(value):
            assert_plain(item, f"{where}[{i}]")
    elif type(value) is dict:
        for key, item in value.items():
            assert type(key) is str, f"{where}: key {key!r}"
            assert_plain(item, f"{where}[{key!r}]")
    else:
        raise AssertionError(f"{where}: {type(value).__module__}.{type(value).__qualname__} is not plain data")


# ---------------------------------------------------------------- gradient plots


def test_plot_grad_figure_of_the_right_model_passes(sigmoid_model):
    figure = judge(plot_grad(sigmoid_model, seed=SEED))

    assert figure.helper == "plot_grad"
    assert [v.data is not None for v in figure.axes[0].violins] == [True] * N_LAYERS
    verdict = check_gradient_plot(figure, expected_violins=N_LAYERS,
                                  expected_grads=gradient_data(sigmoid_model, seed=SEED))
    assert verdict.ok, verdict.problems
    assert verdict.details["mismatched_layers"] == []


def test_plain_violinplot_in_other_colours_passes(sigmoid_model):
    grads = gradient_data(sigmoid_model, seed=SEED)
    fig, ax = labelled_violin_axes()
    ax.violinplot(list(grads.values()), positions=[10, 20, 30, 40], facecolor="tab:red",
                  linecolor="black", showmedians=True)

    verdict = check_gradient_plot(judge(fig), expected_violins=N_LAYERS, expected_grads=grads)
    assert verdict.ok, verdict.problems


def test_violins_drawn_with_fill_betweenx_are_found_from_their_shape(sigmoid_model):
    grads = gradient_data(sigmoid_model, seed=SEED)
    fig, ax = labelled_violin_axes()
    for position, values in enumerate(grads.values(), start=1):
        y = np.linspace(values.min(), values.max(), 50)
        half_width = 0.1 + 0.3 * np.sin(np.linspace(0, np.pi, 50))
        ax.fill_betweenx(y, position - half_width, position + half_width, color="tab:green")
    figure = judge(fig)

    violins = figure.axes[0].violins
    assert [v.position for v in violins] == pytest.approx([1, 2, 3, 4])
    assert all(v.data is None for v in violins)
    verdict = check_gradient_plot(figure, expected_violins=N_LAYERS, expected_grads=grads)
    assert verdict.ok, verdict.problems
    assert violin_spreads(figure) == pytest.approx([np.abs(g).max() for g in grads.values()])


def test_horizontal_violins_are_found_recorded_or_drawn(sigmoid_model):
    grads = gradient_data(sigmoid_model, seed=SEED)
    recorded_fig, recorded_ax = labelled_violin_axes()
    recorded_ax.violinplot(list(grads.values()), orientation="horizontal")
    drawn_fig, drawn_ax = labelled_violin_axes()
    half_width = 0.1 + 0.3 * np.sin(np.linspace(0, np.pi, 30))
    for position, values in enumerate(grads.values(), start=1):
        x = np.linspace(values.min(), values.max(), 30)
        drawn_ax.fill_between(x, position - half_width, position + half_width)

    for figure in (judge(recorded_fig), judge(drawn_fig)):
        assert [v.orientation for v in figure.axes[0].violins] == ["horizontal"] * N_LAYERS
        verdict = check_gradient_plot(figure, expected_violins=N_LAYERS, expected_grads=grads)
        assert verdict.ok, verdict.problems


def test_shaded_rectangles_are_not_violins():
    fig, ax = labelled_violin_axes()
    ax.fill_betweenx([0, 1], 1.0, 2.0)
    ax.axvspan(3, 4)
    assert judge(fig).axes[0].violins == []


def test_empty_figure_and_missing_figure_fail():
    fig, _ = labelled_violin_axes()
    empty = check_gradient_plot(judge(fig), expected_violins=N_LAYERS)
    assert not empty.ok and "no violins" in empty.problems[0]

    missing = check_gradient_plot(None, expected_violins=N_LAYERS)
    assert missing.problems == ["no figure was produced"]


def test_plot_of_another_model_fails_the_gradient_check(sigmoid_model):
    relu_figure = judge(plot_grad(seeded(build_model, nn.ReLU), seed=SEED))

    verdict = check_gradient_plot(relu_figure, expected_violins=N_LAYERS,
                                  expected_grads=gradient_data(sigmoid_model, seed=SEED))
    assert not verdict.ok
    assert "do not show the gradients of the model your code builds" in verdict.problems[0]
    assert verdict.details["mismatched_layers"], verdict.details


def test_pasted_image_of_the_reference_fails(sigmoid_model):
    reference_png = capture_figure(plot_grad(sigmoid_model, seed=SEED), cell=0, index=0)["png"]
    fig, ax = labelled_violin_axes()
    ax.imshow(plt.imread(io.BytesIO(reference_png)))

    verdict = check_gradient_plot(judge(fig), expected_violins=N_LAYERS)
    assert verdict.problems == ["the figure shows a pasted image, not a plot of your model's gradients"]


def test_unlabelled_axes_and_wrong_violin_count_fail(sigmoid_model):
    grads = list(gradient_data(sigmoid_model, seed=SEED).values())
    fig, ax = plt.subplots()
    ax.violinplot(grads[:3])

    verdict = check_gradient_plot(judge(fig), expected_violins=N_LAYERS)
    assert not verdict.ok
    assert any(p.startswith("the x and y axes have no labels") for p in verdict.problems), verdict.problems
    assert any("the plot has 3 violins; expected 4" in p for p in verdict.problems), verdict.problems


def test_recorders_are_idempotent():
    install_recorders()
    fig, ax = plt.subplots()
    ax.violinplot([np.arange(5.0), np.arange(3.0)], positions=[2, 4])
    assert len(ax._gradelab_violins) == 2
    violins = judge(fig).axes[0].violins
    assert [(v.position, len(v.data)) for v in violins] == [(2.0, 5), (4.0, 3)]


# ---------------------------------------------------------------- capture properties


def test_capture_is_plain_data_and_deterministic(sigmoid_model):
    fig = plot_grad(sigmoid_model, seed=SEED, title="sigmoid")
    fig.axes[0].plot(np.arange(20_000.0), np.zeros(20_000), label="long line")
    fig.axes[0].legend()
    first = capture_figure(fig, cell=1, index=0)
    second = capture_figure(fig, cell=1, index=0)

    assert_plain(first)
    assert first["png"] == second["png"]
    assert len(first["axes"][0]["lines"][0]["x"]) == 10_000
    assert first["axes"][0]["legend_labels"] == ["long line"]
    assert set(first["gradient_data"]) == set(gradient_data(sigmoid_model, seed=SEED))


def test_from_capture_rejects_malformed_data(sigmoid_model):
    good = capture_figure(plot_grad(sigmoid_model, seed=SEED), cell=1, index=0)
    bad_cases = {
        "cell": {**good, "cell": "1"},
        "png": {**good, "png": b"GIF89a not a png"},
        "x": {**good, "axes": [{**good["axes"][0], "lines": [{"label": "l", "x": np.zeros((2, 2)), "y": np.zeros(2)}]}]},
        "data": {**good, "axes": [{**good["axes"][0], "violins": [{**good["axes"][0]["violins"][0],
                                                                     "data": np.array(["a"])}]}]},
        "extra": {**good, "secret": 1},
    }
    for field, capture in bad_cases.items():
        with pytest.raises(ValidationError, match=field):
            FigureData.from_capture(capture)


# ---------------------------------------------------------------- pixels


def test_compare_images_same_figure_passes_other_figure_fails(sigmoid_model):
    first = capture_figure(plot_grad(sigmoid_model, seed=SEED), cell=0, index=0)["png"]
    again = capture_figure(plot_grad(sigmoid_model, seed=SEED), cell=0, index=1)["png"]
    other = capture_figure(plot_grad(seeded(build_model, nn.ReLU), seed=SEED), cell=0, index=2)["png"]

    assert compare_images(again, first, tol=2) == (True, 0.0, None, "")
    passed, rms, diff_png, message = compare_images(other, first, tol=2)
    assert not passed and rms > 2 and diff_png.startswith(b"\x89PNG") and "RMS" in message

    wide = plt.figure(figsize=(8, 3))
    wide.add_subplot().plot([0, 1])
    result = compare_images(capture_figure(wide, cell=0, index=3)["png"], first, tol=2)
    assert not result.passed and result.message == "figure size differs: yours is 640x240 px, the reference 512x384 px"


def test_compare_images_judges_pixels_not_bytes(sigmoid_model):
    """Identical PNGs pass without decoding; other bytes are decoded and compared pixel by pixel."""
    from PIL import Image

    first = capture_figure(plot_grad(sigmoid_model, seed=SEED), cell=0, index=0)["png"]
    pixels = Image.open(io.BytesIO(first))
    recoded = io.BytesIO()
    pixels.save(recoded, format="png", compress_level=9)  # the same pixels in other bytes
    assert recoded.getvalue() != first
    assert compare_images(recoded.getvalue(), first, tol=0) == (True, 0.0, None, "")

    changed = pixels.copy()
    changed.paste((255, 0, 0, 255), (0, 0, 40, 40))  # a red square in a corner
    edited = io.BytesIO()
    changed.save(edited, format="png")
    passed, rms, _, _ = compare_images(edited.getvalue(), first, tol=0.5)
    assert not passed and rms > 0.5
    with pytest.raises(ValueError, match="not a PNG"):
        compare_images(b"GIF89a", b"GIF89a", tol=12)


# ---------------------------------------------------------------- line plots (q1_2, q1_3)

X = np.linspace(-10, 10, 201)
SIGMOID = 1 / (1 + np.exp(-X))
SIGMOID_GRAD = SIGMOID * (1 - SIGMOID)


def test_sigmoid_and_its_gradient_pass_in_any_order_and_grid():
    x = torch.linspace(-10, 10, 100, dtype=torch.float64)  # a coarser torch grid than the reference
    fig, ax = plt.subplots()
    ax.plot(x, torch.sigmoid(x) * (1 - torch.sigmoid(x)), "r--", label="gradient")
    ax.plot(x.numpy(), torch.sigmoid(x).numpy(), label="sigmoid")

    verdict = check_line_plot(judge(fig), {"sigmoid": (X, SIGMOID), "sigmoid's gradient": (X, SIGMOID_GRAD)},
                              atol=1e-2)
    assert verdict.ok, verdict.problems


def test_wrong_gradient_curve_is_reported_with_the_closest_line():
    fig, ax = plt.subplots()
    ax.plot(X, SIGMOID, label="sigmoid")
    twice = 1 / (1 + np.exp(-SIGMOID))
    ax.plot(X, twice * (1 - twice), label="my grad")  # sigmoid applied again: a common bug

    verdict = check_line_plot(judge(fig), {"sigmoid": (X, SIGMOID), "sigmoid's gradient": (X, SIGMOID_GRAD)},
                              atol=1e-2)
    assert verdict.problems == [verdict.problems[0]]
    assert verdict.problems[0].startswith("no line in the plot shows the sigmoid's gradient; the closest "
                                          "(the line 'my grad') is off by up to")


def test_a_curve_drawn_over_too_short_a_range_is_reported():
    fig, ax = plt.subplots()
    ax.plot(X[X <= 0], SIGMOID[X <= 0], label="sigmoid")

    verdict = check_line_plot(judge(fig), {"sigmoid": (X, SIGMOID)}, atol=1e-2)
    assert verdict.problems == ["the line 'sigmoid' shows the sigmoid only for x from -10 to 0; "
                                "draw it over x from -10 to 10"]


def test_two_identical_expected_curves_need_two_lines():
    fig, ax = plt.subplots()
    ax.plot(X, SIGMOID_GRAD)
    expected = {"gradient from autograd": (X, SIGMOID_GRAD), "gradient from my_sigmoid_grad": (X, SIGMOID_GRAD)}

    verdict = check_line_plot(judge(fig), expected, atol=1e-6)
    assert verdict.problems == ["the gradient from my_sigmoid_grad needs a line of its own; an unlabelled line "
                                "already shows the gradient from autograd"]
    ax.plot(X, SIGMOID_GRAD, ":")
    assert check_line_plot(judge(fig), expected, atol=1e-6).ok
