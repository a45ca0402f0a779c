"""Models as plain data: an architecture (a list of standard layers) plus parameter tensors.

A student's model never crosses the trust boundary as an object. The sandbox describes it
(`describe_module`): its leaf modules in order, each one a standard torch layer from an allow
list, its parameters, and its output on a probe input chosen by the trusted side. The trusted
side rebuilds it from standard layers (`rebuild`) and checks that the rebuild computes what the
student's model computed on the probe; only then is it judged (trained, inspected, plotted).
"""

from __future__ import annotations

from typing import Any

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
