"""Public checks: quick feedback on your answers, before you submit.

In the notebook, `check("q1_2")` checks one question and shows a one-line summary: passed, not
answered yet, or what to fix. `check_all()` shows the table of every question. If you know
otter-grader, its spelling works too: `grader = Notebook()`, `grader.check("q1_2")`,
`grader.check_all()`.

From a terminal, in the folder of the notebook (with this file and vanishing_helpers.py beside it):

    python public_checks.py vanishing_gradients.ipynb

runs the notebook top to bottom in a fresh Jupyter kernel, as JupyterLab's "Restart Kernel and
Run All Cells" does but going on past a cell that fails, and prints the same table. Exit status:
0 when every cell ran and every public check passed, 1 otherwise, 2 when the notebook could not
be run at all.

These checks are few and simple, and run your code in your own kernel. After you submit, the
hidden tests grade every question again, with other inputs, in a separate process.
"""

from __future__ import annotations

import argparse
import html
import inspect
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib.figure
import torch
from torch import nn

__all__ = ["check", "check_all", "Notebook", "CheckResult", "CheckTable"]

PASSED, FAILED, NOT_ANSWERED = "passed", "failed", "not answered"
HIDDEN_TESTS_NOTE = "The hidden tests check more, with other inputs, after you submit."


class PublicCheckFailed(AssertionError):
    """A public check found a problem; the message says what to fix."""


class NotAnsweredYet(PublicCheckFailed):
    """The answer still raises NotImplementedError or is missing."""


def _need(ns: dict, name: str):
    if name not in ns:
        raise NotAnsweredYet(f"`{name}` is not defined: run the cell that defines it (or write it)")
    return ns[name]


def _ensure(condition: bool, message: str) -> None:
    if not condition:
        raise PublicCheckFailed(message)


def _call(fn, *args):
    try:
        return fn(*args)
    except NotImplementedError as exc:
        raise NotAnsweredYet(f"`{getattr(fn, '__name__', fn)}` is not answered yet") from exc


def _linear_layers(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _check_q1_1(ns):
    x, y, z = _need(ns, "x"), _need(ns, "y"), _need(ns, "z")
    _ensure(all(isinstance(v, torch.Tensor) for v in (x, y, z)), "x, y and z must be torch tensors")
    _ensure(float(z) == 21.0, f"z should be x * y = 21, got {float(z)}")
    A, b, c = _need(ns, "A"), _need(ns, "b"), _need(ns, "c")
    _ensure(tuple(A.shape) == (3, 3), f"A must have shape (3, 3), got {tuple(A.shape)}")
    _ensure(tuple(b.shape) == (3, 1), f"b must be a column vector of shape (3, 1), got {tuple(b.shape)}")
    _ensure(bool(((A >= -1) & (A <= 1)).all()), "A's values must lie in [-1, 1]")
    _ensure(tuple(c.shape) == (3, 1), f"c must have shape (3, 1), got {tuple(c.shape)}: is d a column vector?")
    return "x, y, z, A, b and c have the right types and shapes"


def _check_q1_2(ns):
    sig, grad = _need(ns, "my_sigmoid"), _need(ns, "my_sigmoid_grad")
    x = torch.tensor([-2.0, 0.0, 3.0], dtype=torch.float64)
    a = _call(sig, x)
    _ensure(isinstance(a, torch.Tensor), f"my_sigmoid must return a tensor, got {type(a).__name__}")
    _ensure(torch.allclose(a, torch.sigmoid(x)), "my_sigmoid(x) does not match 1 / (1 + exp(-x))")
    g = _call(grad, a)
    _ensure(isinstance(g, torch.Tensor), f"my_sigmoid_grad must return a tensor, got {type(g).__name__}")
    _ensure(torch.allclose(g, a * (1 - a)),
            "my_sigmoid_grad(a) should be a * (1 - a): it receives the activation, not x")
    return "my_sigmoid and my_sigmoid_grad give the right values"


def _check_q1_3(ns):
    pg, x = _need(ns, "pytorch_gradients"), _need(ns, "x")
    _ensure(isinstance(pg, torch.Tensor), "pytorch_gradients must be a tensor (x.grad after backward())")
    _ensure(pg.shape == x.shape, f"pytorch_gradients must have the shape of x {tuple(x.shape)}, got {tuple(pg.shape)}")
    s = torch.sigmoid(x.detach().to(torch.float64))
    _ensure(torch.allclose(pg.detach().to(torch.float64), s * (1 - s), atol=1e-6),
            "pytorch_gradients does not match the derivative of the sigmoid at x")
    return "autograd gradients match the sigmoid's derivative"


def _build(ns, name, activation):
    fn = _need(ns, name)
    model = _call(fn, activation)
    _ensure(isinstance(model, nn.Module), f"{name} must return an nn.Module, got {type(model).__name__}")
    return model


def _check_q1_4(ns):
    model = _build(ns, "build_model", nn.Sigmoid())
    linears = _linear_layers(model)
    shapes = [(l.in_features, l.out_features) for l in linears]
    _ensure(shapes == [(2, 2)] * 4, f"expected four Linear(2, 2) layers (2-2-2-2-2), found {shapes}")
    out = model(torch.zeros(5, 2))
    _ensure(tuple(out.shape) == (5, 2), f"the model's output for 5 inputs should be (5, 2), got {tuple(out.shape)}")
    weights = torch.cat([l.weight.detach().flatten() for l in linears])
    _ensure(bool((weights.abs() <= 1).all()), "weights must lie in [-1, 1]")
    _ensure(bool((weights < 0).any()), "no weight is negative: nn.init.uniform_ defaults to [0, 1]; pass a=-1, b=1")
    return "build_model gives a 2-2-2-2-2 network with weights in [-1, 1]"


def _figure(ns, name):
    fig = _need(ns, name)
    _ensure(isinstance(fig, matplotlib.figure.Figure), f"{name} must be the Figure that plot_grad returns")
    _ensure(len(fig.axes) > 0 and len(fig.axes[0].collections) > 0, f"{name} has no violins")
    return fig


def _check_plot(model_name, fig_name):
    def run(ns):
        _need(ns, model_name)
        _figure(ns, fig_name)
        return f"{fig_name} shows the gradients of {model_name}"
    return run


def _check_q2_8(ns):
    model = _build(ns, "build_model_glorot", nn.Tanh())
    _ensure([(l.in_features, l.out_features) for l in _linear_layers(model)] == [(2, 2)] * 4,
            "build_model_glorot must build the same 2-2-2-2-2 network")
    for name in ("fig2_sig", "fig2_tanh", "fig2_relu"):
        _figure(ns, name)
    return "build_model_glorot builds the network and the three figures exist"


def _check_q3_1(ns):
    deep = _need(ns, "deep_network")
    model = _call(deep, 4, nn.Sigmoid())
    shapes = [(l.in_features, l.out_features) for l in _linear_layers(model)]
    _ensure(shapes == [(10, 5)] + [(5, 5)] * 3, f"deep_network(4, ...) should have Linear layers 10-5-5-5-5, got {shapes}")
    killed = _call(_need(ns, "kill_gradients"), deep(7, nn.Sigmoid()))
    _ensure(isinstance(killed, nn.Module), "kill_gradients must return the model")
    gradient_print = _need(ns, "gradient_print")
    first = gradient_print(killed, verbose=False)[0].abs().max().item()
    _ensure(first < 1e-8, f"after kill_gradients the first layer's largest gradient is {first:.2e}, not ~0")
    for name in ("sigmoid_depth_without_initializer", "tanh_depth_without_initializer"):
        value = _need(ns, name)
        _ensure(isinstance(value, int) and 2 <= value <= 25, f"{name} should be a depth between 2 and 25")
    return "deep_network, kill_gradients and the depths look right"


def _check_q3_2(ns):
    cls = _need(ns, "NegativeInitializer")
    model = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 5))
    _call(model.apply, _call(cls, 2))
    negative = [bool((l.weight < 0).all()) for l in _linear_layers(model)]
    _ensure(any(negative), "NegativeInitializer(2) made no layer's weights all negative")
    return "NegativeInitializer makes a layer's weights negative"


def _check_q3_3(ns):
    model = _call(_need(ns, "make_xor_model"))
    _ensure(isinstance(model, nn.Module), "make_xor_model must return an nn.Module")
    out = model(torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]))
    _ensure(out.numel() == 4, f"the model must output one logit per input, got shape {tuple(out.shape)}")
    result = _need(ns, "xor_result")
    _ensure(bool(result.solved), "xor_problem(make_xor_model()) did not classify all four points correctly")
    return "make_xor_model solves XOR for seed 0 (the hidden tests try other seeds)"


def _check_qb_1(ns):
    model = _call(_need(ns, "he_init_"), nn.Sequential(nn.Linear(400, 400)), 0.0)
    std = model[0].weight.std().item()
    _ensure(abs(std - math.sqrt(2 / 400)) < 0.01, f"weight std {std:.4f}, expected about sqrt(2/400) = 0.0707")
    return "he_init_ gives the He standard deviation"


def _check_qb_2(ns):
    fn = _need(ns, "saturation_fraction")
    model = nn.Sequential(nn.Linear(1, 1), nn.Tanh())
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.fill_(0.0)
    value = _call(fn, model, torch.tensor([[0.0], [10.0]]))
    _ensure(isinstance(value, float), f"saturation_fraction must return a float, got {type(value).__name__}")
    _ensure(abs(value - 0.5) < 1e-9, f"half of these tanh outputs are saturated; got {value}")
    return "saturation_fraction counts saturated tanh units"


def _check_qb_3(ns):
    value = _call(_need(ns, "expected_initial_loss"), 10)
    _ensure(abs(float(value) - math.log(10)) < 1e-9, f"for 10 classes expected ln(10) = {math.log(10):.4f}, got {value}")
    return "expected_initial_loss is ln(C)"


_CHECKS = {
    "q1_1": _check_q1_1,
    "q1_2": _check_q1_2,
    "q1_3": _check_q1_3,
    "q1_4": _check_q1_4,
    "q2_2": _check_plot("model_sig", "fig_sig"),
    "q2_4": _check_plot("model_tanh", "fig_tanh"),
    "q2_6": _check_plot("model_relu", "fig_relu"),
    "q2_8": _check_q2_8,
    "q3_1": _check_q3_1,
    "q3_2": _check_q3_2,
    "q3_3": _check_q3_3,
    "qb_1": _check_qb_1,
    "qb_2": _check_qb_2,
    "qb_3": _check_qb_3,
}


# ------------------------------------------------------------------ results, as Jupyter shows them


_COLOURS = {PASSED: "#1a7f37", FAILED: "#cf222e", NOT_ANSWERED: "#9a6700"}


@dataclass(frozen=True)
class CheckResult:
    """One question's public check. Jupyter shows it as a one-line summary, never a traceback.

    `passed_all`, `name` and `summary()` are the names otter-grader's check results use.
    """

    question: str
    status: str  # PASSED, FAILED or NOT_ANSWERED
    message: str  # what was checked, or what to fix

    @property
    def passed(self) -> bool:
        return self.status == PASSED

    passed_all = passed

    @property
    def name(self) -> str:
        return self.question

    def summary(self) -> str:
        return f"{self.question} {self.status}: {self.message}"

    def __repr__(self) -> str:
        return self.summary()

    def _repr_html_(self) -> str:
        return (f'<p class="public-check" data-status="{self.status}"><strong style="color: '
                f'{_COLOURS[self.status]}">{self.question} {self.status}</strong>: {html.escape(self.message)}</p>')


@dataclass(frozen=True)
class CheckTable:
    """Every question's public check, as `check_all()` and `python public_checks.py` report them."""

    results: tuple[CheckResult, ...]

    @property
    def passed_all(self) -> bool:
        return all(r.passed for r in self.results)

    def verdict(self) -> str:
        passed = sum(r.passed for r in self.results)
        return f"{passed} of {len(self.results)} questions pass their public checks. {HIDDEN_TESTS_NOTE}"

    def summary(self) -> str:
        rows = [("question", "public check", "details")] + [(r.question, r.status, r.message) for r in self.results]
        widths = [max(len(row[i]) for row in rows) for i in range(2)]
        lines = [f"{q:<{widths[0]}}  {s:<{widths[1]}}  {m}" for q, s, m in rows]
        return "\n".join(lines + ["", self.verdict()])

    def __repr__(self) -> str:
        return self.summary()

    def _repr_html_(self) -> str:
        rows = "".join(f'<tr class="public-check" data-status="{r.status}"><td>{r.question}</td>'
                       f'<td style="color: {_COLOURS[r.status]}; font-weight: bold">{r.status}</td>'
                       f"<td style=\"text-align: left\">{html.escape(r.message)}</td></tr>" for r in self.results)
        return (f'<table class="public-checks"><thead><tr><th>question</th><th>public check</th>'
                f'<th style="text-align: left">details</th></tr></thead><tbody>{rows}</tbody></table>'
                f"<p>{html.escape(self.verdict())}</p>")

    def to_json(self) -> str:
        return json.dumps([asdict(r) for r in self.results])

    @classmethod
    def from_json(cls, text: str) -> "CheckTable":
        return cls(tuple(CheckResult(**r) for r in json.loads(text)))


def _run_check(question: str, namespace: dict) -> CheckResult:
    if question not in _CHECKS:
        return CheckResult(question, FAILED, f"there is no public check {question!r}; "
                                             f"the questions are {', '.join(_CHECKS)}")
    try:
        what = _CHECKS[question](dict(namespace))
    except NotAnsweredYet as exc:
        return CheckResult(question, NOT_ANSWERED, str(exc))
    except PublicCheckFailed as exc:
        return CheckResult(question, FAILED, str(exc))
    except NotImplementedError as exc:
        return CheckResult(question, NOT_ANSWERED, f"part of the answer still raises NotImplementedError: {exc}")
    except Exception as exc:  # the student's code raised: say what, the check's own frames are no help
        message = f"calling your code raised {type(exc).__name__}: {exc}"
        return CheckResult(question, FAILED, message if len(message) <= 300 else message[:297] + "...")
    return CheckResult(question, PASSED, what)


def _check_table(namespace: dict) -> CheckTable:
    return CheckTable(tuple(_run_check(q, namespace) for q in _CHECKS))


def check(question: str) -> CheckResult:
    """The public checks of `question` (e.g. "q1_2") on the answers of the notebook that calls it."""
    return _run_check(question, inspect.currentframe().f_back.f_globals)


def check_all() -> CheckTable:
    """The public checks of every question, on the answers of the notebook that calls it."""
    return _check_table(inspect.currentframe().f_back.f_globals)


class Notebook:
    """otter-grader's spelling of the same checks: `grader = Notebook(); grader.check("q1_2")`.

    otter's arguments (the notebook's path, a tests folder, ...) are accepted and not needed: the
    checks live in this file, not in test files.
    """

    def __init__(self, nb_path: str | None = None, tests_dir: str | None = None, **otter_options):
        pass

    def check(self, question: str, global_env: dict | None = None) -> CheckResult:
        return _run_check(question, inspect.currentframe().f_back.f_globals if global_env is None else global_env)

    def check_all(self) -> CheckTable:
        return _check_table(inspect.currentframe().f_back.f_globals)


# ------------------------------------------------------------------ python public_checks.py NOTEBOOK


REPORT_MARKER = "@@public-checks@@"
# Run in the student's kernel after the notebook's cells: check_all() on the notebook's own names.
REPORT_CELL = f"import public_checks as _public_checks\nprint({REPORT_MARKER!r} + _public_checks.check_all().to_json())"


class NotebookNotRun(Exception):
    """The notebook could not be run at all; the message says why."""


def _first_line(text: str, limit: int = 200) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= limit else line[:limit - 3] + "..."


def run_notebook(path: Path, *, timeout: float) -> tuple[CheckTable, list[str], int, float]:
    """Run `path` in a fresh kernel (its folder as working directory), going on past failing cells.

    Returns the public checks' table, one line per cell that raised, the number of code cells run
    and the seconds it took.
    """
    try:
        import nbformat
        from nbclient import NotebookClient
        from nbclient.exceptions import DeadKernelError
    except ImportError as exc:
        raise NotebookNotRun(f"the package {exc.name} is missing: it comes with JupyterLab "
                             f"(pip install jupyterlab)") from None
    try:
        nb = nbformat.read(path, as_version=4)
    except OSError as exc:
        raise NotebookNotRun(f"cannot read {path}: {exc.strerror}") from None
    except Exception as exc:  # nbformat raises many kinds of errors on a file that is not a notebook
        raise NotebookNotRun(f"{path} is not a readable notebook: {_first_line(str(exc))}") from None
    report_index = len(nb.cells)
    nb.cells.append(nbformat.v4.new_code_cell(REPORT_CELL))
    quiet = logging.getLogger("public_checks.nbclient")  # timeouts are reported below, once
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    # The kernel's own log (a warning that it talks over local TCP, as under JupyterLab) is not the student's business.
    client = NotebookClient(nb, timeout=timeout, interrupt_on_timeout=True, allow_errors=True, kernel_name="python3",
                            extra_arguments=["--IPKernelApp.log_level=ERROR"],
                            resources={"metadata": {"path": str(path.resolve().parent)}}, log=quiet)
    problems: list[str] = []
    started, ran, index = time.monotonic(), 0, 0
    try:
        with client.setup_kernel():
            for index, cell in enumerate(nb.cells):
                if cell.cell_type != "code" or not cell.source.strip():
                    continue
                client.execute_cell(cell, index)
                ran += index < report_index
                error = next((o for o in cell.outputs if o.output_type == "error"), None)
                if error is None or index == report_index:
                    continue
                grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
                where = f"cell {index + 1}" + (f" ({grade_id})" if grade_id else "")
                what = (f"did not finish within {timeout:g} s and was interrupted" if error.ename == "KeyboardInterrupt"
                        else f"{error.ename}: {_first_line(error.evalue)}")
                problems.append(f"{where}: {what}")
    except DeadKernelError:
        raise NotebookNotRun(f"the kernel died while running cell {index + 1} (out of memory?)") from None
    except Exception as exc:  # the kernel could not be started or talked to
        raise NotebookNotRun(f"could not run a Jupyter kernel: {type(exc).__name__}: {_first_line(str(exc))}") from None
    seconds = time.monotonic() - started
    report = nb.cells[report_index]
    printed = "".join(o.get("text", "") for o in report.outputs if o.output_type == "stream")
    if REPORT_MARKER not in printed:
        error = next((o for o in report.outputs if o.output_type == "error"), None)
        why = f"{error.ename}: {_first_line(error.evalue)}" if error else "it printed nothing"
        raise NotebookNotRun(f"the public checks could not run in the notebook's kernel ({why}); "
                             f"public_checks.py and vanishing_helpers.py must be beside the notebook")
    table = CheckTable.from_json(printed.split(REPORT_MARKER, 1)[1].strip())
    return table, problems, ran, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python public_checks.py",
        description="Run a notebook top to bottom in a fresh kernel and report every question's public checks.")
    parser.add_argument("notebook", type=Path, help="the notebook to check, e.g. vanishing_gradients.ipynb")
    parser.add_argument("--timeout", type=float, default=120, help="seconds a cell may run (default: 120)")
    args = parser.parse_args(argv)
    print(f"Running {args.notebook} top to bottom in a fresh kernel...", file=sys.stderr, flush=True)
    try:
        table, problems, ran, seconds = run_notebook(args.notebook, timeout=args.timeout)
    except NotebookNotRun as exc:
        print(f"{args.notebook} could not be checked: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"{args.notebook}: {ran} code cells run in {seconds:.1f} s.")
    if problems:
        print("Cells that raised an error (JupyterLab's Run All stops at the first of them):")
        print("\n".join(f"  {p}" for p in problems))
    print()
    print(table.summary())
    return 0 if table.passed_all and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
