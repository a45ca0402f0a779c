"""The untrusted side: runs a student's notebook and answers the trusted side's questions.

Everything in this module runs inside the sandbox process, after the isolation layers are in
place (see `sandbox.py`). It executes the notebook's code cells with IPython's semantics, reports
each cell's outcome to the supervisor, captures figures as plain data, and then serves a small
RPC loop: the trusted test runner asks for values, calls of the student's functions, and models
described as architecture + parameters. Only plain data leaves (see `wire.py`); the verdicts are
computed on the other side.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import signal
import socket
import time
import traceback
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from IPython.core.interactiveshell import InteractiveShell  # noqa: E402
from torch import nn  # noqa: E402

from gradelab.hidden import plots  # noqa: E402

from gradelab.boundary import wire  # noqa: E402
from gradelab.boundary.modelspec import build_standard, describe_module, resolve_torch_arg  # noqa: E402

REFUSED_MAGICS = ("pip", "conda", "mamba", "sx", "system", "bash", "sh", "script", "perl", "ruby",
                  "python2", "python3", "pypy", "writefile", "load_ext", "run")


class CellTimeout(BaseException):
    """Raised by the per-cell alarm; a BaseException so that `except Exception` cannot swallow it."""


class RefusedCommand(Exception):
    """A shell escape or package install in a graded notebook."""


def make_shell() -> InteractiveShell:
    """An IPython shell with Jupyter's cell semantics and the grader's restrictions.

    Made once in the warm worker, so that every sandbox starts from a fork of a pristine shell.
    """
    shell = InteractiveShell.instance(colors="nocolor", autocall=0)

    def refuse(*_args, **_kwargs):
        raise RefusedCommand("shell commands (!, %pip, %%bash, ...) are not run by the grader; "
                             "install nothing and call no programs from a graded notebook")

    shell.system = shell.system_raw = shell.system_piped = shell.getoutput = refuse
    for name in REFUSED_MAGICS:
        shell.register_magic_function(refuse, "line", name)
        shell.register_magic_function(refuse, "cell", name)
    # Figures are captured after every cell (as the inline backend shows them); the backend stays Agg.
    shell.register_magic_function(lambda *_a, **_k: None, "line", "matplotlib")
    # The grader reports errors itself (`_error_info`: the student's frames only); IPython's verbose
    # traceback reads source files and walks sys.modules, 10-60 ms per failing cell, for text no one reads.
    shell.InteractiveTB.set_mode("Minimal")
    return shell


MAX_DRAWS = 1000  # models per module_draws request


def seed_everything(seed: int) -> None:
    # The CPU generator is all a sandbox uses; torch.manual_seed would also queue lazy CUDA/XPU/MTIA
    # seeding, which records a stack trace each time (~1 ms per cell or call, for nothing here).
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)


class _CappedText(io.TextIOBase):
    """A stdout/stderr replacement that keeps the first `limit` characters and counts the rest."""

    def __init__(self, limit: int):
        self.limit = limit
        self.parts: list[str] = []
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            text = str(text)
        room = self.limit - self.size
        if room > 0:
            self.parts.append(text[:room])
        self.size += len(text)
        return len(text)

    def value(self) -> str:
        kept = "".join(self.parts)
        if self.size > self.limit:
            kept += f"\n[... {self.size - self.limit} more characters of output not kept]"
        return kept


def _error_info(exc: BaseException) -> dict:
    """Type, message and the student's part of the traceback (frames from grader code dropped)."""
    # Cells compile to pseudo-files named "<ipython-input-...>"; grader frames are left out.
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith("<")]
    tb_text = "".join(traceback.format_list(frames[-5:]))
    # The course's template stubs say `raise NotImplemented`, which raises a TypeError.
    template_stub = isinstance(exc, TypeError) and ("NotImplemented" in str(exc) or (
        bool(frames) and "NotImplemented" in (frames[-1].line or "")))
    return {
        "type": type(exc).__name__,
        "message": str(exc)[:2000],
        "traceback": tb_text[:4000],
        "not_answered": isinstance(exc, NotImplementedError) or template_stub,
    }


class NotebookRunner:
    """Executes cells in the shell and keeps what the trusted side may ask about."""

    def __init__(self, shell: InteractiveShell, *, seed: int, cell_timeout: float, output_limit: int):
        self.shell = shell
        self.seed = seed
        self.cell_timeout = cell_timeout
        self.output_limit = output_limit
        self.figures: list[dict] = []
        self.sources: dict[int, str] = {}  # by cell index, for redrawing a cell's random values

    def run_cell(self, index: int, source: str) -> dict:
        """Run one cell; return its outcome (status ok/error/timeout/refused, output, error)."""
        self.sources[index] = source
        seed_everything(self.seed + index)
        out = _CappedText(self.output_limit)
        started = time.perf_counter()

        def on_alarm(_signum, _frame):
            raise CellTimeout(f"the cell ran longer than {self.cell_timeout:g} s")

        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, self.cell_timeout)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                result = self.shell.run_cell(source, store_history=False, silent=False)
            error = result.error_before_exec or result.error_in_exec
        except CellTimeout as exc:
            error = exc
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        seconds = time.perf_counter() - started
        render_seconds = self._capture_figures(index)
        # As in Jupyter, where the inline backend renders a cell's figures before the cell ends, the
        # rendering is part of running the cell (it also runs the draw code of the student's artists).
        outcome: dict[str, Any] = {"index": index, "status": "ok", "output": out.value(),
                                   "seconds": seconds + render_seconds, "render_seconds": render_seconds}
        if error is not None:
            outcome["error"] = _error_info(error)
            outcome["status"] = ("timeout" if isinstance(error, CellTimeout)
                                 else "refused" if isinstance(error, RefusedCommand) else "error")
        return outcome

    def _capture_figures(self, cell: int) -> float:
        """Capture the cell's figures as data (each with its PNG); return the seconds spent rendering."""
        render_seconds = 0.0
        names_by_figure: dict[int, list[str]] = {}
        for name, value in list(self.shell.user_ns.items()):
            if isinstance(value, matplotlib.figure.Figure) and not name.startswith("_"):
                names_by_figure.setdefault(id(value), []).append(name)
        for k, num in enumerate(plt.get_fignums()):
            fig = plt.figure(num)
            try:
                data, seconds = plots.capture_figure_timed(fig, cell=cell, index=k)
                render_seconds += seconds
            except Exception as exc:  # a figure that cannot be drawn is reported, not fatal
                data = {"cell": cell, "index": k, "error": f"{type(exc).__name__}: {exc}"[:500]}
            data["names"] = sorted(names_by_figure.get(id(fig), []))
            self.figures.append(data)
        plt.close("all")
        return render_seconds


# ------------------------------------------------------------------ RPC served to the test runner

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


def _safe_error_info(exc: BaseException) -> dict:
    """`_error_info`, also for an exception whose message or traceback the student made unreadable."""
    try:
        return _error_info(exc)
    except BaseException:  # noqa: BLE001 - e.g. a __str__ that raises
        return {"type": "Exception", "message": "(an exception whose message cannot be read)",
                "traceback": "", "not_answered": False}


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
                request = wire.recv_msg(self.sock, timeout=None)
            except (EOFError, OSError, wire.WireError):
                return
            wire.send_msg(self.sock, self.handle(request))

    def handle(self, request: dict) -> dict:
        op = request.get("op")
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            return {"ok": False, "error": {"type": "ProtocolError", "message": f"unknown op {op!r}"}}
        seed_everything(int(request.get("seed", self.runner.seed)))
        out = _CappedText(4096)
        started = time.perf_counter()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                value = handler(request)
            # How long the student's code ran: the supervisor reports grading time without it.
            wire.encode(value)  # fail here, with a message, rather than half-way through sending
            return {"ok": True, "value": value, "seconds": time.perf_counter() - started}
        except _Missing as exc:
            return {"ok": False, "error": {"type": "Missing", "message": str(exc), "missing": True}}
        except (wire.WireError, _NotCallable) as exc:
            return {"ok": False, "error": {"type": type(exc).__name__, "message": str(exc)}}
        except BaseException as exc:  # noqa: BLE001 - SystemExit, KeyboardInterrupt: the call fails, not the process
            # (Call deadlines are the trusted side's receive timeouts, never an exception raised here.)
            return {"ok": False, "error": _safe_error_info(exc)}

    def _args(self, request: dict) -> tuple[list, dict]:
        args = [resolve_torch_arg(a) for a in request.get("args", [])]
        kwargs = {k: resolve_torch_arg(v) for k, v in request.get("kwargs", {}).items()}
        return args, kwargs

    def op_ping(self, request: dict) -> str:
        return "pong"

    def op_kinds(self, request: dict) -> dict:
        """What each requested name is in the notebook: missing, function, class, module, tensor, value."""
        kinds = {}
        for name in request["names"]:
            value = self.ns.get(name, _Missing)
            kinds[name] = ("missing" if value is _Missing else "class" if isinstance(value, type)
                           else "module" if isinstance(value, nn.Module)
                           else "function" if callable(value)
                           else "tensor" if isinstance(value, torch.Tensor) else type(value).__name__)
        return kinds

    def op_get(self, request: dict) -> Any:
        return _plain(_lookup(self.ns, request["name"]))

    def op_call(self, request: dict) -> Any:
        fn = _lookup_callable(self.ns, request["name"])
        args, kwargs = self._args(request)
        return _plain(_call_with_activation_fallback(fn, args, kwargs))

    def op_call_grad(self, request: dict) -> dict:
        """Call fn(x) with x tracking gradients; return the value and d(sum of value)/dx."""
        fn = _lookup_callable(self.ns, request["name"])
        x = resolve_torch_arg(request["args"][0]).clone().requires_grad_(True)
        y = fn(x)
        if not isinstance(y, torch.Tensor):
            return {"value": _plain(y), "grad": None, "tracks_grad": False}
        tracks = y.requires_grad
        if tracks:
            y.sum().backward()
        return {"value": y.detach(), "grad": None if x.grad is None else x.grad.detach(), "tracks_grad": tracks}

    def op_describe(self, request: dict) -> dict:
        """Describe a model the notebook holds in a variable (e.g. `model_sig`)."""
        return describe_module(_lookup(self.ns, request["name"]), resolve_torch_arg(request.get("probe")))

    def op_module(self, request: dict) -> dict:
        """Call a function that returns a model; describe the model (architecture + parameters)."""
        fn = _lookup_callable(self.ns, request["name"])
        args, kwargs = self._args(request)
        model = _call_with_activation_fallback(fn, args, kwargs)
        return describe_module(model, resolve_torch_arg(request.get("probe")))

    def op_module_draws(self, request: dict) -> list[list[torch.Tensor]]:
        """Call a model-building function once per seed (torch seeded with it); return each
        model's parameters. One round trip for the many draws a distribution is judged on."""
        fn = _lookup_callable(self.ns, request["name"])
        args, kwargs = self._args(request)
        draws = []
        for seed in request["seeds"][:MAX_DRAWS]:
            seed_everything(int(seed))
            draws.append(describe_module(_call_with_activation_fallback(fn, args, kwargs), None)["state"])
        return draws

    def op_redraw(self, request: dict) -> list[list[Any]]:
        """Run a notebook cell again once per seed (torch seeded with it), each time in a shallow
        copy of the namespace, and return the values of the requested names after each run: more
        draws of values that a cell makes at random. The notebook's own variables keep their values
        (and stay consistent with each other, e.g. c computed from the original A and b)."""
        index = int(request["cell"])
        if index not in self.runner.sources:
            raise ValueError(f"cell {index} was not run")
        code = compile(self.runner.shell.transform_cell(self.runner.sources[index]), f"<redrawn cell {index}>", "exec")
        draws = []
        for seed in request["seeds"][:MAX_DRAWS]:
            seed_everything(int(seed))
            namespace = dict(self.ns)
            exec(code, namespace)  # noqa: S102 - the student's own cell, inside the sandbox
            draws.append([_plain(_lookup(namespace, name)) for name in request["names"]])
        return draws

    def op_apply(self, request: dict) -> dict:
        """Build a standard model from a spec, apply the student's callable (class instance, or
        function of the model), and describe the result."""
        model = build_standard(request["spec"], request.get("state"))
        target = _lookup_callable(self.ns, request["name"])
        args, kwargs = self._args(request)
        if request.get("mode") == "apply":  # model.apply(Target(*args))
            visit = target(*args, **kwargs)
            if not callable(visit):
                called = f"{request['name']}({', '.join(repr(a) for a in args)[:100]})"
                raise _NotCallable(f"`{called}` gave {wire.describe_value(visit)}, which model.apply() cannot call "
                                   f"on each module: it should be a class whose instances are called with a "
                                   f"module (a __call__(self, module) method)")
            model.apply(visit)
        else:  # target(model, *args)
            returned = target(model, *args, **kwargs)
            if isinstance(returned, nn.Module):
                model = returned
        return describe_module(model, resolve_torch_arg(request.get("probe")))

    def op_call_on_model(self, request: dict) -> Any:
        """Call fn(model, *args) on a standard model built from a spec; return the plain result."""
        model = build_standard(request["spec"], request.get("state"))
        fn = _lookup_callable(self.ns, request["name"])
        args, kwargs = self._args(request)
        return _plain(fn(model, *args, **kwargs))


def _plain(value: Any) -> Any:
    """Detach tensors so autograd graphs never reach the encoder; everything else is sent as is
    (the encoder refuses what is not plain data, with a message)."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    return value


def sandbox_main(cells: list[tuple[int, str]], *, ctl: socket.socket, rpc: socket.socket,
                 shell: InteractiveShell, seed: int, cell_timeout: float, output_limit: int) -> int:
    """Entry point of the sandbox process: execute, report to the supervisor, then serve RPC."""
    # The student's code may print or close fds 1/2; the grader never reads them.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    plots.install_recorders()
    runner = NotebookRunner(shell, seed=seed, cell_timeout=cell_timeout, output_limit=output_limit)
    for index, source in cells:
        wire.send_msg(ctl, {"event": "cell_start", "index": index})
        outcome = runner.run_cell(index, source)
        wire.send_msg(ctl, {"event": "cell_end", **outcome})
    figures = []
    for fig in runner.figures:
        try:
            wire.encode(fig)
            figures.append(fig)
        except wire.WireError as exc:
            figures.append({"cell": fig.get("cell"), "index": fig.get("index"), "error": str(exc)})
    wire.send_msg(ctl, {"event": "ready", "figures": figures})
    ctl.close()
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    RpcServer(runner, rpc).serve()
    return 0


