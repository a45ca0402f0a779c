"""Models cross the boundary as data: description, rebuild, and judging by training."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gradelab.boundary.modelspec import MAX_PARAMETERS, ModelSpecError, build_standard, describe_module, rebuild
from gradelab.hidden.training import train_logits_batched

XOR_X = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
XOR_Y = torch.tensor([0.0, 1.0, 1.0, 0.0])


class CustomForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(2, 3), nn.Linear(3, 1)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))  # a functional activation: not in the layer list


def test_shared_activation_instance_is_described_at_each_use():
    act = nn.Tanh()
    model = nn.Sequential(nn.Linear(2, 2), act, nn.Linear(2, 2), act, nn.Linear(2, 1))
    described = describe_module(model, XOR_X)
    assert [l["type"] for l in described["layers"]] == ["Linear", "Tanh", "Linear", "Tanh", "Linear"]
    assert torch.equal(rebuild(described, XOR_X)(XOR_X), model(XOR_X).detach())


def test_custom_forward_that_differs_from_layer_order_is_refused():
    with pytest.raises(ModelSpecError, match="does not compute its layers in order"):
        rebuild(describe_module(CustomForward(), XOR_X), XOR_X)


def test_unknown_layer_is_refused_with_a_message():
    with pytest.raises(ModelSpecError, match="Conv1d"):
        describe_module(nn.Sequential(nn.Conv1d(1, 1, 1)), None)


def test_forged_descriptions_are_rejected():
    good = describe_module(nn.Sequential(nn.Linear(2, 1)), XOR_X)
    for forged in ({**good, "layers": [{"type": "Linear", "in": 2, "out": 10**9, "bias": True}]},
                   {**good, "layers": [{"type": "os.system"}]},
                   {**good, "state": [torch.zeros(3, 3), torch.zeros(1)]},
                   {**good, "probe_output": torch.zeros(4, 1) + 99}):
        with pytest.raises(ModelSpecError):
            rebuild(forged, XOR_X)


@pytest.mark.parametrize("activation", [nn.Tanh, nn.Sigmoid, nn.ReLU, nn.LeakyReLU, nn.GELU])
def test_batched_training_equals_training_each_model_alone(activation):
    """The analytic (or, for GELU, autograd) batched trainer follows xor_problem's SGD exactly."""
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(nn.Sequential(nn.Linear(2, 4), activation(), nn.Linear(4, 1)))
    logits = train_logits_batched(models, XOR_X, XOR_Y, steps=300, lr=0.1)
    for k, model in enumerate(models):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(300):
            loss = nn.functional.binary_cross_entropy_with_logits(model(XOR_X).squeeze(), XOR_Y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        assert torch.allclose(logits[k], model(XOR_X).squeeze().detach(), atol=1e-4), activation


def _linear(n_in: int, n_out: int, bias: bool = True) -> dict:
    return {"type": "Linear", "in": n_in, "out": n_out, "bias": bias}


# Peak memory of a fresh process while forged descriptions declare 512 MiB of float32 parameters
# but send 2x2 tensors; the refusals are kept alive, as a test report would keep them.
_DECLARED_HUGE_LAYERS = """
import resource, torch
from gradelab.boundary.modelspec import ModelSpecError, build_standard, rebuild
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
before, refusals = peak_mb(), []
tiny = [torch.zeros(2, 2), torch.zeros(2)]
for layers in ([{"type": "Linear", "in": 65536, "out": 2048, "bias": True}],
               [{"type": "Linear", "in": 2, "out": 2, "bias": True}, {"type": "ReLU"},
                {"type": "Linear", "in": 65536, "out": 2048, "bias": True}],
               [{"type": "Linear", "in": 4096, "out": 2048, "bias": True}] * 16):
    for build in (lambda: build_standard(layers, tiny), lambda: rebuild({"layers": layers, "state": tiny})):
        try:
            build()
        except ModelSpecError as exc:
            refusals.append(exc)
print(len(refusals), peak_mb() - before)
"""


def test_declared_sizes_are_checked_before_anything_is_allocated():
    done = subprocess.run([sys.executable, "-c", _DECLARED_HUGE_LAYERS], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], check=True)
    refused, grown_mb = done.stdout.split()
    assert int(refused) == 6
    assert float(grown_mb) < 100, f"peak memory grew by {grown_mb} MB"


def test_a_declared_size_must_match_its_tensor_exactly():
    for layers, state, message in (
            ([_linear(65536, 2)], [torch.zeros(2, 2), torch.zeros(2)], "shape"),
            ([_linear(2, 2)], [torch.zeros(2, 2)], "but 1 were sent"),
            ([_linear(2, 2, bias=False)], [torch.zeros(2, 2), torch.zeros(2)], "were sent"),
            ([_linear(2, 2)], [torch.zeros(2, 2), torch.zeros(2, dtype=torch.float64)], "mix dtypes"),
            ([_linear(2, 2)], [torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2)], "floating-point"),
            ([_linear(2, 2)], "not a list", "not a list")):
        with pytest.raises(ModelSpecError, match=message):
            build_standard(layers, state)


def test_too_many_layers_are_refused_before_any_is_built():
    with pytest.raises(ModelSpecError, match="300000 layers"):
        rebuild({"layers": [{"type": "ReLU"}] * 300_000, "state": []}, XOR_X)
    with pytest.raises(ModelSpecError, match="300000 layers"):
        build_standard([_linear(2, 2, bias=False)] * 300_000, [torch.zeros(2, 2)] * 300_000)


def test_parameter_budget_refuses_a_model_just_over_it_and_keeps_the_largest_graded_one():
    side = math.isqrt(MAX_PARAMETERS) + 1
    with pytest.raises(ModelSpecError, match=f"{side * side:,} parameters"):
        build_standard([_linear(side, side, bias=False)], [torch.zeros(side, side)])
    # he_init_'s model in the hidden tests, the largest the grader judges
    model = nn.Sequential(nn.Linear(256, 256), nn.LeakyReLU(0.1), nn.Linear(256, 128))
    probe = torch.randn(8, 256)
    rebuilt = rebuild(describe_module(model, probe), probe)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.parameters(), model.parameters()))


@pytest.mark.parametrize("args", [{"type": "Dropout", "args": {"p": 2.0}},
                                  {"type": "Hardtanh", "args": {"min_val": 1.0, "max_val": -1.0}},
                                  {"type": "LeakyReLU", "args": {"negative_slope": float("nan")}},
                                  {"type": ["Sigmoid"]}])
def test_invalid_activations_are_model_spec_errors(args):
    with pytest.raises(ModelSpecError):
        build_standard([args])


def test_nan_parameters_are_data_but_never_equal():
    model = nn.Sequential(nn.Linear(2, 2), nn.Sigmoid(), nn.Linear(2, 1))
    with torch.no_grad():
        model[2].bias.fill_(float("nan"))
    described = describe_module(model, XOR_X)
    assert build_standard(described["layers"], described["state"])[2].bias.isnan().all()
    with pytest.raises(ModelSpecError, match=r"contains NaN \(1 of its parameters are NaN\)"):
        rebuild(described, XOR_X)
    # a forged description whose NaN output "matches" any architecture in any order
    forged = {"layers": [_linear(2, 1), {"type": "Sigmoid", "args": {}}, _linear(1, 2)],
              "state": [torch.full((1, 2), float("nan")), torch.zeros(1), torch.zeros(2, 1), torch.zeros(2)],
              "probe_output": torch.full((4, 2), float("nan"))}
    with pytest.raises(ModelSpecError, match="NaN"):
        rebuild(forged, XOR_X)


def _references_kept_by(error: BaseException) -> list:
    """Every local variable that the frames of `error` (and of the errors it was raised during) keep alive."""
    kept, seen = [], error
    while seen is not None:
        tb = seen.__traceback__
        while tb is not None:
            kept += list(tb.tb_frame.f_locals.values())
            tb = tb.tb_next
        seen = seen.__context__
    return kept


def _refusal(described: dict) -> ModelSpecError:
    try:
        rebuild(described, XOR_X)
    except ModelSpecError as exc:
        return exc
    raise AssertionError("the description was accepted")


def test_a_refused_model_is_not_kept_alive_by_the_error():
    described = describe_module(nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 1)), XOR_X)
    for refused in ({**described, "probe_output": described["probe_output"] + 1},
                    {**described, "state": described["state"][:3] + [torch.zeros(2)]}):
        kept = _references_kept_by(_refusal(refused))
        assert not [v for v in kept if isinstance(v, nn.Module)]
