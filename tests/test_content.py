"""The instructor notebook runs clean, and each reference answer meets the exercise text."""

from __future__ import annotations

import math

import nbformat
import pytest
import torch
from nbclient import NotebookClient
from torch import nn

from gradelab.config import load_config

NOTEBOOK = "source/vanishing_gradients/vanishing_gradients.ipynb"


@pytest.mark.slow
def test_source_notebook_runs_top_to_bottom(root):
    """Executed as a student would (a Jupyter kernel); warnings are reported, errors fail."""
    nb = nbformat.read(root / NOTEBOOK, as_version=4)
    # The cell timeout only stops a hung kernel; how long the notebook takes is `./run bench notebook`.
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(root / "source" / "vanishing_gradients")}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, [f"{e.ename}: {e.evalue}" for e in errors]
    warnings = [o.text for c in nb.cells if c.cell_type == "code" for o in c.outputs
                if o.output_type == "stream" and o.name == "stderr"]
    print(f"{len(warnings)} cells of the source notebook wrote warnings")


def test_config_lists_every_notebook_question(root):
    config = load_config(root / "grading_config.yml")
    nb = nbformat.read(root / NOTEBOOK, as_version=4)
    grade_ids = [c.metadata["nbgrader"]["grade_id"] for c in nb.cells if "nbgrader" in c.metadata]
    graded = {g.rsplit("_", 1)[0] if g.count("_") > 1 else g for g in grade_ids if g.startswith("q")}
    assert {q.id for q in config.questions} == {"_".join(g.split("_")[:2]) for g in graded}


def test_sigmoid_and_its_gradient(reference):
    x = torch.linspace(-20, 20, 401, dtype=torch.float64)
    a = reference.my_sigmoid(x)
    assert torch.allclose(a, torch.sigmoid(x))
    assert torch.allclose(reference.my_sigmoid_grad(a), torch.sigmoid(x) * (1 - torch.sigmoid(x)))


def _linears(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("activation", [nn.Sigmoid, nn.Tanh, nn.ReLU])
def test_build_model_architecture(reference, activation):
    model = reference.build_model(activation())
    assert [(l.in_features, l.out_features) for l in _linears(model)] == [(2, 2)] * 4
    kinds = [type(m) for _, m in model.named_modules(remove_duplicate=False) if not list(m.children())]
    assert kinds == [nn.Linear, activation] * 3 + [nn.Linear], "activation after every layer but the last"


def test_build_model_weights_uniform_minus_one_to_one(reference):
    torch.manual_seed(0)
    w = torch.cat([l.weight.flatten() for _ in range(500) for l in _linears(reference.build_model())])
    assert w.min() >= -1 and w.max() <= 1
    assert abs(w.mean()) < 0.03 and abs(w.std() - 1 / math.sqrt(3)) < 0.02
    # Uniform: each tenth of [-1, 1] holds about a tenth of the weights.
    counts = torch.histc(w, bins=10, min=-1, max=1) / w.numel()
    assert torch.all((counts - 0.1).abs() < 0.02), counts


def test_build_model_glorot_is_normal_with_glorot_sigma(reference):
    torch.manual_seed(0)
    w = torch.cat([l.weight.flatten() for _ in range(2000) for l in _linears(reference.build_model_glorot())])
    sigma = math.sqrt(2 / (2 + 2))
    assert abs(w.mean()) < 0.02 and abs(w.std() - sigma) < 0.01
    # Normal, not uniform: about 4.55% of the draws lie beyond 2 sigma.
    assert abs(float((w.abs() > 2 * sigma).float().mean()) - 0.0455) < 0.008


def test_deep_network_and_kill_gradients(reference):
    from vanishing_helpers import gradient_print

    for activation in (nn.Sigmoid, nn.Tanh):
        net = reference.deep_network(7, activation())
        assert [(l.in_features, l.out_features) for l in _linears(net)] == [(10, 5)] + [(5, 5)] * 6
        before = gradient_print(net, verbose=False)[0].abs().max()
        after = gradient_print(reference.kill_gradients(net), verbose=False)[0].abs().max()
        assert before > 1e-7 and after < 1e-8, (activation, before, after)


def test_negative_initializer_zeroes_gradients_below_target(reference):
    from vanishing_helpers import gradient_print

    for target, layer in ((0, 0), (2, 1), (4, 2)):
        torch.manual_seed(target)
        model = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(),
                              nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 5))
        model.apply(reference.NegativeInitializer(target))
        grads = gradient_print(model, verbose=False)
        assert all(g.abs().max() == 0 for g in grads[: 2 * (layer + 1)]), target
        assert grads[-1].abs().max() > 0, "the layers above the target still learn"


def test_xor_solved_on_at_least_9_of_10_seeds(reference):
    from vanishing_helpers import xor_problem

    solved = 0
    for seed in range(10):
        torch.manual_seed(seed)
        solved += xor_problem(reference.make_xor_model(), verbose=False).solved
    assert solved >= 9, f"solved on {solved} of 10 seeds"


def test_bonus_answers(reference):
    torch.manual_seed(0)
    model = reference.he_init_(nn.Sequential(nn.Linear(500, 500)), negative_slope=0.2)
    assert abs(model[0].weight.std().item() - math.sqrt(2 / 1.04) / math.sqrt(500)) < 0.002
    assert reference.expected_initial_loss(10) == pytest.approx(math.log(10))
    tanh = nn.Sequential(nn.Linear(1, 1), nn.Tanh())
    with torch.no_grad():
        tanh[0].weight.fill_(1.0)
        tanh[0].bias.fill_(0.0)
    assert reference.saturation_fraction(tanh, torch.tensor([[0.0], [5.0]])) == 0.5


def test_plot_grad_helper_is_seeded_and_checks_inputs(reference):
    from vanishing_helpers import gradient_data, plot_grad

    model = reference.build_model(nn.Sigmoid())
    first, second = gradient_data(model), gradient_data(model)
    assert all((first[k] == second[k]).all() for k in first), "gradients are zeroed before each pass"
    fig = plot_grad(model)
    assert len(fig.gradient_data) == 4 and fig.axes[0].get_xlabel() == "Layer"
    with pytest.raises(ValueError, match="2 inputs"):
        gradient_data(nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(ValueError, match="output"):
        gradient_data(nn.Sequential(nn.Linear(2, 1)))
    frozen = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    frozen[0].weight.register_hook(lambda g: None)
    assert len(gradient_data(frozen.double())) == 2, "a float64 model works"
