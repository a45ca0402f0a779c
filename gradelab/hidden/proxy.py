"""The `student` fixture's proxy: what a hidden test may ask of the sandboxed submission.

Requests go to the sandbox over the RPC socket and the replies are decoded as plain data
(`boundary/wire.py`): numbers, strings, tensors rebuilt from raw bytes, model descriptions.
Nothing the student wrote runs in this process, and no method of a student object is ever
called here. A failing request raises a StudentProblem, whose message is for the student.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

import torch

from gradelab.boundary import messages, modelspec
from gradelab.boundary.messages import (CALL_OPS, ApplyRequest, CallGradRequest, CallOnModelRequest, CallRequest,
                                        DeathReply, DeathRequest, DescribeRequest, GetRequest, KindsRequest,
                                        ModuleDrawsRequest, ModuleRequest, RedrawRequest, RestartReply,
                                        RestartRequest, RpcError, RpcRequest)
from gradelab.boundary.records import TestStatus

# ------------------------------------------------------------------ what a failing call tells the student


class StudentProblem(Exception):
    """A problem with the submission, with a message for the student."""

    status: TestStatus = "failed"


class NotAnswered(StudentProblem):
    status = "not_answered"


class StudentError(StudentProblem):
    """The student's code raised an exception when the hidden test called it."""


class StudentTimeout(StudentProblem):
    status = "timeout"


class SandboxLost(StudentProblem):
    status = "error"


# ------------------------------------------------------------------ the proxy


@dataclass
class SandboxLink:
    """The connection to the sandbox, which the supervisor can replace after a crash or timeout."""

    rpc: socket.socket
    control: socket.socket | None
    call_timeout: float
    restarts: int = 0
    student_seconds: float = 0.0  # time the sandbox reports spending in the student's code
    call_timeouts: int = 0  # requests given up at call_timeout
    lost: str | None = None  # why there is no sandbox to ask (then every request fails with this)
    # The first reply that was not one a sandbox running gradelab's code can send: the submission
    # tampered with the sandbox, and the supervisor rejects it as a whole.
    malformed: str | None = None

    def restart(self) -> None:
        """Ask the supervisor for a fresh sandbox (it re-executes the notebook) and take its socket."""
        if self.lost is None and self.control is None:
            self.lost = "the student's process stopped and cannot be restarted"
        if self.lost is not None:
            raise SandboxLost(self.lost)
        self.rpc.close()
        messages.send(self.control, RestartRequest(op="restart"))
        reply = messages.receive(self.control, RestartReply, timeout=None)
        if not reply.ok:
            self.lost = reply.message or "the student's process could not be restarted"
            raise SandboxLost(self.lost)
        _, fds, _, _ = socket.recv_fds(self.control, 16, 1)
        self.rpc = socket.socket(fileno=fds[0])
        self.restarts += 1

    def death_cause(self) -> str:
        """How the sandbox that just stopped answering ended, as the supervisor saw it: "exit
        status 0", "killed by SIGSEGV", "out of memory, limit 2048 MB", ..."""
        if self.control is None:
            return "no exit status known"
        messages.send(self.control, DeathRequest(op="death"))
        return messages.receive(self.control, DeathReply, timeout=None).why[:200]


class StudentProxy:
    """What a hidden test may ask of the submission. Every reply is plain, validated data."""

    def __init__(self, link: SandboxLink, seed: int):
        self._link = link
        self._seed = seed
        self._broken = False  # the current sandbox died or hung; restart before the next request
        # Names whose request hung or ended the process: they fail at once in later tests, with no
        # restart, so a broken function costs only the tests that use it, and restarts stay bounded
        # by the number of names the hidden tests ask for.
        self._remembered: dict[str | None, StudentProblem] = {}

    def _request(self, request: RpcRequest) -> Any:
        name = getattr(request, "name", None)
        if name in self._remembered:
            raise self._remembered[name]
        if self._broken or self._link.lost is not None:
            self._link.restart()
            self._broken = False
        try:
            messages.send(self._link.rpc, request)
            reply = messages.receive(self._link.rpc, messages.RPC_REPLY, timeout=self._link.call_timeout,
                                     max_bytes=messages.MAX_REPLY_BYTES)
        except TimeoutError:
            self._link.student_seconds += self._link.call_timeout
            self._link.call_timeouts += 1
            problem: StudentProblem = StudentTimeout(f"{_subject(name)} did not return within "
                                                     f"{self._link.call_timeout:g} s")
            self._remember(name, StudentTimeout(f"{problem} in an earlier test"))
            raise problem from None
        except messages.MalformedMessage as exc:
            self._link.malformed = self._link.malformed or f"a reply about {_subject(name)}: {exc}"
            problem = StudentError(f"the reply about {_subject(name)} could not be read: {exc}")
            self._remember(name, problem)
            raise problem from None
        except (EOFError, OSError):
            cause = self._link.death_cause()
            ended = (f"{_subject(name)} ended the student's process when called" if request.op in CALL_OPS
                     else f"the student's process ended while the grader was reading {_subject(name)}")
            problem = StudentError(f"{ended} ({cause})")
            self._remember(name, problem)
            raise problem from None
        self._link.student_seconds += min(reply.seconds, self._link.call_timeout)
        if reply.ok:
            return reply.value
        raise _problem_from(reply.error, name, request.op)

    def _remember(self, name: str | None, later: StudentProblem) -> None:
        """The sandbox is unusable after a request for `name` hung or ended it: restart it before the
        next request, and fail later requests for `name` with `later` without asking again."""
        self._broken = True
        self._remembered[name] = later

    def kinds(self, *names: str) -> dict[str, str]:
        return self._request(KindsRequest(op="kinds", seed=self._seed, names=list(names)))

    def get(self, name: str) -> Any:
        return self._request(GetRequest(op="get", seed=self._seed, name=name))

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self._request(CallRequest(op="call", seed=self._seed, name=name, args=list(args), kwargs=kwargs))

    def call_grad(self, name: str, x: torch.Tensor) -> dict:
        """fn(x) with x tracking gradients: {"value", "grad", "tracks_grad"}."""
        reply = self._request(CallGradRequest(op="call_grad", seed=self._seed, name=name, args=[x]))
        if (type(reply) is not dict or set(reply) != {"value", "grad", "tracks_grad"}
                or type(reply["tracks_grad"]) is not bool
                or reply["grad"] is not None and type(reply["grad"]) is not torch.Tensor):
            raise StudentError(f"the student's process sent a malformed reply about `{name}`")
        return reply

    def module(self, name: str, *args: Any, probe: torch.Tensor, seed: int | None = None,
               **kwargs: Any) -> tuple[torch.nn.Sequential, dict]:
        """Call a model-building function (torch seeded with `seed`); return the rebuilt model
        and its description."""
        described = self._request(ModuleRequest(op="module", seed=self._seed if seed is None else seed, name=name,
                                                args=list(args), kwargs=kwargs, probe=probe))
        return _rebuild(described, probe, name)

    def module_draws(self, name: str, *args: Any, seeds: list[int], **kwargs: Any) -> list[list[torch.Tensor]]:
        """Call a model-building function once per seed (torch seeded with it); the parameters of
        each model, in one round trip. For distributions: the architecture is judged by `module`."""
        draws = self._request(ModuleDrawsRequest(op="module_draws", seed=self._seed, name=name, args=list(args),
                                                 kwargs=kwargs, seeds=list(seeds)))
        if (type(draws) is not list or len(draws) != len(seeds)
                or not all(type(d) is list and all(type(t) is torch.Tensor for t in d) for d in draws)):
            raise StudentError(f"the models from `{name}` could not be read")
        return draws

    def redraw(self, cell: int, names: list[str], *, seeds: list[int]) -> list[list[Any]]:
        """Run the notebook's cell `cell` (an index from `executed_cells`) again once per seed,
        torch seeded with it, in a copy of the notebook's namespace; the values of `names` after
        each run. More draws of the values a cell makes at random; the notebook keeps its own."""
        draws = self._request(RedrawRequest(op="redraw", seed=self._seed, cell=cell, names=list(names),
                                            seeds=list(seeds)))
        if (type(draws) is not list or len(draws) != len(seeds)
                or not all(type(d) is list and len(d) == len(names) for d in draws)):
            raise StudentError(f"the values of {', '.join(names)} from cell {cell} could not be read")
        return draws

    def model(self, name: str, *, probe: torch.Tensor) -> tuple[torch.nn.Sequential, dict]:
        """The model held in the notebook variable `name`, rebuilt here."""
        return _rebuild(self._request(DescribeRequest(op="describe", seed=self._seed, name=name, probe=probe)),
                        probe, name)

    def apply(self, name: str, model: torch.nn.Sequential, *args: Any, probe: torch.Tensor,
              mode: str = "apply") -> tuple[torch.nn.Sequential, dict]:
        """Let the student's `name` change a standard model: `model.apply(name(*args))` (mode
        "apply") or `name(model, *args)` (mode "call"). Returns the changed model, rebuilt here."""
        layers, state = describe_standard(model)
        described = self._request(ApplyRequest(op="apply", seed=self._seed, name=name, spec=layers, state=state,
                                               args=list(args), mode=mode, probe=probe))
        return _rebuild(described, probe, name)

    def call_on_model(self, name: str, model: torch.nn.Sequential, *args: Any) -> Any:
        layers, state = describe_standard(model)
        return self._request(CallOnModelRequest(op="call_on_model", seed=self._seed, name=name, spec=layers,
                                                state=state, args=list(args)))


def describe_standard(model: torch.nn.Sequential) -> tuple[list[dict], list[torch.Tensor]]:
    """Architecture and parameters of a model made of standard layers, built on this side."""
    described = modelspec.describe_module(model, None)
    return described["layers"], described["state"]


def _rebuild(described: Any, probe: torch.Tensor, name: str) -> tuple[torch.nn.Sequential, dict]:
    try:
        return modelspec.rebuild(described, probe), described
    except modelspec.ModelSpecError as exc:
        raise StudentError(f"the model from `{name}` cannot be checked: {exc}") from None


# What the student should know about an exception that is not an error in the usual sense.
_EXCEPTION_HINTS = {
    "SystemExit": "exit(), quit() and sys.exit() end a program: a graded function must return its result",
    "KeyboardInterrupt": "a graded function must not interrupt itself",
}


def _subject(name: str | None) -> str:
    return f"`{name}`" if name else "the notebook"


def _problem_from(error: RpcError, name: str | None, op: str = "call") -> StudentProblem:
    kind, message = error.type[:100], error.message[:1500]
    if error.missing:
        return NotAnswered(f"`{message}` is not defined: the cell that defines it is not answered yet, "
                           f"failed to run, is missing, or the name was changed")
    if error.not_answered:
        return NotAnswered(f"`{name}` is not answered yet (it raises {kind})")
    if kind == "ModelSpecError":
        return StudentError(f"`{name}`: {message}")
    if kind == "_NotCallable":  # the executor's own words about the value
        return StudentError(message)
    if kind == "WireError":
        return StudentError(f"{_subject(name)} {'returned' if op in CALL_OPS else 'holds'} a value the "
                            f"grader cannot receive: {message}")
    raised = f"{_subject(name)} raised {kind}" + (" when called" if op in CALL_OPS else "")
    hint = _EXCEPTION_HINTS.get(kind)
    return StudentError(raised + (f": {message}" if message else "") + (f" ({hint})" if hint else ""))
