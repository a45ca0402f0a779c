"""Models as plain data: an architecture (a list of standard layers) plus parameter tensors.

A student's model never crosses the trust boundary as an object. The sandbox describes it
(`describe_module`): its leaf modules in order, each one a standard torch layer from an allow
list, its parameters, and its output on a probe input chosen by the trusted side. The trusted
side rebuilds it from standard layers (`rebuild`) and checks that the rebuild computes what the
student's model computed on the probe; only then is it judged (trained, inspected, plotted).
"""

from __future__ import annotations

import math
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

# Bounds on a description, checked before anything is allocated. The largest model the hidden
# tests build is Linear(256, 256)-LeakyReLU-Linear(256, 128), 98,688 parameters; the deepest the
# notebook asks for is deep_network(25), 49 layers. The bounds leave students' own models 20x and
# 5x that room while a rebuilt model stays below 16 MB (float64).
MAX_LAYERS = 256
MAX_PARAMETERS = 2_000_000
MAX_FEATURES = 65536


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
    """Both sides: an nn.Sequential of standard layers from an architecture, with `state` loaded.

    The whole description is checked before any parameter is allocated: a forged one costs its
    own size, never what it declares."""
    activations, linears = _checked_layers(layers)
    if state is not None:
        _check_state(linears, state)
    # Linear layers are made the usual way (their default initialisation draws from torch's
    # generator, which the student's code on the sandbox side goes on drawing from), within the
    # bounds just checked.
    sizes = iter(linears)
    model = nn.Sequential(*(activations[i] if i in activations else nn.Linear(*next(sizes))
                            for i in range(len(layers))))
    if state:
        model.to(state[0].dtype)
        params = [p for m in model if isinstance(m, nn.Linear) for p in m.parameters()]
        with torch.no_grad():
            for param, value in zip(params, state):
                param.copy_(value)
    return model


def _checked_layers(layers: Any) -> tuple[dict[int, nn.Module], list[tuple[int, int, bool]]]:
    """The activation modules by position and the (in, out, bias) of each Linear layer, in order."""
    if type(layers) is not list or not layers:
        raise ModelSpecError("the model has no layers")
    if len(layers) > MAX_LAYERS:
        raise ModelSpecError(f"the model has {len(layers)} layers; the grader rebuilds models of at most "
                             f"{MAX_LAYERS} layers")
    activations: dict[int, nn.Module] = {}
    linears: list[tuple[int, int, bool]] = []
    for position, spec in enumerate(layers):
        kind = spec.get("type") if type(spec) is dict else None
        if kind == "Linear":
            n_in, n_out, bias = spec.get("in"), spec.get("out"), spec.get("bias")
            if type(n_in) is not int or type(n_out) is not int or type(bias) is not bool \
                    or not (0 < n_in <= MAX_FEATURES and 0 < n_out <= MAX_FEATURES):
                raise ModelSpecError(f"invalid Linear layer {_short(spec)}")
            linears.append((n_in, n_out, bias))
        elif type(kind) is str and kind in ACTIVATIONS:
            activations[position] = _activation(kind, spec.get("args") or {})
        else:
            raise ModelSpecError(f"unknown layer type {_short(kind)}")
    parameters = sum(n_out * (n_in + bias) for n_in, n_out, bias in linears)
    if parameters > MAX_PARAMETERS:
        raise ModelSpecError(f"the model has {parameters:,} parameters; the grader rebuilds models of at most "
                             f"{MAX_PARAMETERS:,}")
    return activations, linears


def _activation(kind: str, args: Any) -> nn.Module:
    if type(args) is not dict or set(args) - set(ACTIVATIONS[kind]) or not all(
            type(v) in (int, bool) or type(v) is float and math.isfinite(v) or type(v) is str and len(v) <= 32
            for v in args.values()):
        raise ModelSpecError(f"invalid arguments for {kind}: {_short(args)}")
    try:
        return getattr(nn, kind)(**args)
    except (TypeError, ValueError, AssertionError) as exc:  # e.g. Dropout(p=2): torch's message says why
        raise ModelSpecError(f"invalid arguments for {kind}: {_short(args)}: {exc}") from None


def _check_state(linears: list[tuple[int, int, bool]], state: Any) -> None:
    """`state` holds exactly the tensors the Linear layers have, in order: shapes, one floating dtype."""
    shapes = [shape for n_in, n_out, bias in linears for shape in [(n_out, n_in), (n_out,)][:1 + bias]]
    if type(state) is not list:
        raise ModelSpecError("the model's parameters are not a list of tensors")
    if len(state) != len(shapes):
        raise ModelSpecError(f"the model has {len(shapes)} parameter tensors but {len(state)} were sent")
    for value, shape in zip(state, shapes):
        if type(value) is not torch.Tensor or not value.is_floating_point() or value.layout != torch.strided \
                or value.device.type != "cpu":
            raise ModelSpecError("the model's parameters are not all floating-point tensors")
        if tuple(value.shape) != shape:
            raise ModelSpecError(f"a parameter has shape {tuple(value.shape)}, expected {shape}")
        if value.dtype != state[0].dtype:
            raise ModelSpecError(f"the model's parameters mix dtypes ({state[0].dtype} and {value.dtype})")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def rebuild(described: dict, probe: torch.Tensor | None = None, *, atol: float = 1e-5) -> nn.Sequential:
    """Trusted side: rebuild a described model and check it computes what the student's did.

    NaN parameters are data like any other, but NaN equals nothing: a model whose output on the
    probe is NaN cannot be shown to be the student's model, so it is refused."""
    if not isinstance(described, dict):
        raise ModelSpecError("the model description is not a dict")
    if type(described.get("state")) is not list:
        raise ModelSpecError("the model description has no list of parameters")
    model = build_standard(described.get("layers"), described["state"])
    if probe is not None:
        problem = _probe_mismatch(model, probe, described.get("probe_output"), atol)
        if problem:
            del model  # the exception's traceback keeps this frame alive: it must not keep the model
            raise ModelSpecError(problem)
    return model


def _probe_mismatch(model: nn.Sequential, probe: torch.Tensor, expected: Any, atol: float) -> str | None:
    """Why the rebuilt model's output on `probe` is not the student's model's output `expected`."""
    params = list(model.parameters())
    try:
        with torch.no_grad():
            got = model(probe.to(params[0].dtype if params else probe.dtype))
    # e.g. Linear sizes that do not chain (a forward of its own ran them), Flatten(start_dim="x")
    except (RuntimeError, IndexError, TypeError, ValueError):
        got = None
    if got is not None and got.isnan().any():
        nans = sum(int(p.isnan().sum()) for p in params)
        return (f"the model's output on the grader's input contains NaN"
                f"{f' ({nans} of its parameters are NaN)' if nans else ''}; a model that computes NaN "
                f"cannot be checked")
    if got is None or type(expected) is not torch.Tensor or expected.shape != got.shape or not torch.allclose(
            expected.to(got.dtype), got, atol=atol, rtol=1e-4):
        return ("the model's forward() does not compute its layers in order (a custom forward, a "
                "functional activation or a skip connection?); the grader can only judge models "
                "whose layers run one after the other")
    return None


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
