"""What the hidden tests judge random draws with: assert_distribution's thresholds and messages,
and the sandbox's redraw of a notebook cell."""

from __future__ import annotations

import math
import types

import pytest
import torch

from gradelab.boundary.messages import RedrawRequest
from gradelab.sandbox.rpc import RpcServer
from gradelab.hidden.distributions import Normal, Uniform, assert_distribution, distribution_checks

GLOROT = Normal(0.0, 0.5**0.5)
UNIFORM = Uniform(-1.0, 1.0)


def _binomial_outside(n: int, p: float, fewest: int, most: int) -> tuple[float, float]:
    pmf = [math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
    return sum(pmf[:fewest]), sum(pmf[most + 1:])


@pytest.mark.parametrize("expected, n", [(UNIFORM, 320), (GLOROT, 400), (Normal(3.0, 2.0), 1000)])
def test_the_checks_spend_alpha_and_no_more(expected, n):
    checks = distribution_checks(expected, n, 1e-6)
    assert math.isclose(sum(c.rate for c in checks), 1e-6)
    for check in checks:
        if check.statistic == "smallest":  # no value within reach of the low end: exactly the rate
            reach = (check.high - expected.low) / (expected.high - expected.low)
            assert math.isclose((1 - reach) ** n, check.rate)
        if check.statistic == "tail":  # the count beyond 2 standard deviations is binomial
            p = math.erfc(2 / math.sqrt(2))
            below, above = _binomial_outside(n, p, round(check.low * n), round(check.high * n))
            assert below <= check.rate / 2 and above <= check.rate / 2
        typical = {"mean": expected.mean, "spread": expected.std, "tail": math.erfc(2 / math.sqrt(2))}
        if check.statistic in typical:  # what the expected distribution gives on average lies inside
            assert check.low < typical[check.statistic] < check.high


def test_normal_spread_interval_is_within_the_chi_square_rate():
    # n * spread^2 / std^2 is chi-square with n degrees of freedom: its Wilson-Hilferty normal
    # approximation (accurate to about 1% here) puts each side near a quarter of the check's rate.
    n = 400
    check = next(c for c in distribution_checks(GLOROT, n) if c.statistic == "spread")
    for bound, side in ((check.low, -1), (check.high, 1)):
        cube = ((bound / GLOROT.std) ** 2) ** (1 / 3)
        z = (cube - (1 - 2 / (9 * n))) / math.sqrt(2 / (9 * n))
        tail = 0.5 * math.erfc(side * z / math.sqrt(2))
        assert check.rate / 8 < tail < check.rate / 2, (bound, tail, check.rate)


def test_correct_samples_pass():
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        assert_distribution(torch.rand(320, generator=generator) * 2 - 1, UNIFORM, what="w")
        assert_distribution(torch.randn(400, generator=generator) * GLOROT.std, GLOROT, what="w")


def _message(values, expected, **kwargs) -> str:
    with pytest.raises(AssertionError) as failed:
        assert_distribution(values, expected, what="build_model's weights", **kwargs)
    return str(failed.value)


def test_wrong_samples_fail_with_what_was_found():
    generator = torch.Generator().manual_seed(1)
    zero_one = _message(torch.rand(320, generator=generator), UNIFORM, hints={"smallest": "is the range [0, 1]?"})
    assert zero_one.startswith("the smallest of build_model's weights is 0.0")
    assert zero_one.endswith(": is the range [0, 1]?")
    assert "320 values drawn uniformly from [-1, 1] have one below -0.907" in zero_one
    outside = _message(torch.randn(320, generator=generator), UNIFORM)
    assert "never leave [-1, 1]" in outside
    same_spread_uniform = (torch.rand(400, generator=generator) * 2 - 1) * math.sqrt(3) * GLOROT.std
    assert _message(same_spread_uniform, GLOROT).startswith("0.0% of build_model's weights lie more than 2 standard")
    too_wide = _message(torch.randn(400, generator=generator), GLOROT)
    assert too_wide.startswith("the spread of build_model's weights") and "(standard deviation 0.707)" in too_wide
    assert _message(torch.tensor([0.1, float("nan")]), GLOROT) == "1 of build_model's weights are not finite numbers"


def _server(namespace: dict, sources: dict[int, str]) -> RpcServer:
    runner = types.SimpleNamespace(shell=types.SimpleNamespace(user_ns=namespace, transform_cell=lambda source: source),
                                   sources=sources, seed=0)
    return RpcServer(runner, sock=None)


def test_redraw_runs_a_cell_again_with_other_seeds_and_leaves_the_notebook_alone():
    namespace = {"torch": torch}
    exec("A = torch.rand(3)\nc = A.sum()", namespace)  # noqa: S102 - the cell as the notebook ran it
    original = namespace["A"].clone()
    server = _server(namespace, {4: "A = torch.rand(3)\nc = A.sum()"})

    reply = server.handle(RedrawRequest(op="redraw", seed=1, cell=4, names=["A", "c"], seeds=[10, 11, 10]))
    assert reply.ok, reply
    (a10, c10), (a11, _), (again, _) = reply.value
    assert torch.equal(a10, again) and not torch.equal(a10, a11)
    assert torch.equal(c10, a10.sum())
    assert torch.equal(namespace["A"], original) and torch.equal(namespace["c"], original.sum())

    missing = server.handle(RedrawRequest(op="redraw", seed=1, cell=5, names=["A"], seeds=[1]))
    assert not missing.ok and "cell 5 was not run" in missing.error.message
