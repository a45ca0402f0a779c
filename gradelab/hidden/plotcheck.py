"""Judging captured figures in the trusted runner T, by what they show: violins per layer, their
data, axis labels, line curves (`check_*`), or by pixels (`compare_images`). The figures arrive as
`FigureData`, validated from the sandbox's capture dicts (gradelab.boundary.figures).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from matplotlib.testing.compare import ImageComparisonFailure
from matplotlib.testing.compare import compare_images as mpl_compare_images
from pydantic import BaseModel, Field

from gradelab.boundary.figures import AxesData, FigureData, LineData, ViolinData, png_size


class PlotVerdict(BaseModel):
    """Outcome of a plot check: `problems` are messages for the student, `details` plain numbers."""

    ok: bool
    problems: list[str]
    details: dict[str, Any] = Field(default_factory=dict)


def figures_in_cell(figures: Sequence[FigureData], cell: int) -> list[FigureData]:
    return [f for f in figures if f.cell == cell]


def _violin_axes(fig: FigureData) -> AxesData | None:
    """The subplot holding the violins: the first one with the most."""
    with_violins = [ax for ax in fig.axes if ax.violins]
    return max(with_violins, key=lambda ax: len(ax.violins)) if with_violins else None


def _ordered_violins(fig: FigureData) -> list[ViolinData]:
    axes = _violin_axes(fig)
    return sorted(axes.violins, key=lambda v: v.position) if axes else []


def _magnitude(values: np.ndarray) -> float:
    return float(np.max(np.abs(values)))


# Added to a layer's tolerance so that a layer whose gradients are all zero (a dead ReLU layer)
# still matches a violin of zeros; far below any gradient magnitude that matters here.
ZERO_GRADIENT_SLACK = 1e-12


def violin_spreads(fig: FigureData) -> list[float]:
    """Per-violin gradient magnitude, ordered by position: the largest absolute value shown.

    The largest |value| is used (not e.g. the median) because it can be read equally from the
    recorded data and from a body alone: matplotlib's violin spans exactly the data's min..max.
    """
    return [_magnitude(v.data) if v.data is not None else max(abs(v.value_min), abs(v.value_max))
            for v in _ordered_violins(fig)]


def _failed(problem: str) -> PlotVerdict:
    return PlotVerdict(ok=False, problems=[problem])


def _empty_figure(fig: FigureData, *, what: str, hint: str) -> PlotVerdict:
    """Verdict for a figure without the expected content: a pasted image gets its own message."""
    if fig.has_images:
        return _failed(f"the figure shows a pasted image, not a plot of {what}")
    return _failed(hint)


def check_gradient_plot(fig: FigureData | None, *, expected_violins: int,
                        expected_grads: Mapping[str, np.ndarray] | None = None,
                        rtol: float = 0.01) -> PlotVerdict:
    """Judge a gradient violin plot.

    Checks, each with its own message: a figure exists; it is a plot, not a pasted image; it has
    `expected_violins` violins; both axes are labelled. When the violin count is right, also: each
    violin shows the matching layer of `expected_grads` (gradients recomputed in T from the
    student's model, same seed; tolerance `rtol` x the layer's largest |gradient|).

    Nothing here is random, so a correct plot always passes. (Whether the gradients themselves look
    like the reference's is not judged: one model's first/last gradient ratio varies so much from
    seed to seed that a band wide enough for every correct model lets every wrong one through.)
    """
    if fig is None:
        return _failed("no figure was produced")
    violins = _ordered_violins(fig)
    if not violins:
        return _empty_figure(fig, what="your model's gradients",
                             hint="the figure has no violins: draw the gradients with plot_grad(model)")
    problems = []
    spreads = violin_spreads(fig)
    details: dict[str, Any] = {"violins": len(violins), "spreads": spreads}
    axes = _violin_axes(fig)
    unlabelled = [name for name, label in (("x", axes.xlabel), ("y", axes.ylabel)) if not label.strip()]
    if unlabelled:
        missing = "the x and y axes have no labels" if len(unlabelled) == 2 else f"the {unlabelled[0]} axis has no label"
        problems.append(f"{missing}; say what each axis shows (e.g. 'Layer' and 'Gradient values')")
    if len(violins) != expected_violins:
        problems.append(f"the plot has {len(violins)} violins; expected {expected_violins}, "
                        "one per weight matrix (Linear layer) of the model")
        # Which violin is which layer is unknown now, so the data checks below cannot run.
        return PlotVerdict(ok=False, problems=problems, details=details)
    if expected_grads is not None:
        mismatches = _gradient_mismatches(violins, expected_grads, rtol)
        details["mismatched_layers"] = [name for name, _ in mismatches]
        if mismatches:
            problems.append(f"{len(mismatches)} of {len(violins)} violins do not show the gradients of the "
                            f"model your code builds ({'; '.join(m for _, m in mismatches)}); the plot seems "
                            "to be of a different model, or of gradients from a different pass")
    return PlotVerdict(ok=not problems, problems=problems, details=details)


def _gradient_mismatches(violins: Sequence[ViolinData], expected_grads: Mapping[str, np.ndarray],
                         rtol: float) -> list[tuple[str, str]]:
    """(layer name, description) for each violin that does not show that layer's gradients.

    With recorded data every value is compared (in sorted order: a violin has no order); with a
    body alone, its extent is compared with the gradients' min and max.
    """
    if len(expected_grads) != len(violins):
        raise ValueError(f"expected_grads has {len(expected_grads)} layers for {len(violins)} violins")
    mismatches = []
    for number, (violin, (name, grads)) in enumerate(zip(violins, expected_grads.items()), start=1):
        grads = np.asarray(grads, dtype=np.float64).ravel()
        tolerance = rtol * _magnitude(grads) + ZERO_GRADIENT_SLACK
        if violin.data is not None:
            shown = np.sort(violin.data)
            matches = len(shown) == len(grads) and np.allclose(shown, np.sort(grads), rtol=0, atol=tolerance)
        else:
            shown = np.array([violin.value_min, violin.value_max])
            matches = np.allclose(shown, [grads.min(), grads.max()], rtol=0, atol=tolerance)
        if not matches:
            mismatches.append((name, f"violin {number} spans {shown.min():.3g} to {shown.max():.3g}, "
                                     f"layer {name!r} has gradients from {grads.min():.3g} to {grads.max():.3g}"))
    return mismatches


def check_line_plot(fig: FigureData | None, expected: Mapping[str, tuple[Any, Any]], *, atol: float,
                    min_coverage: float = 0.95) -> PlotVerdict:
    """Judge a line plot: every expected curve (name -> (x, y), names as the student reads them,
    e.g. "sigmoid's gradient") is drawn by a line of its own, in any order, colour or subplot.

    A line matches a curve when it spans at least `min_coverage` of the curve's x values and,
    interpolated there, stays within `atol` of it; so the student's x grid may differ.
    """
    if fig is None:
        return _failed("no figure was produced")
    lines = [line for ax in fig.axes for line in ax.lines]
    if not lines:
        return _empty_figure(fig, what="the requested curves",
                             hint="the figure has no lines: draw each curve with plot(x, y)")
    curves = {name: (np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel())
              for name, (x, y) in expected.items()}
    fits = {name: [_fit(line, x, y) for line in lines] for name, (x, y) in curves.items()}
    candidates = [[i for i, fit in enumerate(fits[name]) if fit.coverage >= min_coverage and fit.error <= atol]
                  for name in curves]
    assignment = _match(candidates)
    names = list(curves)
    problems = []
    for curve, (name, line_index) in enumerate(zip(names, assignment)):
        if line_index is None:
            problems.append(_unmatched_curve(name, curves[name][0], lines, fits[name], candidates[curve],
                                             {line: names[c] for c, line in enumerate(assignment) if line is not None},
                                             atol=atol, min_coverage=min_coverage))
    details = {"lines": len(lines),
               "matched": {name: _line_name(lines[i]) for name, i in zip(names, assignment) if i is not None}}
    return PlotVerdict(ok=not problems, problems=problems, details=details)


@dataclass(frozen=True)
class _Fit:
    """How well one line follows one expected curve."""

    coverage: float  # fraction of the curve's x values within the line's x range
    error: float  # largest |line - curve| over those x values; inf when there are none
    span: tuple[float, float]  # the line's x range


def _fit(line: LineData, x: np.ndarray, y: np.ndarray) -> _Fit:
    finite = np.isfinite(line.x) & np.isfinite(line.y)
    order = np.argsort(line.x[finite], kind="stable")
    line_x, line_y = line.x[finite][order], line.y[finite][order]
    if len(line_x) < 2:
        return _Fit(0.0, math.inf, (math.nan, math.nan))
    inside = (x >= line_x[0]) & (x <= line_x[-1])
    error = float(np.max(np.abs(np.interp(x[inside], line_x, line_y) - y[inside]))) if inside.any() else math.inf
    return _Fit(float(inside.mean()), error, (float(line_x[0]), float(line_x[-1])))


def _unmatched_curve(name: str, x: np.ndarray, lines: Sequence[LineData], fits: Sequence[_Fit],
                     candidates: Sequence[int], shown_by: Mapping[int, str], *, atol: float,
                     min_coverage: float) -> str:
    """Why no line shows the curve `name`, naming the line that comes closest."""
    if candidates:  # a matching line exists but shows another, identical expected curve
        return (f"the {name} needs a line of its own; {_line_name(lines[candidates[0]])} already shows "
                f"the {shown_by[candidates[0]]}")
    wanted = f"x from {x.min():g} to {x.max():g}"
    short = [i for i, fit in enumerate(fits) if fit.error <= atol]
    if short:
        low, high = fits[short[0]].span
        return f"{_line_name(lines[short[0]])} shows the {name} only for x from {low:g} to {high:g}; draw it over {wanted}"
    covering = [i for i, fit in enumerate(fits) if fit.coverage >= min_coverage]
    if not covering:
        return f"no line in the plot shows the {name} over {wanted}"
    closest = min(covering, key=lambda i: fits[i].error)
    return (f"no line in the plot shows the {name}; the closest ({_line_name(lines[closest])}) "
            f"is off by up to {fits[closest].error:.3g}")


def _line_name(line: LineData) -> str:
    # matplotlib names unlabelled lines "_child0", "_line1", ...: not something to show a student
    return "an unlabelled line" if line.label.startswith("_") or not line.label else f"the line {line.label!r}"


def _match(candidates: list[list[int]]) -> list[int | None]:
    """A maximum matching of curves to distinct lines (Kuhn's augmenting paths): two identical
    expected curves, e.g. autograd's gradient and the hand-written one, need two lines."""
    owner: dict[int, int] = {}  # line -> curve

    def claim(curve: int, seen: set[int]) -> bool:
        for line in candidates[curve]:
            if line not in seen:
                seen.add(line)
                if line not in owner or claim(owner[line], seen):
                    owner[line] = curve
                    return True
        return False

    for curve in range(len(candidates)):
        claim(curve, set())
    assigned: list[int | None] = [None] * len(candidates)
    for line, curve in owner.items():
        assigned[curve] = line
    return assigned



class ImageComparison(NamedTuple):
    passed: bool
    rms: float  # root mean square pixel difference, 0-255 scale; inf when sizes differ
    diff_png: bytes | None  # matplotlib's difference image, only when the comparison failed
    message: str  # empty when passed


def compare_images(student_png: bytes, reference_png: bytes, tol: float) -> ImageComparison:
    """Pixel comparison with matplotlib's compare_images (RMS within `tol`, 0-255 scale).

    Figures of different pixel sizes cannot be compared (matplotlib does not resize): that is a
    failure with its own message, not an exception.
    """
    student_size, reference_size = png_size(student_png), png_size(reference_png)
    # The same bytes decode to the same pixels, which matplotlib passes at any tolerance: the usual
    # case (both sides render plot_grad's figure with render_png), at no decoding cost.
    if student_png == reference_png:
        return ImageComparison(True, 0.0, None, "")
    if student_size != reference_size:
        return ImageComparison(False, math.inf, None,
                               f"figure size differs: yours is {student_size[0]}x{student_size[1]} px, "
                               f"the reference {reference_size[0]}x{reference_size[1]} px")
    with tempfile.TemporaryDirectory(prefix="gradelab-compare-") as tmp:
        student, reference = Path(tmp, "student.png"), Path(tmp, "reference.png")
        student.write_bytes(student_png)
        reference.write_bytes(reference_png)
        # tol=0 makes matplotlib report the RMS of any non-identical pair (it returns None only for
        # identical images); the caller's tolerance is applied here.
        try:
            result = mpl_compare_images(str(reference), str(student), tol=0, in_decorator=True)
        except ImageComparisonFailure as exc:  # same size but e.g. only one has transparency
            return ImageComparison(False, math.inf, None, f"the figures cannot be compared pixel by pixel: {exc}")
        except (OSError, ValueError, SyntaxError) as exc:  # a PNG header on data that does not decode
            return ImageComparison(False, math.inf, None, f"the figure's image cannot be read: {exc}")
        if result is None:
            return ImageComparison(True, 0.0, None, "")
        rms = float(result["rms"])
        if rms <= tol:
            return ImageComparison(True, rms, None, "")
        return ImageComparison(False, rms, Path(result["diff"]).read_bytes(),
                               f"the figure differs from the reference: RMS pixel difference {rms:.2f} "
                               f"exceeds the tolerance {tol:g}")

