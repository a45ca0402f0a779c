"""Models as plain data: an architecture (a list of standard layers) plus parameter tensors.

A student's model never crosses the trust boundary as an object. The sandbox describes it
(`describe_module`): its leaf modules in order, each one a standard torch layer from an allow
list, its parameters, and its output on a probe input chosen by the trusted side. The trusted
side rebuilds it from standard layers (`rebuild`) and checks that the rebuild computes what the
student's model computed on the probe; only then is it judged (trained, inspected, plotted).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from gradelab.boundary.wire import describe_value

# Layers a rebuilt model may contain, with the constructor arguments that define them.
ACTIVATIONS: dict[str, tuple[str, ...]] = {
    "Sigmoid": (),
    "Tanh": (),
    "ReLU": (),
    "LeakyReLU": ("negative_slope",),
    "ELU": ("alpha",),
    "SELU": (),
    "GELU": ("approximate",),
    "SiLU": (),
    "Mish": (),
    "Softplus": ("beta", "threshold"),
    "Hardtanh": ("min_val", "max_val"),
    "Identity": (),
    "Dropout": ("p",),
    "Flatten": ("start_dim", "end_dim"),
}


class ModelSpecError(ValueError):
    """The model cannot be described or rebuilt; the message is meant for the student."""


def _layer_spec(module: nn.Module) -> dict:
    kind = type(module)
    if kind is nn.Linear:
        return {"type": "Linear", "in": module.in_features, "out": module.out_features,
                "bias": module.bias is not None}
    name = kind.__name__
    if kind is getattr(nn, name, None) and name in ACTIVATIONS:
        return {"type": name, "args": {a: getattr(module, a) for a in ACTIVATIONS[name]}}
    raise ModelSpecError(
        f"the model contains a {name} layer; the grader rebuilds models from torch.nn.Linear and "
        f"standard activations ({', '.join(sorted(ACTIVATIONS))})")


def describe_module(model: Any, probe: torch.Tensor | None) -> dict:
    """Sandbox side: architecture, parameters and the model's own output on `probe`."""
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"expected a torch.nn.Module, got {describe_value(model)}")
    # remove_duplicate=False: one activation instance reused between layers must appear each time.
    leaves = [m for _, m in model.named_modules(remove_duplicate=False) if not list(m.children())]
    layers = [_layer_spec(m) for m in leaves]
    state = []
    for module in leaves:
        if isinstance(module, nn.Linear):
            state.append(module.weight.detach().clone())
            if module.bias is not None:
                state.append(module.bias.detach().clone())
    described: dict[str, Any] = {"layers": layers, "state": state, "class": type(model).__name__,
                                 "dtype": str(state[0].dtype).removeprefix("torch.") if state else "float32"}
    if probe is not None:
        try:
            with torch.no_grad():
                out = model(probe.to(state[0].dtype) if state else probe)
        except Exception as exc:  # the student's forward: say what it was given
            raise ModelSpecError(f"the model fails on an input batch of shape {tuple(probe.shape)}: "
                                 f"{type(exc).__name__}: {exc}"[:1000]) from None
        if not isinstance(out, torch.Tensor):
            raise ModelSpecError(f"the model's forward() returned a {type(out).__name__}, not a tensor")
        described["probe_output"] = out.detach()
    return described


def build_standard(layers: list[dict], state: list[torch.Tensor] | None = None) -> nn.Sequential:
    """Both sides: an nn.Sequential of standard layers from an architecture, with `state` loaded."""
    if not isinstance(layers, list) or not layers:
        raise ModelSpecError("the model has no layers")
    modules: list[nn.Module] = []
    for spec in layers:
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind == "Linear":
            n_in, n_out, bias = spec.get("in"), spec.get("out"), spec.get("bias")
            if type(n_in) is not int or type(n_out) is not int or type(bias) is not bool \
                    or not (0 < n_in <= 65536 and 0 < n_out <= 65536):
                raise ModelSpecError(f"invalid Linear layer {spec!r}")
            modules.append(nn.Linear(n_in, n_out, bias=bias))
        elif kind in ACTIVATIONS:
            args = spec.get("args") or {}
            if not isinstance(args, dict) or set(args) - set(ACTIVATIONS[kind]) or not all(
                    type(v) in (int, float, bool, str) for v in args.values()):
                raise ModelSpecError(f"invalid arguments for {kind}: {args!r}")
            modules.append(getattr(nn, kind)(**args))
        else:
            raise ModelSpecError(f"unknown layer type {kind!r}")
    model = nn.Sequential(*modules)
    if state is not None:
        load_state(model, state)
    return model


def load_state(model: nn.Sequential, state: list[torch.Tensor]) -> None:
    params = [p for m in model if isinstance(m, nn.Linear) for p in m.parameters()]
    if type(state) is not list or not all(type(t) is torch.Tensor and t.is_floating_point() for t in state):
        raise ModelSpecError("the model's parameters are not all floating-point tensors")
    if len(params) != len(state):
        raise ModelSpecError(f"the model has {len(params)} parameter tensors but {len(state)} were sent")
    dtype = state[0].dtype if state else torch.float32
    model.to(dtype)
    with torch.no_grad():
        for param, value in zip(params, state):
            if type(value) is not torch.Tensor or value.shape != param.shape or not value.is_floating_point():
                raise ModelSpecError(f"a parameter has shape {tuple(getattr(value, 'shape', ()))}, "
                                     f"expected {tuple(param.shape)}")
            param.copy_(value)


def rebuild(described: dict, probe: torch.Tensor | None = None, *, atol: float = 1e-5) -> nn.Sequential:
    """Trusted side: rebuild a described model and check it computes what the student's did."""
    if not isinstance(described, dict):
        raise ModelSpecError("the model description is not a dict")
    model = build_standard(described.get("layers"), described.get("state"))
    if probe is not None:
        expected = described.get("probe_output")
        params = list(model.parameters())
        try:
            with torch.no_grad():
                got = model(probe.to(params[0].dtype if params else probe.dtype))
        except RuntimeError:  # e.g. Linear layers whose sizes do not chain: a forward of its own ran them
            got = None
        if got is None or type(expected) is not torch.Tensor or expected.shape != got.shape or not torch.allclose(
                expected.to(got.dtype), got, atol=atol, rtol=1e-4, equal_nan=True):
            raise ModelSpecError(
                "the model's forward() does not compute its layers in order (a custom forward, a "
                "functional activation or a skip connection?); the grader can only judge models "
                "whose layers run one after the other")
    return model


def resolve_torch_arg(value: Any) -> Any:
    """Sandbox side: turn the trusted side's layer descriptions into torch objects.

    {"__layer__": "Sigmoid"} -> nn.Sigmoid(); {"__layer_class__": "Tanh"} -> nn.Tanh.
    """
    if isinstance(value, dict) and "__layer__" in value:
        return build_standard([{"type": value["__layer__"], "args": value.get("args", {})}])[0]
    if isinstance(value, dict) and "__layer_class__" in value and value["__layer_class__"] in ACTIVATIONS:
        return getattr(nn, value["__layer_class__"])
    if isinstance(value, list):
        return [resolve_torch_arg(v) for v in value]
    return value


def layer(name: str, **args: Any) -> dict:
    """Trusted side: how to pass an activation instance (e.g. nn.Sigmoid()) to the student's code."""
    return {"__layer__": name, "args": args}


def linear_shapes(described: dict) -> list[tuple[int, int]]:
    return [(l["in"], l["out"]) for l in described["layers"] if l["type"] == "Linear"]


def activations_between(described: dict) -> list[list[str]]:
    """The activation layers after each Linear layer (Dropout/Identity ignored), in order."""
    groups: list[list[str]] = []
    for spec in described["layers"]:
        if spec["type"] == "Linear":
            groups.append([])
        elif groups and spec["type"] not in ("Dropout", "Identity"):
            groups[-1].append(spec["type"])
        elif not groups:
            groups.append([spec["type"]])  # an activation before the first Linear layer
    return groups


# Activations the analytic training pass knows, in numpy: forward from the input z, and the
# derivative from the input z and output h.
_NUMPY_ACTIVATIONS = {
    nn.Sigmoid: (lambda z, m: 1 / (1 + np.exp(-z)), lambda z, h, m: h * (1 - h)),
    nn.Tanh: (lambda z, m: np.tanh(z), lambda z, h, m: 1 - h * h),
    nn.ReLU: (lambda z, m: np.maximum(z, 0), lambda z, h, m: (z > 0).astype(h.dtype)),
    nn.LeakyReLU: (lambda z, m: np.where(z > 0, z, z * m.negative_slope).astype(z.dtype),
                   lambda z, h, m: np.where(z > 0, 1.0, m.negative_slope).astype(h.dtype)),
    nn.Identity: (lambda z, m: z, lambda z, h, m: np.ones_like(h)),
}


def train_logits_batched(models: list[nn.Sequential], inputs: torch.Tensor, targets: torch.Tensor, *,
                         steps: int, lr: float) -> torch.Tensor:
    """Train several rebuilt models of one architecture at once with full-batch SGD on
    BCE-with-logits (mean over the batch), exactly as each would train alone; return their logits.

    Plain SGD updates each parameter with its own gradient, so a sum of the models' losses trains
    every model as if alone, in one pass per step. Linear layers with sigmoid, tanh, (leaky) ReLU
    use hand-written backpropagation in numpy: at these tiny sizes a step is all per-operation
    overhead, and numpy's is a fraction of autograd's (5 models x 10 000 steps: 0.75 s instead of 1.9 s).
    Other activations fall back to autograd.
    """
    layers = list(models[0])
    if all(type(m) in _NUMPY_ACTIVATIONS for m in layers if not isinstance(m, nn.Linear)):
        return _train_numpy(models, layers, inputs, targets, steps=steps, lr=lr)
    return _train_autograd(models, layers, inputs, targets, steps=steps, lr=lr)


def _stacked_parameters(models: list[nn.Sequential], layers: list[nn.Module]) -> tuple[list, list]:
    """Per Linear layer: the models' weights (models, out, in) and biases (models, out), copied."""
    weights, biases = [], []
    for i, module in enumerate(layers):
        if isinstance(module, nn.Linear):
            weights.append(torch.stack([m[i].weight.detach() for m in models]).clone())
            biases.append(torch.stack([m[i].bias.detach() if m[i].bias is not None
                                       else torch.zeros(module.out_features, dtype=weights[0].dtype)
                                       for m in models]).clone())
    return weights, biases


def _train_numpy(models, layers, inputs, targets, *, steps: int, lr: float) -> torch.Tensor:
    weights, biases = _stacked_parameters(models, layers)
    dtype = weights[0].numpy().dtype
    # Transposed weights (models, in, out) so that a layer is h @ w + b; biases as (models, 1, out).
    w = [np.ascontiguousarray(t.numpy().transpose(0, 2, 1)) for t in weights]
    b = [t.numpy()[:, None, :].copy() for t in biases]
    x = np.broadcast_to(inputs.numpy().astype(dtype), (len(models), *inputs.shape))
    y = np.broadcast_to(targets.numpy().astype(dtype), (len(models), targets.shape[0]))
    lr = dtype.type(lr)

    def forward(track: list | None) -> np.ndarray:
        h, k = x, 0
        for module in layers:
            if isinstance(module, nn.Linear):
                z = h @ w[k] + b[k]
                k += 1
            else:
                z = _NUMPY_ACTIVATIONS[type(module)][0](h, module)
            if track is not None:
                track.append((module, h, z))  # input and output of each layer
            h = z
        return h.reshape(len(models), -1)

    with np.errstate(over="ignore"):  # exp of large inputs in a sigmoid: 1 / inf is the right 0
        for _ in range(steps):
            track: list = []
            logits = forward(track)
            delta = ((1 / (1 + np.exp(-logits)) - y) / y.shape[1])[..., None]
            k = len(w) - 1
            for module, h_in, h_out in reversed(track):
                if isinstance(module, nn.Linear):
                    grad_w, grad_b = h_in.transpose(0, 2, 1) @ delta, delta.sum(1, keepdims=True)
                    if k > 0:
                        delta = delta @ w[k].transpose(0, 2, 1)
                    w[k] -= lr * grad_w
                    b[k] -= lr * grad_b
                    k -= 1
                else:
                    delta = delta * _NUMPY_ACTIVATIONS[type(module)][1](h_in, h_out, module)
        return torch.from_numpy(np.ascontiguousarray(forward(None)))


def _train_autograd(models, layers, inputs, targets, *, steps: int, lr: float) -> torch.Tensor:
    weights, biases = _stacked_parameters(models, layers)
    x = inputs.to(weights[0].dtype).expand(len(models), *inputs.shape)
    y = targets.to(weights[0].dtype).expand(len(models), targets.shape[0])

    def forward() -> torch.Tensor:
        h, k = x, 0
        for module in layers:
            if isinstance(module, nn.Linear):
                h = torch.baddbmm(biases[k].unsqueeze(1), h, weights[k].transpose(1, 2))
                k += 1
            else:
                h = module(h)
        return h.reshape(len(models), -1)

    for _ in range(steps):
        params = [p.requires_grad_(True) for p in weights + biases]
        loss = nn.functional.binary_cross_entropy_with_logits(forward(), y, reduction="none").mean(1).sum()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * g)
        weights, biases = [w.detach() for w in weights], [b.detach() for b in biases]
    with torch.no_grad():
        return forward()
