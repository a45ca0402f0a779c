"""Reference solutions, extracted from source/ by `gradelab release`. Do not edit."""


import numpy as np


import torch


from torch import nn


import matplotlib


import matplotlib.pyplot as plt


from vanishing_helpers import plot_grad, xor_problem, gradient_print, Initializer


def my_sigmoid(x):
    """Return the sigmoid activation of the tensor x."""
    ### BEGIN SOLUTION
    a = 1 / (1 + torch.exp(-x))
    ### END SOLUTION
    return a


def my_sigmoid_grad(a):
    """Return the gradient of the sigmoid, given its activation a = my_sigmoid(x)."""
    ### BEGIN SOLUTION
    grad = a * (1 - a)
    ### END SOLUTION
    return grad


class NeuralNetwork(nn.Module):
    def __init__(self, activation=nn.Sigmoid()):
        super().__init__()
        ### BEGIN SOLUTION
        self.linear_stack = nn.Sequential(
            nn.Linear(2, 2), activation,
            nn.Linear(2, 2), activation,
            nn.Linear(2, 2), activation,
            nn.Linear(2, 2),
        )
        ### END SOLUTION

    def forward(self, x):
        logits = self.linear_stack(x)
        return logits


def build_model(activation=nn.Sigmoid()):
    """Return the 2-2-2-2-2 model with `activation` after every layer but the last,
    and weights drawn uniformly from [-1, 1]."""
    ### BEGIN SOLUTION
    model = NeuralNetwork(activation)
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            nn.init.uniform_(layer.weight, a=-1.0, b=1.0)
    ### END SOLUTION
    return model


def build_model_glorot(activation=nn.Sigmoid()):
    """Return the 2-2-2-2-2 model with Glorot (Xavier) normal initialisation."""
    ### BEGIN SOLUTION
    model = NeuralNetwork(activation)
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_normal_(layer.weight)
    ### END SOLUTION
    return model


def deep_network(depth, activation=nn.Sigmoid()):
    ### BEGIN SOLUTION
    layers = [nn.Linear(10, 5)]
    for _ in range(depth - 1):
        layers += [activation, nn.Linear(5, 5)]
    return nn.Sequential(*layers)


def kill_gradients(model):
    ### BEGIN SOLUTION
    # Huge constant weights in the first layer saturate the next activation: its local gradient
    # is 0, and so is every gradient below it.
    model.apply(Initializer(target_layer=0, multiplier=10.0))
    return model


def first_layer_gradient(depth, activation, seed):
    torch.manual_seed(seed)
    grads = gradient_print(deep_network(depth, activation), seed=seed, verbose=False)
    return grads[0].abs().max().item()


def smallest_dying_depth(activation, threshold=1e-6):
    for depth in range(2, 26):
        median = float(np.median([first_layer_gradient(depth, activation, seed) for seed in range(5)]))
        if median < threshold:
            return depth
    return None


class NegativeInitializer:
    ### BEGIN SOLUTION
    def __init__(self, target_layer):
        self._counter = -1
        self.target_layer = target_layer

    def __call__(self, submodule):
        self._counter += 1
        if self._counter == self.target_layer:
            with torch.no_grad():
                submodule.weight.fill_(-1.0)
                # Negative weights alone leave a positive bias able to open the ReLU.
                if submodule.bias is not None:
                    submodule.bias.fill_(-1.0)


def make_xor_model():
    ### BEGIN SOLUTION
    # With lr=1e-3, SGD moves slowly: a wide tanh network with larger initial weights gives
    # strong gradients from the first step.
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    for layer in model:
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, 0.0, 1.5)
            nn.init.zeros_(layer.bias)
    return model


def he_init_(model, negative_slope=0.0):
    ### BEGIN SOLUTION
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_normal_(layer.weight, a=negative_slope, mode="fan_in", nonlinearity="leaky_relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    return model


def saturation_fraction(model, inputs, threshold=0.99):
    ### BEGIN SOLUTION
    outputs = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: outputs.append(out.detach()))
             for m in model.modules() if isinstance(m, nn.Tanh)]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for hook in hooks:
            hook.remove()
    if not outputs:
        return 0.0
    flat = torch.cat([o.flatten() for o in outputs])
    return float((flat.abs() > threshold).float().mean())


def expected_initial_loss(num_classes):
    ### BEGIN SOLUTION
    return float(np.log(num_classes))
