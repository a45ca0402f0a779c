"""The RPC server of the sandbox S, run once the notebook's cells have: the trusted test runner asks
for values, calls of the student's functions, and models described as architecture + parameters.
Only plain data leaves (gradelab.boundary.wire); the verdicts are computed on the other side.
"""

from __future__ import annotations

import contextlib
import socket
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradelab.boundary import messages, wire
from gradelab.boundary.messages import (ApplyRequest, CallGradRequest, CallOnModelRequest, CallRequest,
                                        DescribeRequest, GetRequest, KindsRequest, ModuleDrawsRequest,
                                        ModuleRequest, RedrawRequest, RpcError, RpcReply, RpcRequest)
from gradelab.boundary.modelspec import build_standard, describe_module, resolve_torch_arg
from gradelab.sandbox.running import CappedText, safe_error_info, seed_everything

if TYPE_CHECKING:
    from gradelab.sandbox.executor import NotebookRunner


class _Missing(Exception):
    pass


class _NotCallable(Exception):
    """A graded name that should be a function or class holds something else."""


def _lookup(ns: dict, name: str) -> Any:
    if name not in ns:
        raise _Missing(name)
    return ns[name]


def _lookup_callable(ns: dict, name: str) -> Any:
    value = _lookup(ns, name)
    if not callable(value):
        raise _NotCallable(f"`{name}` should be a function or a class, but it is {wire.describe_value(value)}")
    return value


def _call_with_activation_fallback(fn, args: list, kwargs: dict):
    """Call `fn`; if it fails with a TypeError and an activation instance was passed, try the class.

    Students may write `build_model(activation)` expecting an instance (the template's default)
    or a class (`nn.Sigmoid`); both are correct answers.
    """
    try:
        return fn(*args, **kwargs)
    except TypeError:
        swapped = [type(a) if isinstance(a, nn.Module) else a for a in args]
        if swapped == args:
            raise
        return fn(*swapped, **kwargs)


class RpcServer:
    """Answers the trusted side's requests, one at a time, with plain data."""

    def __init__(self, runner: NotebookRunner, sock: socket.socket):
        self.runner = runner
        self.sock = sock
        self.ns = runner.shell.user_ns

    def serve(self) -> None:
        while True:
            try:
                raw = wire.recv_msg(self.sock, timeout=None)
            except (EOFError, OSError, wire.WireError):
                return
            try:
                reply = self.handle(messages.validate(raw, messages.RPC_REQUEST))
            except messages.MalformedMessage as exc:
                reply = RpcReply(ok=False, error=RpcError(type="ProtocolError", message=str(exc)))
            messages.send(self.sock, reply)

    def handle(self, request: RpcRequest) -> RpcReply:
        seed_everything(request.seed)
        out = CappedText(4096)
        started = time.perf_counter()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                value = getattr(self, f"op_{request.op}")(request)
            wire.encode(value)  # fail here, with a message, rather than half-way through sending
            # How long the student's code ran: the supervisor reports grading time without it.
            return RpcReply(ok=True, value=value, seconds=time.perf_counter() - started)
        except _Missing as exc:
            return RpcReply(ok=False, error=RpcError(type="Missing", message=str(exc), missing=True))
        except (wire.WireError, _NotCallable) as exc:
            return RpcReply(ok=False, error=RpcError(type=type(exc).__name__, message=str(exc)[:2000]))
        except BaseException as exc:  # noqa: BLE001 - SystemExit, KeyboardInterrupt: the call fails, not the process
            # (Call deadlines are the trusted side's receive timeouts, never an exception raised here.)
            return RpcReply(ok=False, error=RpcError(**safe_error_info(exc)))

    def _args(self, request) -> tuple[list, dict]:
        args = [resolve_torch_arg(a) for a in request.args]
        kwargs = {k: resolve_torch_arg(v) for k, v in request.kwargs.items()}
        return args, kwargs

    def op_kinds(self, request: KindsRequest) -> dict:
        """What each requested name is in the notebook: missing, function, class, module, tensor, value."""
        kinds = {}
        for name in request.names:
            value = self.ns.get(name, _Missing)
            kinds[name] = ("missing" if value is _Missing else "class" if isinstance(value, type)
                           else "module" if isinstance(value, nn.Module)
                           else "function" if callable(value)
                           else "tensor" if isinstance(value, torch.Tensor) else type(value).__name__)
        return kinds

    def op_get(self, request: GetRequest) -> Any:
        return _plain(_lookup(self.ns, request.name))

    def op_call(self, request: CallRequest) -> Any:
        fn = _lookup_callable(self.ns, request.name)
        args, kwargs = self._args(request)
        return _plain(_call_with_activation_fallback(fn, args, kwargs))

    def op_call_grad(self, request: CallGradRequest) -> dict:
        """Call fn(x) with x tracking gradients; return the value and d(sum of value)/dx."""
        fn = _lookup_callable(self.ns, request.name)
        x = resolve_torch_arg(request.args[0]).clone().requires_grad_(True)
        y = fn(x)
        if not isinstance(y, torch.Tensor):
            return {"value": _plain(y), "grad": None, "tracks_grad": False}
        tracks = y.requires_grad
        if tracks:
            y.sum().backward()
        return {"value": y.detach(), "grad": None if x.grad is None else x.grad.detach(), "tracks_grad": tracks}

    def op_describe(self, request: DescribeRequest) -> dict:
        """Describe a model the notebook holds in a variable (e.g. `model_sig`)."""
        return describe_module(_lookup(self.ns, request.name), resolve_torch_arg(request.probe))

    def op_module(self, request: ModuleRequest) -> dict:
        """Call a function that returns a model; describe the model (architecture + parameters)."""
        fn = _lookup_callable(self.ns, request.name)
        args, kwargs = self._args(request)
        model = _call_with_activation_fallback(fn, args, kwargs)
        return describe_module(model, resolve_torch_arg(request.probe))

    def op_module_draws(self, request: ModuleDrawsRequest) -> list[list[torch.Tensor]]:
        """Call a model-building function once per seed (torch seeded with it); return each
        model's parameters. One round trip for the many draws a distribution is judged on."""
        fn = _lookup_callable(self.ns, request.name)
        args, kwargs = self._args(request)
        draws = []
        for seed in request.seeds:
            seed_everything(seed)
            draws.append(describe_module(_call_with_activation_fallback(fn, args, kwargs), None)["state"])
        return draws

    def op_redraw(self, request: RedrawRequest) -> list[list[Any]]:
        """Run a notebook cell again once per seed (torch seeded with it), each time in a shallow
        copy of the namespace, and return the values of the requested names after each run: more
        draws of values that a cell makes at random. The notebook's own variables keep their values
        (and stay consistent with each other, e.g. c computed from the original A and b)."""
        index = request.cell
        if index not in self.runner.sources:
            raise ValueError(f"cell {index} was not run")
        code = compile(self.runner.shell.transform_cell(self.runner.sources[index]), f"<redrawn cell {index}>", "exec")
        draws = []
        for seed in request.seeds:
            seed_everything(seed)
            namespace = dict(self.ns)
            exec(code, namespace)  # noqa: S102 - the student's own cell, inside the sandbox
            draws.append([_plain(_lookup(namespace, name)) for name in request.names])
        return draws

    def op_apply(self, request: ApplyRequest) -> dict:
        """Build a standard model from a spec, apply the student's callable (class instance, or
        function of the model), and describe the result."""
        model = build_standard(request.spec, request.state)
        target = _lookup_callable(self.ns, request.name)
        args, kwargs = self._args(request)
        if request.mode == "apply":  # model.apply(Target(*args))
            visit = target(*args, **kwargs)
            if not callable(visit):
                called = f"{request.name}({', '.join(repr(a) for a in args)[:100]})"
                raise _NotCallable(f"`{called}` gave {wire.describe_value(visit)}, which model.apply() cannot call "
                                   f"on each module: it should be a class whose instances are called with a "
                                   f"module (a __call__(self, module) method)")
            model.apply(visit)
        else:  # target(model, *args)
            returned = target(model, *args, **kwargs)
            if isinstance(returned, nn.Module):
                model = returned
        return describe_module(model, resolve_torch_arg(request.probe))

    def op_call_on_model(self, request: CallOnModelRequest) -> Any:
        """Call fn(model, *args) on a standard model built from a spec; return the plain result."""
        model = build_standard(request.spec, request.state)
        fn = _lookup_callable(self.ns, request.name)
        args, kwargs = self._args(request)
        return _plain(fn(model, *args, **kwargs))


def _plain(value: Any) -> Any:
    """Detach tensors so autograd graphs never reach the encoder; everything else is sent as is
    (the encoder refuses what is not plain data, with a message)."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    return value
