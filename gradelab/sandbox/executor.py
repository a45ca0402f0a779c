"""The sandbox S's main: runs a student's notebook, then answers the trusted side's questions.

Everything in this module runs inside the sandbox process, after the isolation layers are in
place (gradelab.sandbox.layers). It executes the notebook's code cells with IPython's semantics,
reports each cell's outcome to the supervisor, captures figures as plain data
(gradelab.sandbox.capture), and then serves the test runner's requests (gradelab.sandbox.rpc).
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from IPython.core.interactiveshell import InteractiveShell  # noqa: E402

from gradelab.boundary import messages, wire  # noqa: E402
from gradelab.sandbox import capture  # noqa: E402
from gradelab.sandbox.rpc import RpcServer  # noqa: E402
from gradelab.sandbox.running import CappedText, error_info, seed_everything  # noqa: E402

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
    # The grader reports errors itself (`error_info`: the student's frames only); IPython's verbose
    # traceback reads source files and walks sys.modules, 10-60 ms per failing cell, for text no one reads.
    shell.InteractiveTB.set_mode("Minimal")
    return shell


class NotebookRunner:
    """Executes cells in the shell and keeps what the trusted side may ask about."""

    def __init__(self, shell: InteractiveShell, *, seed: int, cell_timeout: float, output_limit: int):
        self.shell = shell
        self.seed = seed
        self.cell_timeout = cell_timeout
        self.output_limit = output_limit
        self.figures: list[dict] = []
        self.sources: dict[int, str] = {}  # by cell index, for redrawing a cell's random values

    def run_cell(self, index: int, source: str) -> messages.CellOutcome:
        """Run one cell; return its outcome (status ok/error/timeout/refused, output, error)."""
        self.sources[index] = source
        seed_everything(self.seed + index)
        out = CappedText(self.output_limit)
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
        status = ("ok" if error is None else "timeout" if isinstance(error, CellTimeout)
                  else "refused" if isinstance(error, RefusedCommand) else "error")
        return messages.CellOutcome(index=index, status=status, output=out.value(), seconds=seconds + render_seconds,
                                    render_seconds=render_seconds,
                                    error=None if error is None else messages.CellError(**error_info(error)))

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
                data, seconds = capture.capture_figure_timed(fig, cell=cell, index=k)
                render_seconds += seconds
            except Exception as exc:  # a figure that cannot be drawn is reported, not fatal
                data = {"cell": cell, "index": k, "error": f"{type(exc).__name__}: {exc}"[:500]}
            data["names"] = sorted(names_by_figure.get(id(fig), []))
            self.figures.append(data)
        plt.close("all")
        return render_seconds


def sandbox_main(cells: list[tuple[int, str]], *, ctl: socket.socket, rpc: socket.socket,
                 shell: InteractiveShell, seed: int, cell_timeout: float, output_limit: int) -> int:
    """Entry point of the sandbox process: execute, report to the supervisor, then serve RPC."""
    # The student's code may print or close fds 1/2; the grader never reads them.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    capture.install_recorders()
    runner = NotebookRunner(shell, seed=seed, cell_timeout=cell_timeout, output_limit=output_limit)
    for index, source in cells:
        messages.send(ctl, messages.CellStart(event="cell_start", index=index))
        messages.send(ctl, messages.CellEnd(event="cell_end", cell=runner.run_cell(index, source)))
    wire.send_msg(ctl, {"event": "ready", "figures": _sendable(runner.figures)})
    ctl.close()
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    RpcServer(runner, rpc).serve()
    return 0




def _sendable(figures: list[dict]) -> list[dict]:
    """The captured figures within the limits of a Ready message: each one that cannot be sent,
    and those beyond the count or byte limit, replaced by an error record for its cell."""
    kept, total = [], 0
    for fig in figures:
        cell, index, names = fig.get("cell"), fig.get("index"), fig.get("names", [])
        try:
            total += len(wire.encode(fig)) if "error" not in fig else 0
            if len(kept) >= messages.MAX_FIGURES or total > messages.MAX_FIGURE_BYTES:
                raise wire.WireError(f"not kept: a notebook's figures may hold at most {messages.MAX_FIGURES} "
                                     f"figures and {messages.MAX_FIGURE_BYTES >> 20} MiB")
            kept.append(fig)
        except wire.WireError as exc:
            if len(kept) < messages.MAX_FIGURES:
                kept.append({"cell": cell, "index": index, "error": str(exc)[:500], "names": names})
    return kept
