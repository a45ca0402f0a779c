"""Verdicts of the hidden tests that a NaN, a missing bias or a forged sandbox report must not turn
into a pass: NaN-safe comparisons, training exactly the student's architecture within a budget,
and the trusted check of my_sigmoid's source behind the sandbox's "tracks autograd"."""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

from gradelab.hidden.assertions import assert_tensor_close, expect_finite_parameters, expect_number, largest_magnitude
from gradelab.hidden.sourcecheck import torch_only_problems
from gradelab.hidden.training import MAX_TRAINED_PARAMETERS, check_training_budget, train_logits_batched

XOR_X = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
XOR_Y = torch.tensor([0.0, 1.0, 1.0, 0.0])


@pytest.fixture(scope="module")
def hidden(root, reference):
    """The hidden tests' conftest and test_part3, imported here as the test runner imports them
    (`reference` puts vanishing_helpers on the path)."""
    modules = {}
    saved = sys.modules.get("conftest")
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)  # `question` is the plugin's marker
    try:
        for name in ("conftest", "test_part3"):
            spec = importlib.util.spec_from_file_location(f"hidden_{name}", root / "source/hidden_tests" / f"{name}.py")
            modules[name] = importlib.util.module_from_spec(spec)
            sys.modules["conftest"] = modules["conftest"]  # what test_part3's `from conftest import` finds
            spec.loader.exec_module(modules[name])
    finally:
        sys.modules["conftest"] = saved
    return modules


class LocalStudent:
    """The `student` fixture's interface for these tests, answered by functions defined here (a
    sandbox's honest replies): `module` seeds torch as the sandbox does."""

    def __init__(self, **functions):
        self.functions = functions
        self.modules_built = 0

    def apply(self, name, model, *args, probe, mode="apply"):
        changed = copy.deepcopy(model)
        if mode == "apply":
            changed.apply(self.functions[name](*args))
        else:
            changed = self.functions[name](changed, *args)
        return changed, {}

    def module(self, name, *args, probe, seed=None):
        torch.manual_seed(seed)
        self.modules_built += 1
        return self.functions[name](*args), {}


# ------------------------------------------------------------------ NaN and inf are not "zero" or "close"


def test_largest_magnitude_is_infinite_for_nan_and_inf():
    assert largest_magnitude(torch.tensor([0.0, -2.0, 1.0])) == 2.0
    assert largest_magnitude(torch.zeros(0)) == 0.0
    for bad in (math.nan, math.inf, -math.inf):
        value = largest_magnitude(torch.tensor([0.0, bad]))
        assert value == math.inf and not value < 1e-8 and not value == 0


def test_non_finite_values_fail_the_assertions_with_a_message():
    with pytest.raises(AssertionError, match=r"2 values are NaN or infinite"):
        assert_tensor_close(torch.tensor([0.5, math.nan, math.inf]), torch.tensor([0.5, 0.5, 0.5]), "my_sigmoid(x)")
    for value in (math.nan, math.inf):
        with pytest.raises(AssertionError, match="not a finite number"):
            expect_number(value, "expected_initial_loss(2)")
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    expect_finite_parameters(model, "the model")
    with torch.no_grad():
        model[2].bias.fill_(math.nan)
    with pytest.raises(AssertionError, match=r"^the model has 1 of 1 bias values NaN or infinite \(layer 2\)"):
        expect_finite_parameters(model, "the model")


# Negative weights for the target, and a NaN bias: every unit "closed", every gradient NaN.
NAN_BIAS_INITIALIZER = '''
class NegativeInitializer:
    def __init__(self, target_layer):
        self.target_layer, self.visits = target_layer, 0

    def __call__(self, module):
        if self.visits == self.target_layer:
            with torch.no_grad():
                module.weight.fill_(-1.0)
                module.bias.fill_(float("nan"))
        self.visits += 1
'''


def _defined(source: str, name: str):
    namespace = {"torch": torch}
    exec(source, namespace)  # noqa: S102 - the notebook answer under test, as the sandbox would run it
    return namespace[name]


@pytest.mark.parametrize("target", [0, 2])
def test_a_nan_bias_does_not_kill_the_gradient(hidden, reference, target):
    part3 = hidden["test_part3"]
    nan_bias = LocalStudent(NegativeInitializer=_defined(NAN_BIAS_INITIALIZER, "NegativeInitializer"))
    part3.test_negative_weights(nan_bias, target, seed=7)  # the weights are negative: that test passes
    with pytest.raises(AssertionError, match=rf"after NegativeInitializer\({target}\) the model has 5 of 5 bias "
                                             "values NaN or infinite"):
        part3.test_gradient_dies_below_target(nan_bias, target, seed=7)
    part3.test_gradient_dies_below_target(LocalStudent(NegativeInitializer=reference.NegativeInitializer), target, 7)


# ------------------------------------------------------------------ XOR: the student's architecture, within a budget


@pytest.mark.parametrize("activation", [nn.ReLU, nn.GELU], ids=["numpy", "autograd"])
def test_layers_without_bias_train_without_one(activation):
    """Both batched trainers follow xor_problem's SGD on a model whose layers have no bias (or only some)."""
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(nn.Sequential(nn.Linear(2, 6, bias=False), activation(), nn.Linear(6, 4), activation(),
                                    nn.Linear(4, 1, bias=False)))
    logits = train_logits_batched(models, XOR_X, XOR_Y, steps=300, lr=0.1)
    for k, model in enumerate(models):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(300):
            nn.functional.binary_cross_entropy_with_logits(model(XOR_X).squeeze(), XOR_Y).backward()
            optimizer.step()
            optimizer.zero_grad()
        assert torch.allclose(logits[k], model(XOR_X).squeeze().detach(), atol=1e-4)
    # With no bias anywhere, the input (0, 0) gives exactly 0 however the model is trained.
    trained = train_logits_batched([bias_free_relu_xor_model(), bias_free_relu_xor_model()], XOR_X, XOR_Y,
                                   steps=100, lr=0.1)
    assert trained[:, 0].tolist() == [0.0, 0.0] and bool((trained[:, 1:] != 0).all())


@pytest.mark.parametrize("layers", [
    lambda: [nn.Tanh(), nn.Linear(2, 6, bias=False), nn.Tanh(), nn.Identity(), nn.Linear(6, 6), nn.Linear(6, 1), nn.Sigmoid()],
    lambda: [nn.Linear(2, 5), nn.LeakyReLU(0.3), nn.Sigmoid(), nn.Linear(5, 1)],
    lambda: [nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1)],
], ids=["activation-first-linear-after-linear-trailing-sigmoid", "two-activations-in-a-row", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_any_order_of_layers_trains_as_xor_problem_would(layers, dtype):
    """The numpy trainer's stages (activations before the first Linear, several or none between two
    Linear layers, one after the last) follow torch's own SGD on the same models."""
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(nn.Sequential(*layers()).to(dtype))
    logits = train_logits_batched(models, XOR_X, XOR_Y, steps=300, lr=0.1)
    assert logits.dtype == dtype
    for k, model in enumerate(models):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(300):
            nn.functional.binary_cross_entropy_with_logits(model(XOR_X.to(dtype)).squeeze(), XOR_Y.to(dtype)).backward()
            optimizer.step()
            optimizer.zero_grad()
        assert torch.allclose(logits[k], model(XOR_X.to(dtype)).squeeze().detach(), atol=1e-5)


@pytest.mark.parametrize("model, message", [
    (nn.Sequential(nn.Linear(2, 512), nn.Tanh(), nn.Linear(512, 1)), "has 512 units in its widest layer"),
    (nn.Sequential(nn.Linear(2, 200), nn.Tanh(), nn.Linear(200, 200), nn.Tanh(), nn.Linear(200, 1)),
     "has 41,001 parameters"),
    (nn.Sequential(*[nn.Linear(2, 2) if i % 2 == 0 else nn.Tanh() for i in range(33)]),
     r"has 33 layers \(Linear and activations\)"),
], ids=["wide", "parameters", "deep"])
def test_models_past_the_budget_are_refused_before_training(model, message):
    with pytest.raises(AssertionError, match=message + ", so it was not trained"):
        check_training_budget(model, "make_xor_model's network")
    with pytest.raises(AssertionError, match=message):
        train_logits_batched([model], XOR_X, XOR_Y, steps=10_000, lr=1e-3)


def test_xor_refuses_a_huge_model_after_building_one(hidden):
    student = LocalStudent(make_xor_model=lambda: nn.Sequential(nn.Linear(2, 5000), nn.ReLU(), nn.Linear(5000, 1)))
    with pytest.raises(AssertionError, match=f"at most {MAX_TRAINED_PARAMETERS:,} parameters"):
        hidden["test_part3"].test_xor_solved_reliably(student, seed=3)
    assert student.modules_built == 1


def bias_free_relu_xor_model() -> nn.Sequential:
    """Solves XOR under xor_problem's training on about half of the seeds (it cannot shift its
    units); training biases it does not have solved it on almost all of them."""
    return nn.Sequential(nn.Linear(2, 16, bias=False), nn.ReLU(), nn.Linear(16, 16, bias=False), nn.ReLU(),
                         nn.Linear(16, 1, bias=False))


@pytest.mark.slow
def test_the_grader_reaches_xor_problems_verdict_on_each_seed(hidden, reference):
    """The hidden test's batched training and the course's own xor_problem, on the same models
    (torch seeded as the sandbox seeds it), agree on every seed, solved or not. (Training the
    biases a bias-free model lacks turned seed 4's unsolved into solved.)"""
    from vanishing_helpers import xor_problem

    for make, seeds in ((bias_free_relu_xor_model, range(6)), (reference.make_xor_model, range(2))):
        models = []
        for seed in seeds:
            torch.manual_seed(seed)
            models.append(make())
        grader = (hidden["conftest"].train_xor_batched([copy.deepcopy(m) for m in models]) == 1).tolist()
        course = [xor_problem(m, verbose=False).solved for m in models]
        assert grader == course, (make.__name__, grader, course)
        if make is bias_free_relu_xor_model:
            assert len(set(course)) == 2, "the seeds should include solved and unsolved ones"


# ------------------------------------------------------------------ my_sigmoid's source, read by the trusted side


def _cells(*sources: str) -> list[tuple[int, str]]:
    return [(index, textwrap.dedent(source)) for index, source in enumerate(sources)]


SETUP = "import numpy as np\nimport torch\nfrom torch import nn\n%matplotlib inline\n"


@pytest.mark.parametrize("answer", [
    "def my_sigmoid(x):\n    a = 1 / (1 + torch.exp(-x))\n    return a",
    "def my_sigmoid(x):\n    return torch.sigmoid(x)",
    "my_sigmoid = torch.special.expit",
    "import math\n\ndef my_sigmoid(x):\n    return 1 / (1 + math.e ** -x)",
    "def my_sigmoid(x):\n    return torch.where(x >= 0, 1 / (1 + torch.exp(-x)), torch.exp(x) / (1 + torch.exp(x)))",
    "def _exp(t):\n    return torch.exp(t)\n\ndef my_sigmoid(x):\n    return 1 / (1 + _exp(-x))",
])
def test_torch_answers_pass_the_source_check(answer):
    # Later cells reading numpy values (x from np.linspace) are not the function's own computation.
    cells = _cells(SETUP, answer, "x = torch.tensor(np.linspace(-10, 10, 100))\na = my_sigmoid(x)")
    assert torch_only_problems(cells, "my_sigmoid") == []


@pytest.mark.parametrize("answer, problem", [
    ("def my_sigmoid(x):\n    return torch.tensor(1 / (1 + np.exp(-x.detach().numpy())))", "uses np.exp"),
    ("import math\n\ndef my_sigmoid(x):\n    return torch.tensor([1 / (1 + math.exp(-v)) for v in x.tolist()])",
     "uses math.exp"),
    ("from numpy import exp as e_\n\ndef my_sigmoid(x):\n    return 1 / (1 + e_(-x))", "uses e_"),
    ("def helper(x):\n    return np.exp(-x)\n\ndef my_sigmoid(x):\n    return 1 / (1 + helper(x))",
     "`helper` uses np.exp"),
    ("def my_sigmoid(x):\n    with torch.no_grad():\n        return torch.sigmoid(x)", "uses .no_grad"),
    ("def my_sigmoid(x):\n    return eval('torch.sigmoid')(x)", "uses eval"),
    ("my_sigmoid = lambda x: torch.tensor(1 / (1 + np.exp(-x.numpy())))", "uses np.exp"),
    ("from scipy.special import expit as my_sigmoid", "is imported from scipy.special"),
    ("def my_sigmoid(x):\n    return torch.sigmoid(x)\n\nfor my_sigmoid in [np.tanh]:\n    pass", "bound by a loop"),
])
def test_numpy_math_and_dynamic_answers_fail_the_source_check(answer, problem):
    problems = torch_only_problems(_cells(SETUP, answer), "my_sigmoid")
    assert any(problem in p for p in problems), problems


def test_the_last_definition_is_the_one_checked():
    numpy_first = _cells(SETUP, "def my_sigmoid(x):\n    return np.exp(x)", "def my_sigmoid(x):\n    return torch.sigmoid(x)")
    assert torch_only_problems(numpy_first, "my_sigmoid") == []
    torch_first = _cells(SETUP, *reversed([source for _, source in numpy_first[1:]]))
    assert torch_only_problems(torch_first, "my_sigmoid") == ["`my_sigmoid` uses np.exp, which computes outside "
                                                              "torch (cell 2, line 2)"]


def test_an_answer_that_cannot_be_found_or_parsed_fails():
    for cells in (_cells(SETUP), _cells(SETUP, "def my_sigmoid(x:\n    return x")):
        assert torch_only_problems(cells, "my_sigmoid") == [
            "no cell defines `my_sigmoid` with `def` or an assignment, so its code cannot be checked"]


# ------------------------------------------------------------------ the same, graded end to end

FORGED_AUTOGRAD = '''
def my_sigmoid(x):
    """Right values, computed outside autograd."""
    return torch.tensor(1 / (1 + np.exp(-x.detach().numpy())))


def my_sigmoid_grad(a):
    return a * (1 - a)


import gradelab.sandbox.rpc as _rpc


def _forged_call_grad(self, request):
    """The reply an autograd-friendly my_sigmoid would give."""
    s = torch.sigmoid(_rpc.resolve_torch_arg(request.args[0]))
    return {"value": s, "grad": s * (1 - s), "tracks_grad": True}


_rpc.RpcServer.op_call_grad = _forged_call_grad
'''
WIDE_XOR = '''
def make_xor_model():
    return nn.Sequential(nn.Linear(2, 512), nn.Tanh(), nn.Linear(512, 1))
'''


@pytest.mark.slow
def test_forged_autograd_nan_bias_and_a_huge_xor_model_lose_their_points(root, tmp_path):
    import nbformat

    from gradelab.grading.supervisor import Grader
    from gradelab.project import Project

    nb = nbformat.read(root / "source/vanishing_gradients/vanishing_gradients.ipynb", as_version=4)
    replaced = {"q1_2_sigmoid": FORGED_AUTOGRAD, "q3_2_negative": NAN_BIAS_INITIALIZER, "q3_3_xor": WIDE_XOR}
    for cell in nb.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if grade_id in replaced:
            cell.source = replaced[grade_id].strip()
    path = tmp_path / "hostile_verdicts.ipynb"
    nbformat.write(nb, path)
    with Grader(Project.load(root)) as grader:
        result = grader.grade(path, "hostile_verdicts", out_dir=tmp_path / "out")
    assert result.status == "graded", result
    tests = {t.name: t for t in result.tests}
    scores = {q.id: q.score for q in result.questions}

    autograd = next(t for name, t in tests.items() if name.startswith("my_sigmoid works with autograd"))
    assert autograd.status == "failed" and "does not compute with torch alone" in autograd.output, autograd.output
    assert "np.exp" in autograd.output
    dies = [t for name, t in tests.items() if name.startswith("under ReLU, no gradient reaches")]
    assert len(dies) == 2 and all(t.status == "failed" and "NaN" in t.output for t in dies), dies
    assert scores["q3_2"] <= 1
    xor = next(t for name, t in tests.items() if name.startswith("xor_problem's training solves XOR"))
    assert xor.status == "failed" and "512 units in its widest layer, so it was not trained" in xor.output
    assert scores["q3_3"] < 3
    # Every other hidden test passes (q1_3's autograd cell fails on the numpy my_sigmoid).
    others = [(t.name, t.output) for t in result.tests if t.question not in ("q1_3", "q3_2", "q3_3")
              and t.status != "passed"]
    assert not others
