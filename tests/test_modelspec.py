"""Models cross the boundary as data: description, rebuild, and judging by training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradelab.boundary.modelspec import ModelSpecError, describe_module, rebuild
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
