"""How fair the statistical hidden tests are: how often each takes points from a correct answer
(false fail) and lets a known wrong one through (miss), simulated as the grader runs them.

    ./run bench fairness             # the default run (6 minutes on 2 cores, 9 when they are shared)
    ./run bench fairness --quick     # a smoke run: a few submissions, nothing resolved
    ./run bench fairness --scale 4   # 4x the simulated submissions

What is simulated, exactly as in grading (the released tests in autograder/tests: run `gradelab
release` after editing source/hidden_tests):
- Submissions: seeds from gradelab.project.submission_seed (the assignment seed and a file hash);
  each test's `seed` from gradelab.hidden.plugin.seed_for_test with the node id pytest gives it when the
  test runner collects autograder/tests (found here by the same collection).
- The student's side: rpc.RpcServer on a thread of this process, serving the variant's
  namespace (its answer cells run with IPython's input transformation, as in the sandbox), reached
  through a real proxy.StudentProxy: the hidden tests' own functions (weights_over_draws,
  matrix_and_vector_draws, xor_models, ...) run unchanged against it. Its `seed_everything` per
  request, per draw of module_draws and per cell (seed + cell index) is the sandbox's.
- Shortcuts, each checked against the exact path: the weight tests build most of their models by
  calling the builder directly after running.seed_everything (the first submissions of every
  chunk go the exact way, through the real test function: weights bit-identical, same verdict),
  and the XOR models of many submissions are trained in one call of the tests' own
  train_xor_batched (the first submissions' five models are also trained alone: same accuracies).

What is printed, per test, statistic and variant: the threshold; the empirical count (fails of a
correct variant, passes of a wrong one, over the simulated submissions); an estimate of the rate.
A rate of 1e-6 cannot be seen in a few thousand submissions, so the requirements (false fail
< 1e-6 on every correct variant, miss < 1e-3 on every wrong one) are judged on the estimate:
- a mean or spread (mean of squared deviations) of n values: its tail beyond the threshold from the
  Cornish-Fisher expansion with the per-value moments pooled over all simulated values, i.e.
  assuming the n values of a submission independent; the column "sd sim/iid" compares the
  statistic's simulated spread with that assumption's (1 when it holds).
- smallest / largest value, share beyond 2 standard deviations: exact (binomial) with the pooled
  per-value rates (k/M over 10^5 values and more).
- q1_1 (a draw without a negative value), XOR (a model not solving it): exact binomial with the
  per-draw / per-model rate estimated as (k + 1/2) / (M + 1), which is never 0; the 95% upper bound
  is shown beside it.
- kill_gradients: the normal tail of log10 of the first layer's largest gradient; he_init_: the
  normal tail of each layer's std / expected.
A test with several statistics fails a correct answer at most with the sum of their rates and
passes a wrong one at most with the smallest of their pass rates: those are its "whole test" rows.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import multiprocessing
import socket
import sys
import threading
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

import nbformat
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import make_submissions as ms  # noqa: E402

from gradelab.sandbox import executor, rpc, running  # noqa: E402

from gradelab.hidden import distributions, proxy  # noqa: E402
from gradelab.hidden.plugin import seed_for_test  # noqa: E402
from gradelab.project import Project, submission_seed  # noqa: E402
from gradelab.boundary.messages import CellReport  # noqa: E402
from gradelab.boundary.modelspec import describe_module, layer, resolve_torch_arg  # noqa: E402

PROJECT = Project.load(ROOT)
ASSIGNMENT_DIR = ROOT / "release" / PROJECT.config.assignment.id
sys.path.insert(0, str(ASSIGNMENT_DIR))  # vanishing_helpers, for the notebook's cells and the tests
FALSE_FAIL_LIMIT, MISS_LIMIT = 1e-6, 1e-3
VERIFIED_PER_CHUNK = 2  # submissions of every chunk that also take the exact path


# ------------------------------------------------------------------ the variants


@dataclass(frozen=True)
class Variant:
    label: str
    correct: bool
    answers: dict[str, str] = field(default_factory=dict)  # grade_id -> source, over the reference's


def _replaced(grade_id: str, old: str, new: str) -> str:
    return ms.edit(ms.CORRECT[grade_id], old, new)


REFERENCE = Variant("reference", True)
A_AND_B = ("A = nn.init.uniform_(torch.empty(3, 3), a=-1.0, b=1.0)\n"
           "b = nn.init.uniform_(torch.empty(3, 1), a=-1.0, b=1.0)")
UNIFORM_LINE = "nn.init.uniform_(layer.weight, a=-1.0, b=1.0)"
GLOROT_LINE = "nn.init.xavier_normal_(layer.weight)"
KILL_LINE = "Initializer(target_layer=0, multiplier=10.0)"


def _glorot(answers: dict[str, str]) -> dict[str, str]:
    """A variant's build_model and build_model_glorot (which builds on its NeuralNetwork or build_model)."""
    return {grade_id: answers[grade_id] for grade_id in ("q1_4_build_model", "q2_8_glorot")}


VARIANTS: dict[str, list[Variant]] = {
    "matrix": [
        REFERENCE,
        Variant("torch.empty().uniform_(-1, 1)", True, {"q1_1_tensors": ms.OTHER_DETAILS["q1_1_tensors"]}),
        Variant("uniform_ default [0, 1]", False, {"q1_1_tensors": _replaced(
            "q1_1_tensors", A_AND_B, A_AND_B.replace(", a=-1.0, b=1.0)", ")"))}),
        Variant("torch.randn", False, {"q1_1_tensors": _replaced(
            "q1_1_tensors", A_AND_B, "A = torch.randn(3, 3)\nb = torch.randn(3, 1)")}),
    ],
    "uniform": [
        REFERENCE,
        Variant("correct_sequential_style", True, {"q1_4_build_model": ms.SEQUENTIAL_STYLE["q1_4_build_model"]}),
        Variant("correct_class_activation", True, {"q1_4_build_model": ms.CLASS_ACTIVATION["q1_4_build_model"]}),
        Variant("correct_stable_sigmoid", True, {"q1_4_build_model": ms.STABLE_SIGMOID["q1_4_build_model"]}),
        Variant("wrong_uniform_0_1 ([0, 1])", False, {"q1_4_build_model": ms.UNIFORM_0_1}),
        Variant("nn.Linear's own init", False, {"q1_4_build_model": _replaced(
            "q1_4_build_model", UNIFORM_LINE, "pass")}),
        Variant("first layer only", False, {"q1_4_build_model": _replaced(
            "q1_4_build_model", UNIFORM_LINE, UNIFORM_LINE + "\n            break")}),
    ],
    "glorot": [
        REFERENCE,
        Variant("correct_sequential_style (std by hand)", True, _glorot(ms.SEQUENTIAL_STYLE)),
        Variant("correct_class_activation (zero biases)", True, _glorot(ms.CLASS_ACTIVATION)),
        Variant("correct_stable_sigmoid (apply)", True, _glorot(ms.STABLE_SIGMOID)),
        Variant("xavier_uniform_", False, {"q2_8_glorot": _replaced(
            "q2_8_glorot", GLOROT_LINE, "nn.init.xavier_uniform_(layer.weight)")}),
        Variant("N(0, 1)", False, {"q2_8_glorot": _replaced(
            "q2_8_glorot", GLOROT_LINE, "nn.init.normal_(layer.weight, 0.0, 1.0)")}),
        Variant("U(-1, 1) (build_model's)", False, {"q2_8_glorot": _replaced(
            "q2_8_glorot", GLOROT_LINE, "nn.init.uniform_(layer.weight, -1.0, 1.0)")}),
        Variant("nn.Linear's own init", False, {"q2_8_glorot": _replaced("q2_8_glorot", GLOROT_LINE, "pass")}),
    ],
    "xor": [
        REFERENCE,
        Variant("correct_sequential_style (2-32-1 tanh)", True, {"q3_3_xor": ms.SEQUENTIAL_STYLE["q3_3_xor"]}),
        Variant("correct_class_activation (2-32-32-1 ReLU)", True, {"q3_3_xor": ms.CLASS_ACTIVATION["q3_3_xor"]}),
        Variant("correct_stable_sigmoid (2-64-1 ReLU)", True, {"q3_3_xor": ms.STABLE_SIGMOID["q3_3_xor"]}),
        Variant("linear (wrong_linear_xor)", False, {"q3_3_xor": ms.LINEAR_XOR}),
    ],
    "kill": [
        REFERENCE,
        Variant("no-op", False, {"q3_1_deep": ms.CORRECT["q3_1_deep"]
                                 + "\n\n\ndef kill_gradients(model):\n    return model"}),
        Variant("first layer's weights 0", False, {"q3_1_deep": _replaced(
            "q3_1_deep", KILL_LINE, KILL_LINE.replace("10.0", "0.0"))}),
    ],
    "he": [
        REFERENCE,
        Variant("correct_other_details (by hand)", True, {"qb_1_he": ms.OTHER_DETAILS["qb_1_he"]}),
        Variant("mode fan_out", False, {"qb_1_he": _replaced("qb_1_he", 'mode="fan_in"', 'mode="fan_out"')}),
        Variant("gain forgotten", False, {"qb_1_he": ms.edit(
            ms.OTHER_DETAILS["qb_1_he"], "gain / math.sqrt", "1 / math.sqrt")}),
    ],
}
CELLS = {"matrix": ["q1_1_tensors"], "uniform": ["q1_4_build_model"], "glorot": ["q1_4_build_model", "q2_8_glorot"],
         "xor": ["q3_3_xor"], "kill": ["q3_1_deep"], "he": ["qb_1_he"]}
# Simulated submissions per correct and per wrong variant at --scale 1, and chunks of work per
# variant. kill_gradients's reference gives a gradient of exactly 0 (saturated activations) but in
# about 1 submission in 700: 5000 give a few nonzero values to estimate the tail from.
SIZES = {"matrix": (5000, 5000, 2), "uniform": (1000, 1000, 2), "glorot": (1000, 1000, 2), "xor": (200, 20, 2),
         "kill": (5000, 1000, 2), "he": (200, 200, 2)}


# ------------------------------------------------------------------ the grader's code paths, in this process


class LocalSandbox:
    """rpc.RpcServer on a thread, over a socket pair, serving one namespace: the sandbox's
    request handling, without the process and its isolation."""

    def __init__(self, namespace: dict, sources: dict[int, str]):
        shell = types.SimpleNamespace(user_ns=namespace, transform_cell=_shell().transform_cell)
        runner = types.SimpleNamespace(shell=shell, sources=sources, seed=0)
        server_end, self.client_end = socket.socketpair()
        threading.Thread(target=rpc.RpcServer(runner, server_end).serve, daemon=True).start()

    def student(self, submission: int) -> proxy.StudentProxy:
        link = proxy.SandboxLink(rpc=self.client_end, control=None, call_timeout=600.0)
        return proxy.StudentProxy(link, submission)


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


_SHELL = None


def _shell():
    global _SHELL
    if _SHELL is None:
        _SHELL = executor.make_shell()
    return _SHELL


def _notebook_cells() -> dict[str, tuple[int, str]]:
    """grade_id -> (index, source) of the released notebook's code cells."""
    notebook = nbformat.read(ASSIGNMENT_DIR / PROJECT.config.assignment.notebook, as_version=4)
    return {c.metadata.get("nbgrader", {}).get("grade_id"): (i, c.source)
            for i, c in enumerate(notebook.cells) if c.cell_type == "code"}


def compiled(source: str, index: int):
    return compile(_shell().transform_cell(source), f"<cell {index}>", "exec")


def namespace_for(variant: Variant, grade_ids: list[str]) -> tuple[dict, dict[int, str]]:
    """The notebook's set-up cell and the variant's answers to `grade_ids`, run in a fresh
    namespace as the sandbox runs cells; and their sources by cell index."""
    cells = _notebook_cells()
    answers = {**ms.CORRECT, **variant.answers}
    namespace: dict = {"get_ipython": _shell().get_ipython, "__name__": "__main__"}
    sources = {}
    for grade_id in ["setup", *grade_ids]:
        index, released = cells[grade_id]
        source = answers.get(grade_id, released)
        sources[index] = source
        running.seed_everything(index)
        with _quiet():
            exec(compiled(source, index), namespace)  # noqa: S102 - the variant's own cell
    return namespace, sources


def submissions(first: int, count: int) -> list[int]:
    base = PROJECT.config.assignment.seed
    return [submission_seed(base, f"fairness-{i}") for i in range(first, first + count)]


def collected_nodeids() -> dict[str, str]:
    """Test name (with parameters) -> node id, as the test runner's pytest collects autograder/tests."""
    class Recorder:
        def __init__(self):
            self.ids: dict[str, str] = {}

        def pytest_collection_modifyitems(self, items):
            self.ids.update({item.name: item.nodeid for item in items})

    recorder = Recorder()
    with _quiet():
        pytest.main([str(PROJECT.tests_dir), "-q", "--collect-only", "-o", "python_files=test_*.py",
                     "-p", "no:cacheprovider"], plugins=[recorder])
    if not recorder.ids:
        raise SystemExit(f"no hidden tests collected from {PROJECT.tests_dir}: run `gradelab release` first")
    return recorder.ids


def _probe(seed: int) -> torch.Tensor:
    """The hidden tests' `probe` fixture for a test's seed."""
    return torch.rand(16, 2, generator=torch.Generator().manual_seed(seed)) * 4 - 2


def _fails(test, *args) -> bool:
    try:
        test(*args)
    except AssertionError:
        return True
    return False


# ------------------------------------------------------------------ simulations (run in worker processes)


def simulate(task: tuple[str, str, int, int, int]) -> dict:
    """One chunk of work: (simulation, variant label, first submission, count, parameter index)."""
    torch.set_num_threads(1)
    kind, label, first, count, param = task
    variant = next(v for v in VARIANTS[kind] if v.label == label)
    namespace, sources = namespace_for(variant, CELLS[kind])
    sandbox = LocalSandbox(namespace, sources)
    return SIMULATIONS[kind](sandbox, namespace, sources, submissions(first, count), param, NODEIDS)


def simulate_matrix(sandbox, namespace, sources, subs, _param, nodeids) -> dict:
    import test_part1

    nodeid = nodeids["test_matrix_and_vector"]
    index = _notebook_cells()["q1_1_tensors"][0]
    code = compiled(sources[index], index)
    cells = [CellReport(index=index, grade_id="q1_1_tensors", status="ok")]  # the executed_cells fixture
    no_negative = outside = draws = fails = 0
    for sub in subs:
        seed = seed_for_test(sub, nodeid)
        running.seed_everything(sub + index)  # NotebookRunner.run_cell's seeding of the cell
        with _quiet():
            exec(code, namespace)  # noqa: S102 - the variant's own cell
        student = sandbox.student(sub)
        values = test_part1.matrix_and_vector_draws(student, cells, seed)
        no_negative += sum(bool((d >= 0).all()) for d in values)
        outside += sum(bool((d.abs() > 1).any()) for d in values)
        draws += len(values)
        fails += _fails(test_part1.test_matrix_and_vector, student, cells, seed)
    return {"without negative": no_negative, "outside": outside, "draws": draws, "fails": fails, "n": len(subs),
            "exact": len(subs)}


WEIGHTS = {"uniform": ("test_build_model_uniform_weights", "build_model", "Sigmoid"),
           "glorot": ("test_glorot_normal_weights", "build_model_glorot", "Tanh")}


def _weight_test(kind: str):
    import test_part1
    import test_part2

    if kind == "uniform":
        return test_part1.test_build_model_uniform_weights, test_part1.UNIFORM_DRAWS, test_part1.UNIFORM_WEIGHTS
    return test_part2.test_glorot_normal_weights, test_part2.GLOROT_DRAWS, test_part2.GLOROT_WEIGHTS


def _direct_weights(builder, activation: str, seed: int, draws: int) -> torch.Tensor:
    """weights_over_draws' values, by calling the builder as op_module / op_module_draws do."""
    argument = resolve_torch_arg(layer(activation))
    weights = []
    for draw in range(draws):
        running.seed_everything(seed + draw)
        with _quiet():
            model = rpc._call_with_activation_fallback(builder, [argument], {})
        weights += [t.flatten() for t in describe_module(model, None)["state"] if t.dim() == 2]
    return torch.cat(weights).to(torch.float64)


def simulate_weights(kind: str):
    def run(sandbox, namespace, _sources, subs, _param, nodeids) -> dict:
        from conftest import weights_over_draws

        test, draws, expected = _weight_test(kind)
        name, builder, activation = WEIGHTS[kind]
        statistics: dict[str, list[float]] = {}
        sums = np.zeros(9)  # count, then the sums of d^1 .. d^8 (d = value - expected mean)
        below: dict[str, int] = {}
        fails = 0
        n = None
        for position, sub in enumerate(subs):
            seed = seed_for_test(sub, nodeids[name])
            values = _direct_weights(namespace[builder], activation, seed, draws)
            verdict = any(not c.low <= v <= c.high for c, v in _checked(values, expected))
            if position < VERIFIED_PER_CHUNK:  # the exact path: the proxy, the test's helper, the test itself
                student, probe = sandbox.student(sub), _probe(seed)
                with _quiet():
                    exact = weights_over_draws(student, builder, activation, draws=draws, probe=probe, seed=seed)
                    exact_fails = _fails(test, student, probe, seed)
                if not torch.equal(exact, values) or exact_fails != verdict:
                    raise RuntimeError(f"{name}: the direct path differs from the grader's for submission {sub}")
            fails += verdict
            n = values.numel() if n is None else n
            if values.numel() != n:
                raise RuntimeError(f"{name}: submissions with {n} and {values.numel()} weights")
            for check, value in _checked(values, expected):
                statistics.setdefault(check.statistic, []).append(value)
            d = values - expected.mean
            sums += [d.numel(), *(float((d**k).sum()) for k in range(1, 9))]
            for check in distributions.distribution_checks(expected, n):
                for key, count in _boundary_counts(check, values, expected).items():
                    below[key] = below.get(key, 0) + count
        return {"statistics": statistics, "sums": sums.tolist(), "counts": below, "fails": fails, "n": len(subs),
                "values": n, "exact": min(len(subs), VERIFIED_PER_CHUNK)}
    return run


def _checked(values: torch.Tensor, expected) -> list[tuple[distributions.DistributionCheck, float]]:
    found = distributions.distribution_statistics(values, expected)
    return [(c, found[c.statistic]) for c in distributions.distribution_checks(expected, values.numel())]


def _boundary_counts(check, values: torch.Tensor, expected) -> dict[str, int]:
    """Per-value counts the exact estimates of smallest / largest / tail need."""
    if check.statistic == "smallest":
        return {"below low": int((values < check.low).sum()),
                "at most reach (smallest)": int((values <= check.high).sum())}
    if check.statistic == "largest":
        return {"above high": int((values > check.high).sum()),
                "at least reach (largest)": int((values >= check.low).sum())}
    if check.statistic == "tail":
        return {"beyond": int(((values - expected.mean).abs() > expected.tail * expected.std).sum())}
    return {}


def simulate_xor(sandbox, _namespace, _sources, subs, _param, nodeids) -> dict:
    import test_part3
    from conftest import train_xor_batched

    nodeid = nodeids["test_xor_solved_reliably"]
    models = []
    with _quiet():
        for sub in subs:
            models += test_part3.xor_models(sandbox.student(sub), seed_for_test(sub, nodeid))
    accuracy = train_xor_batched(models)
    per_submission = accuracy.reshape(len(subs), test_part3.XOR_SEEDS)
    for position in range(min(len(subs), VERIFIED_PER_CHUNK)):  # as the test trains them: five at a time
        alone = train_xor_batched(models[position * test_part3.XOR_SEEDS:(position + 1) * test_part3.XOR_SEEDS])
        if not torch.equal(alone, per_submission[position]):
            raise RuntimeError(f"XOR: training in a batch of {len(models)} differs from a batch of 5")
    solved = (per_submission == 1).sum(1)
    return {"models": len(models), "unsolved": int((accuracy < 1).sum()),
            "fails": int((solved < test_part3.XOR_SOLVED_AT_LEAST).sum()), "n": len(subs),
            "exact": min(len(subs), VERIFIED_PER_CHUNK)}


KILL_ACTIVATIONS = [torch.nn.Sigmoid, torch.nn.Tanh]


def simulate_kill(sandbox, _namespace, _sources, subs, param, nodeids) -> dict:
    import test_part3

    activation = KILL_ACTIVATIONS[param]
    nodeid = nodeids[f"test_kill_gradients[{activation.__name__.lower()}]"]
    after = []
    with _quiet():
        for sub in subs:
            after.append(test_part3.first_layer_gradients_around_kill(
                sandbox.student(sub), activation, seed_for_test(sub, nodeid))[1])
    fails = sum(a >= test_part3.KILLED_BELOW for a in after)
    return {"after": after, "fails": fails, "n": len(subs), "exact": len(subs)}


HE_SLOPES = [0.0, 0.2]


def simulate_he(sandbox, _namespace, _sources, subs, param, nodeids) -> dict:
    import test_bonus

    slope = HE_SLOPES[param]
    nodeid = nodeids[f"test_he_init[{slope}]"]
    ratios: list[list[float]] = [[], []]
    fails = 0
    with _quiet():
        for sub in subs:
            changed = test_bonus.he_initialised(sandbox.student(sub), slope, seed_for_test(sub, nodeid))
            layer_ratios = [float(m.weight.std()) / test_bonus.he_std(slope, m.in_features)
                            for m in (changed[0], changed[2])]
            for store, ratio in zip(ratios, layer_ratios):
                store.append(ratio)
            fails += any(abs(r - 1) >= test_bonus.HE_STD_TOLERANCE for r in layer_ratios)
    return {"ratios": ratios, "fails": fails, "n": len(subs), "exact": len(subs)}


SIMULATIONS = {"matrix": simulate_matrix, "uniform": simulate_weights("uniform"), "glorot": simulate_weights("glorot"),
               "xor": simulate_xor, "kill": simulate_kill, "he": simulate_he}
PARAMETERS = {"kill": KILL_ACTIVATIONS, "he": HE_SLOPES}
NODEIDS: dict[str, str] = {}


# ------------------------------------------------------------------ estimates


def jeffreys(k: int, m: int) -> float:
    """A rate from k events in m trials that is never 0: the Jeffreys prior's posterior mean."""
    return (k + 0.5) / (m + 1)


def _log_pmf(n: int, p: float, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p)


def binomial_at_least(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) >= k)."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    return min(1.0, sum(math.exp(_log_pmf(n, p, i)) for i in range(k, n + 1)))


def upper_95(k: int, m: int) -> float:
    """The one-sided 95% upper confidence bound of a rate (Clopper-Pearson)."""
    low, high = k / m, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if 1 - binomial_at_least(k + 1, m, mid) > 0.05 else (low, mid)
    return high


def _normal_quantile_of(value: float, quantile, z_range: float = 12.0) -> float:
    """The z with quantile(z) = value (quantile increasing), clipped to [-z_range, z_range]."""
    low, high = -z_range, z_range
    if value <= quantile(low):
        return low
    if value >= quantile(high):
        return high
    for _ in range(80):
        mid = (low + high) / 2
        low, high = (mid, high) if quantile(mid) < value else (low, mid)
    return (low + high) / 2


def mean_outside(moments: list[float], n: int, low: float, high: float) -> tuple[float, float]:
    """P(below low), P(above high) for the mean of n values with these raw moments."""
    def quantile(z):
        return distributions.mean_quantile(moments, n, z)
    normal = NormalDist()
    return normal.cdf(_normal_quantile_of(low, quantile)), 1 - normal.cdf(_normal_quantile_of(high, quantile))


def normal_outside(values: list[float], low: float, high: float) -> tuple[float, float]:
    mean, sd = float(np.mean(values)), float(np.std(values, ddof=1))
    if sd == 0:
        return float(mean < low), float(mean > high)
    normal = NormalDist(mean, sd)
    return normal.cdf(low), 1 - normal.cdf(high)


# ------------------------------------------------------------------ the table


@dataclass
class Row:
    test: str
    statistic: str
    threshold: str
    variant: Variant
    empirical: str
    estimate: float | None  # the rate: false fail (correct variant) or miss (wrong variant)
    note: str = ""
    whole_test: bool = False

    @property
    def meets(self) -> str:
        if not self.whole_test:
            return ""
        limit = FALSE_FAIL_LIMIT if self.variant.correct else MISS_LIMIT
        return "yes" if self.estimate is not None and self.estimate < limit else "NO"


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    return "<1e-30" if value < 1e-30 else f"{value:.1e}"


def _merge(parts: list[dict]) -> dict:
    merged: dict = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict):
                inner = merged.setdefault(key, {})
                for k, v in value.items():
                    inner[k] = inner.get(k, 0) + v if not isinstance(v, list) else inner.get(k, []) + v
            elif isinstance(value, list) and key == "sums":
                merged[key] = [a + b for a, b in zip(merged.get(key, [0.0] * len(value)), value)]
            elif isinstance(value, list) and key == "ratios":
                merged[key] = [a + b for a, b in zip(merged.get(key, [[] for _ in value]), value)]
            elif isinstance(value, list):
                merged[key] = merged.get(key, []) + value
            elif key == "values":
                merged[key] = value
            else:
                merged[key] = merged.get(key, 0) + value
    return merged


def _whole(test: str, threshold: str, variant: Variant, result: dict, fails_or_passes: float, note: str = "") -> Row:
    k = result["fails"] if variant.correct else result["n"] - result["fails"]
    what = "fail" if variant.correct else "pass"
    return Row(test, "whole test", threshold, variant, f"{k}/{result['n']} {what}", fails_or_passes, note,
               whole_test=True)


def rows_matrix(variant: Variant, r: dict) -> list[Row]:
    test = "q1_1 test_matrix_and_vector"
    draws_each = r["draws"] / r["n"]
    p_positive, p_outside = jeffreys(r["without negative"], r["draws"]), r["outside"] / r["draws"]
    rows = [Row(test, "a draw of A, b has no value < 0", "-", variant, f"{r['without negative']}/{r['draws']} draws",
                p_positive, f"95% <= {upper_95(r['without negative'], r['draws']):.1e}"),
            Row(test, "a draw of A, b has a value outside [-1, 1]", "-", variant, f"{r['outside']}/{r['draws']} draws",
                p_outside)]
    both = round(draws_each)
    if variant.correct:
        rate = 1 - (1 - p_outside) ** both + p_positive**both
    else:
        rate = min((1 - p_outside) ** both, 1 - p_positive**both)
    return rows + [_whole(test, f"all in [-1, 1], >= 1 of the {12 * both} values < 0", variant, r, rate,
                          f"{draws_each:.2f} draws per submission")]


def rows_weights(kind: str, variant: Variant, r: dict) -> list[Row]:
    _test, draws, expected = _weight_test(kind)
    test = f"{'q1_4' if kind == 'uniform' else 'q2_8'} {WEIGHTS[kind][0]}"
    n, sums = r["values"], r["sums"]
    values_seen = sums[0]
    moments = [s / values_seen for s in sums[1:]]  # E[d^1] .. E[d^8]
    rows, fails, passes = [], [], []
    for check in distributions.distribution_checks(expected, n):
        simulated = r["statistics"][check.statistic]
        outside_k = sum(not check.low <= v <= check.high for v in simulated)
        note = ""
        if check.statistic in ("smallest", "largest"):
            beyond, reach = (("below low", "at most reach (smallest)") if check.statistic == "smallest"
                             else ("above high", "at least reach (largest)"))
            p_beyond, p_reach = r["counts"][beyond] / values_seen, r["counts"][reach] / values_seen
            inside = (1 - p_beyond) ** n - (1 - p_reach) ** n
            rate = 1 - inside
            note = f"per value: {p_beyond:.1e} out of range, {p_reach:.2e} within reach"
        elif check.statistic == "tail":
            p = r["counts"]["beyond"] / values_seen
            fewest, most = round(check.low * n), round(check.high * n)
            rate = (1 - binomial_at_least(fewest, n, p)) + binomial_at_least(most + 1, n, p) if p > 0 else 1.0
            inside = 1 - rate
            note = f"per value: {p:.4f} beyond"
        else:
            # mean: of d = value - expected mean (E d .. E d^4); spread: of d^2 (E d^2, E d^4, E d^6, E d^8)
            statistic_moments = moments[0:4] if check.statistic == "mean" else moments[1::2]
            shift = expected.mean if check.statistic == "mean" else 0.0
            square = (lambda v: v) if check.statistic == "mean" else (lambda v: v * v)
            below, above = mean_outside(statistic_moments, n, square(check.low) - shift, square(check.high) - shift)
            rate, inside = below + above, 1 - below - above
            k2 = statistic_moments[1] - statistic_moments[0] ** 2
            sim_sd = float(np.std([square(v) for v in simulated], ddof=1)) if len(simulated) > 1 else float("nan")
            note = f"sd sim/iid {sim_sd / math.sqrt(k2 / n):.3f}"
        fails.append(rate)
        passes.append(inside)
        empirical = f"{outside_k if variant.correct else len(simulated) - outside_k}/{len(simulated)}"
        rows.append(Row(test, check.statistic, f"[{check.low:.4g}, {check.high:.4g}]", variant, empirical,
                        rate if variant.correct else inside, note))
    rate = sum(fails) if variant.correct else min(passes)
    return rows + [_whole(test, f"{n} weights ({draws} models), alpha 1e-6", variant, r, rate)]


def rows_xor(variant: Variant, r: dict) -> list[Row]:
    import test_part3

    test, seeds, needed = "q3_3 test_xor_solved_reliably", test_part3.XOR_SEEDS, test_part3.XOR_SOLVED_AT_LEAST
    unsolved, models = r["unsolved"], r["models"]
    p = jeffreys(unsolved, models)
    rate = (binomial_at_least(seeds - needed + 1, seeds, p) if variant.correct
            else binomial_at_least(needed, seeds, jeffreys(models - unsolved, models)))
    return [Row(test, "a model not solving XOR", "-", variant, f"{unsolved}/{models} models", p,
                f"95% <= {upper_95(unsolved, models):.1e}"),
            _whole(test, f"solved on >= {needed} of {seeds} seeds", variant, r, rate)]


def rows_kill(variant: Variant, r: dict, activation: str, both: list[dict]) -> list[Row]:
    """The gradient is often exactly 0: P(fail) = P(nonzero) x P(>= threshold | nonzero), the second
    from the normal distribution of log10 of the nonzero values, of both activations' tests when
    this one has fewer than 3 (then 1 if both together have fewer than 3)."""
    import test_part3

    test = f"q3_1 test_kill_gradients[{activation}]"
    after = r["after"]
    logs = [math.log10(a) for a in after if a > 0]
    fitted = logs if len(logs) >= 3 else [math.log10(a) for other in both for a in other["after"] if a > 0]
    threshold = math.log10(test_part3.KILLED_BELOW)
    above = normal_outside(fitted, -math.inf, threshold)[1] if len(fitted) >= 3 else 1.0
    nonzero = jeffreys(len(logs), len(after)) if variant.correct else len(logs) / len(after)
    rate = nonzero * above if variant.correct else 1 - nonzero * above
    note = (f"{len(after) - len(logs)}/{len(after)} exactly 0" + (f"; largest {max(after):.1e}" if logs else "")
            + (f"; log10 of the nonzero{' (both tests)' if fitted is not logs else ''}: mean {np.mean(fitted):.2f} "
               f"sd {np.std(fitted, ddof=1):.2f}" if len(fitted) >= 3 else ""))
    return [_whole(test, f"max |g1| after < {test_part3.KILLED_BELOW:g}", variant, r, rate, note)]


def rows_he(variant: Variant, r: dict, slope: float) -> list[Row]:
    import test_bonus

    test, tolerance = f"qb_1 test_he_init[{slope}]", test_bonus.HE_STD_TOLERANCE
    rows, fails, passes = [], [], []
    for name, ratios in zip(("Linear(256, 256)", "Linear(256, 128)"), r["ratios"]):
        below, above = normal_outside(ratios, 1 - tolerance, 1 + tolerance)
        fails.append(below + above)
        passes.append(1 - below - above)
        k = sum(abs(x - 1) >= tolerance for x in ratios)
        rows.append(Row(test, f"{name} std / expected", f"within {tolerance:g}", variant,
                        f"{k if variant.correct else len(ratios) - k}/{len(ratios)}",
                        fails[-1] if variant.correct else passes[-1],
                        f"mean {np.mean(ratios):.4f} sd {np.std(ratios, ddof=1):.4f}"))
    rate = sum(fails) if variant.correct else min(passes)
    return rows + [_whole(test, f"both layers within {tolerance:g}", variant, r, rate)]


DETERMINISTIC = [
    ("q2_2/4/6/8 gradient plots",
     "violins = the student's own model's gradients (recomputed on the same data, 1%), labels, count"),
    ("q2_2/4/6/8 plot images",
     "RMS vs plot_grad of the student's own model: the same PNG bytes for a plot_grad figure"),
    ("q3_1 dying depths", "the notebook's own seeded procedure; within 1 of the reference's"),
    ("q3_2 NegativeInitializer", "signs of weights and biases, gradients exactly 0 below the target"),
    ("q1_2, q1_3, qb_2, qb_3", "float64 values vs torch's (tolerances 1e-6 and more, differences 1e-16)"),
]


def print_table(rows: list[Row], seconds: float, quick: bool) -> None:
    headers = ("test", "statistic", "threshold", "variant", "kind", "empirical", "estimate", "meets", "note")
    table = [(r.test, r.statistic, r.threshold, r.variant.label, "correct" if r.variant.correct else "wrong",
              r.empirical, _rate(r.estimate), r.meets, r.note) for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(headers)]
    print("\nFairness of the statistical hidden tests: estimate = false-fail rate (correct variant) or miss rate "
          f"(wrong variant); requirements: false fail < {FALSE_FAIL_LIMIT:g}, miss < {MISS_LIMIT:g} (whole-test rows)")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    previous = None
    for row in table:
        if previous is not None and row[0] != previous:
            print()
        previous = row[0]
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print("\nDeterministic (no random draw decides the verdict; not simulated):")
    for test, why in DETERMINISTIC:
        print(f"  {test}: {why}")
    failed = [r for r in rows if r.whole_test and r.meets != "yes"]
    verdict = ("every whole-test row meets its requirement" if not failed else
               "NOT met: " + "; ".join(f"{r.test} / {r.variant.label}" for r in failed))
    print(f"\n{verdict}{' (--quick: too few submissions to resolve any rate)' if quick else ''}; {seconds:.0f} s")


# ------------------------------------------------------------------ main


def tasks_for(scale: float, quick: bool) -> list[tuple]:
    tasks = []
    for kind, variants in VARIANTS.items():
        correct, wrong, chunks = SIZES[kind] if not quick else (2 + 3 * (kind == "matrix"), 2, 1)
        for variant in variants:
            per_chunk = max(2, round((correct if variant.correct else wrong) * scale / chunks))
            for param in range(len(PARAMETERS.get(kind, [None]))):
                for chunk in range(chunks):
                    tasks.append((kind, variant.label, chunk * per_chunk, per_chunk, param))
    # The slowest first (XOR training of the widest networks), so that both workers finish together.
    return sorted(tasks, key=lambda t: (t[0] != "xor", "32-32" not in t[1]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few submissions per variant")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the simulated submissions")
    parser.add_argument("--workers", type=int, default=multiprocessing.cpu_count())
    args = parser.parse_args(argv)
    started = time.perf_counter()
    NODEIDS.update(collected_nodeids())
    tasks = tasks_for(args.scale, args.quick)
    with multiprocessing.get_context("fork").Pool(args.workers) as pool:
        results = pool.map(simulate, tasks, chunksize=1)
    grouped: dict[tuple, list[dict]] = {}
    for task, result in zip(tasks, results):
        grouped.setdefault((task[0], task[1], task[4]), []).append(result)
    rows: list[Row] = []
    for kind, variants in VARIANTS.items():
        for param, value in enumerate(PARAMETERS.get(kind, [None])):
            for variant in variants:
                r = _merge(grouped[(kind, variant.label, param)])
                if kind == "matrix":
                    rows += rows_matrix(variant, r)
                elif kind in WEIGHTS:
                    rows += rows_weights(kind, variant, r)
                elif kind == "xor":
                    rows += rows_xor(variant, r)
                elif kind == "kill":
                    both = [_merge(grouped[(kind, variant.label, p)]) for p in range(len(KILL_ACTIVATIONS))]
                    rows += rows_kill(variant, r, value.__name__.lower(), both)
                else:
                    rows += rows_he(variant, r, value)
    print_table(rows, time.perf_counter() - started, args.quick)


if __name__ == "__main__":
    # Run from the imported module: IPython's shell (made in the workers) replaces sys.modules["__main__"],
    # after which the pool could not find this file's functions by the name "__main__".
    sys.path.insert(0, str(Path(__file__).parent))
    import fairness

    fairness.main()
