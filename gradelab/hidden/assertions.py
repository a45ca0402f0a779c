"""Assertions for hidden tests, with messages the student can read."""

from __future__ import annotations

from typing import Any

import torch

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
    """`value` (an int or a float, not a bool) as a float, else an AssertionError naming it."""
    if type(value) not in (int, float):
        raise AssertionError(f"{what} should be a number, got {wire.describe_value(value)}")
    try:
        return float(value)
    except OverflowError:
        raise AssertionError(f"{what} is an integer too large for a float ({value.bit_length()} bits)") from None


def assert_tensor_close(got: Any, expected: torch.Tensor, what: str, *, atol: float = 1e-6, rtol: float = 1e-5,
                        sample: torch.Tensor | None = None) -> None:
    """Compare here, on plain tensors; the message shows expected vs got on a few elements."""
    expect_tensor(got, what, shape=tuple(expected.shape), floating=True)
    got64, exp64 = got.to(torch.float64), expected.to(torch.float64)
    bad = ~torch.isclose(got64, exp64, atol=atol, rtol=rtol)
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        at = "" if sample is None else f" at input {sample.flatten()[i].item():.4g}"
        raise AssertionError(f"{what} is wrong for {int(bad.sum())} of {bad.numel()} values: "
                             f"e.g. expected {exp64.flatten()[i].item():.6g}, got {got64.flatten()[i].item():.6g}{at}")
