"""Assertions for hidden tests, with messages the student can read."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from gradelab.boundary import wire


def seed_torch(seed: int) -> None:
    """`torch.manual_seed` for hidden tests, which build their models on the CPU: without the lazy
    CUDA/XPU/MTIA seeding, which records a stack trace per call (~1-2 ms deep inside pytest)."""
    torch.default_generator.manual_seed(seed)



def expect_tensor(value: Any, what: str, *, shape: tuple[int, ...] | None = None,
                  floating: bool = False) -> torch.Tensor:
    """`value` if it is a plain tensor (of `shape`; floating-point if asked), else an AssertionError
    that says what `what` is instead: hidden tests check what they rely on before using it."""
    if type(value) is not torch.Tensor:
        raise AssertionError(f"{what} should be a torch.Tensor, got {wire.describe_value(value)}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise AssertionError(f"{what} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    if floating and not value.is_floating_point():
        raise AssertionError(f"{what} has dtype {value.dtype}, expected a floating-point tensor")
    return value


def expect_number(value: Any, what: str) -> float:
    """`value` (an int or a finite float, not a bool) as a float, else an AssertionError naming it."""
    if type(value) not in (int, float):
        raise AssertionError(f"{what} should be a number, got {wire.describe_value(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise AssertionError(f"{what} is an integer too large for a float ({value.bit_length()} bits)") from None
    if not math.isfinite(number):
        raise AssertionError(f"{what} is {number}, not a finite number")
    return number


def largest_magnitude(values: torch.Tensor) -> float:
    """The largest absolute value, or inf when a value is NaN or infinite (0 for no values).
    Every comparison with NaN is false, so "the gradient is zero" written as `not (g.abs() > 0).any()`
    would hold for a NaN gradient; `largest_magnitude(g) == 0` and `< threshold` do not."""
    if values.numel() == 0:
        return 0.0
    if not bool(torch.isfinite(values).all()):
        return math.inf
    return float(values.abs().max())


def expect_finite_parameters(model: nn.Module, what: str) -> None:
    """An AssertionError naming the first parameter of `model` that holds a NaN or an infinity."""
    for name, parameter in model.named_parameters():
        bad = int((~torch.isfinite(parameter.detach())).sum())
        if bad:
            layer, _, kind = name.rpartition(".")
            raise AssertionError(f"{what} has {bad} of {parameter.numel()} {kind} values NaN or infinite "
                                 f"(layer {layer}): weights and biases must be finite numbers")


def assert_tensor_close(got: Any, expected: torch.Tensor, what: str, *, atol: float = 1e-6, rtol: float = 1e-5,
                        sample: torch.Tensor | None = None) -> None:
    """Compare here, on plain tensors; the message shows expected vs got on a few elements."""
    expect_tensor(got, what, shape=tuple(expected.shape), floating=True)
    got64, exp64 = got.to(torch.float64), expected.to(torch.float64)
    # isclose is false for NaN (equal_nan is off), and for an infinity unless the same one is expected.
    bad = ~torch.isclose(got64, exp64, atol=atol, rtol=rtol)
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        at = "" if sample is None else f" at input {sample.flatten()[i].item():.4g}"
        nonfinite = int((~torch.isfinite(got64) & torch.isfinite(exp64)).sum())
        at += f" ({nonfinite} values are NaN or infinite)" if nonfinite else ""
        raise AssertionError(f"{what} is wrong for {int(bad.sum())} of {bad.numel()} values: "
                             f"e.g. expected {exp64.flatten()[i].item():.6g}, got {got64.flatten()[i].item():.6g}{at}")
