"""Capture student figures as plain data, and judge them by what they show.

The module has two halves that run in different processes:

* Capture side (sandbox S, untrusted): `install_recorders` and `capture_figure` turn a live
  matplotlib Figure into a dict of numbers, strings, lists, dicts, bytes and numpy arrays, using
  matplotlib and numpy only.
* Judging side (trusted runner T): `FigureData.from_capture` validates such a dict, and the
  `check_*` functions grade it semantically (violins per layer, their data, axis labels, the
  first/last-layer gradient ratio, line curves) or by pixels (`compare_images`).

Violins are found from the drawn bodies (`PolyCollection`s), never from the student's say-so: the
recorder only attaches the data behind a body that matplotlib's `violinplot` really drew.
"""

from __future__ import annotations

import functools
import inspect
import io
import math
import struct
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import matplotlib as mpl
import numpy as np
from matplotlib import cbook
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.image import imread
from matplotlib.testing.compare import ImageComparisonFailure
from matplotlib.testing.compare import compare_images as mpl_compare_images
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, field_validator, model_validator

# Limits shared by both halves: the capture side truncates to them, the judging side rejects
# anything beyond them (a capture is untrusted input in T).
MAX_POINTS = 10_000  # values per line coordinate, violin dataset or gradient array
MAX_ITEMS = 200  # axes, lines, violins, texts, tick labels or legend entries per container
MAX_TEXT_CHARS = 1_000
MAX_SIDE_PX = 4_000  # longest side of a captured PNG
MAX_PNG_BYTES = 16 << 20

_RECORD_ATTR = "_gradelab_violins"
_RECORDER_MARK = "_gradelab_recorder"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ================================================================ capture side (runs in S)


@dataclass(frozen=True)
class _RecordedViolin:
    """The data matplotlib's violinplot turned into one body, kept next to that body."""

    body: PolyCollection
    data: np.ndarray
    position: float
    orientation: str


def install_recorders() -> None:
    """Wrap `Axes.violinplot` so each body it draws keeps the dataset behind it. Idempotent."""
    original = Axes.violinplot
    if getattr(original, _RECORDER_MARK, False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def violinplot(self: Axes, *args: Any, **kwargs: Any) -> dict:
        result = original(self, *args, **kwargs)  # student-facing behaviour and errors unchanged
        try:
            records = _records_for_call(signature.bind(self, *args, **kwargs), result)
        except (TypeError, ValueError):
            # Recording must never break a call matplotlib accepted (e.g. datetime positions);
            # such bodies are still found by their shape, only without data.
            records = []
        self.__dict__.setdefault(_RECORD_ATTR, []).extend(records)
        return result

    setattr(violinplot, _RECORDER_MARK, True)
    Axes.violinplot = violinplot


def _records_for_call(bound: inspect.BoundArguments, result: dict) -> list[_RecordedViolin]:
    """Pair the datasets of one violinplot call with the bodies it returned."""
    bound.apply_defaults()
    args = bound.arguments
    dataset = args["dataset"]
    if isinstance(dataset, str) and args.get("data") is not None:  # the `data=` keyword form
        dataset = args["data"][dataset]
    # Same reshaping as matplotlib's violin_stats (private, but matplotlib is pinned), so the
    # recorded columns are exactly the ones the bodies were computed from.
    columns = cbook._reshape_2D(dataset, "dataset")
    positions = args["positions"]
    positions = range(1, len(columns) + 1) if positions is None else positions
    orientation = args["orientation"]
    if args.get("vert") is not None:  # deprecated spelling that overrides `orientation`
        orientation = "vertical" if args["vert"] else "horizontal"
    records = []
    for body, column, position in zip(result.get("bodies", []), columns, positions):
        (finite,) = cbook.delete_masked_points(np.asarray(column))  # what the KDE saw
        records.append(_RecordedViolin(body, _distribution_sample(np.asarray(finite, dtype=np.float64)),
                                      float(position), orientation))
    return records


def capture_figure(fig: Figure, *, cell: int, index: int, dpi: int = 80) -> dict:
    """Describe `fig` as plain data; the schema is spelled out where the judging side starts.

    `cell` and `index` say which notebook cell made the figure and which of its figures it is.
    """
    return capture_figure_timed(fig, cell=cell, index=index, dpi=dpi)[0]


def capture_figure_timed(fig: Figure, *, cell: int, index: int, dpi: int = 80) -> tuple[dict, float]:
    """`capture_figure`, and the seconds spent rendering the PNG (the part Jupyter would also pay)."""
    width, height = (float(v) for v in fig.get_size_inches())
    # A student can make a huge figure; lowering the dpi keeps the PNG bounded (and the size
    # mismatch then shows up as a clear failure of the image comparison).
    used_dpi = min(float(dpi), MAX_SIDE_PX / max(width, height, 1e-9))
    started = time.perf_counter()
    png = _render_png(fig, used_dpi)  # also draws the figure, which fills in tick labels
    render_seconds = time.perf_counter() - started
    gradient_data = getattr(fig, "gradient_data", None)
    return {
        "cell": int(cell),
        "index": int(index),
        "helper": "plot_grad" if gradient_data is not None else None,
        "size_inches": [width, height],
        "dpi": used_dpi,
        "suptitle": _text(fig.get_suptitle()),
        "figure_images": len(fig.images),
        "png": png,
        "axes": [_describe_axes(ax) for ax in fig.axes[:MAX_ITEMS]],
        "gradient_data": _describe_gradient_data(gradient_data),
    }, render_seconds


def _render_png(fig: Figure, dpi: float) -> bytes:
    # Savefig settings come from the defaults, not from rcParams a notebook may have changed
    # (e.g. savefig.bbox="tight"), so a student's and the reference's PNG are made alike.
    savefig_defaults = {k: v for k, v in mpl.rcParamsDefault.items() if k.startswith("savefig.")}
    buffer = io.BytesIO()
    with mpl.rc_context(savefig_defaults):
        # zlib level 1: the same pixels, several ms less per figure than the default level 6.
        fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None}, pil_kwargs={"compress_level": 1})
    return buffer.getvalue()


def _describe_axes(ax: Axes) -> dict:
    legend = ax.get_legend()
    return {
        "title": _text(" ".join(t for t in (ax.get_title(loc) for loc in ("center", "left", "right")) if t)),
        "xlabel": _text(ax.get_xlabel()),
        "ylabel": _text(ax.get_ylabel()),
        "xscale": _text(ax.get_xscale()),
        "yscale": _text(ax.get_yscale()),
        "xlim": [float(v) for v in ax.get_xlim()],
        "ylim": [float(v) for v in ax.get_ylim()],
        "xticklabels": [_text(t.get_text()) for t in ax.get_xticklabels()[:MAX_ITEMS]],
        "legend_labels": [_text(t.get_text()) for t in legend.get_texts()[:MAX_ITEMS]] if legend else [],
        "lines": [_describe_line(line) for line in ax.get_lines()[:MAX_ITEMS]],
        "violins": _describe_violins(ax)[:MAX_ITEMS],
        "images": len(ax.images),
        "collections": len(ax.collections),
        "patches": len(ax.patches),
        "texts": [_text(t.get_text()) for t in ax.texts[:MAX_ITEMS]],
    }


def _describe_line(line: Any) -> dict:
    xy = np.asarray(line.get_xydata(), dtype=np.float64)  # after unit conversion (dates, categories)
    if len(xy) > MAX_POINTS:  # keep the curve's shape: evenly spaced points, ends included
        xy = xy[np.linspace(0, len(xy) - 1, MAX_POINTS).round().astype(int)]
    return {"label": _text(line.get_label()), "x": xy[:, 0].copy(), "y": xy[:, 1].copy()}


def _describe_violins(ax: Axes) -> list[dict]:
    recorded = {id(r.body): r for r in ax.__dict__.get(_RECORD_ATTR, [])}
    violins = []
    for collection in ax.collections:
        if not isinstance(collection, PolyCollection):
            continue
        record = recorded.get(id(collection))  # the record keeps its body alive: ids are unique
        for polygon in (p for path in collection.get_paths() for p in path.to_polygons(closed_only=False)):
            polygon = polygon[np.isfinite(polygon).all(axis=1)]
            if len(polygon) == 0:
                continue
            if record is not None:
                violins.append(_violin(polygon, record.position, record.orientation, record.data))
                continue
            for orientation in _orientations(collection):
                centre = _mirror_centre(polygon if orientation == "vertical" else polygon[:, ::-1])
                if centre is not None:
                    violins.append(_violin(polygon, centre, orientation, None))
                    break
    return violins


def _orientations(collection: PolyCollection) -> tuple[str, ...]:
    """Orientations to try for a body: a violin with a symmetric profile is mirror-symmetric both
    ways, so the drawing call decides when known (fill_betweenx's bodies run along y)."""
    direction = getattr(collection, "t_direction", None)  # set by fill_between / fill_betweenx
    if direction is not None:
        return ("vertical",) if direction == "y" else ("horizontal",)
    return ("vertical", "horizontal")


def _violin(polygon: np.ndarray, position: float, orientation: str, data: np.ndarray | None) -> dict:
    values = polygon[:, 1] if orientation == "vertical" else polygon[:, 0]
    return {"position": float(position), "orientation": orientation,
            "value_min": float(values.min()), "value_max": float(values.max()), "data": data}


def _mirror_centre(points: np.ndarray, rel_tol: float = 1e-3) -> float | None:
    """x of the vertical line a fill_betweenx-style body is mirror-symmetric about, else None.

    fill_betweenx(y, c - w, c + w) puts both sides' vertices on the same y values, so grouping
    vertices by y and checking each group's midpoint is exact and O(n log n). A body whose width
    never varies (a rectangle, e.g. a shaded band) is not a violin.
    """
    order = np.lexsort((points[:, 0], points[:, 1]))
    x, y = points[order, 0], points[order, 1]
    starts = np.flatnonzero(np.r_[True, y[1:] != y[:-1]])
    if len(starts) < 3:
        return None
    ends = np.r_[starts[1:], len(y)] - 1
    left, right = x[starts], x[ends]
    width = right.max() - left.min()
    if not width > 0:
        return None
    centre = (left.min() + right.max()) / 2
    half_widths = (right - left) / 2
    symmetric = np.all(np.abs((left + right) / 2 - centre) <= rel_tol * width)
    varies = half_widths.max() - half_widths.min() > rel_tol * width
    return float(centre) if symmetric and varies else None


def _describe_gradient_data(gradient_data: object) -> dict[str, np.ndarray] | None:
    """plot_grad's `fig.gradient_data`, for the record; the judge relies on the drawn violins."""
    if not isinstance(gradient_data, dict):
        return None
    described = {}
    for name, values in list(gradient_data.items())[:MAX_ITEMS]:
        try:
            array = np.asarray(values, dtype=np.float64).ravel()
        except (TypeError, ValueError):  # a student may overwrite the attribute with anything
            return None
        described[_text(name)] = _distribution_sample(array)
    return described


def _distribution_sample(values: np.ndarray) -> np.ndarray:
    """The values, or MAX_POINTS evenly spaced order statistics of them (min and max kept).

    A violin shows a distribution, so order does not matter but the extremes do.
    """
    if len(values) <= MAX_POINTS:
        return values.copy()
    return np.sort(values)[np.linspace(0, len(values) - 1, MAX_POINTS).round().astype(int)]


def _text(value: object) -> str:
    return str(value)[:MAX_TEXT_CHARS]


# ================================================================ judging side (runs in T)
#
# Capture dict schema (what `capture_figure` returns and `FigureData.from_capture` accepts):
#   cell: int, index: int, helper: "plot_grad" | None, size_inches: [w, h], dpi: float,
#   suptitle: str, figure_images: int, png: bytes (PNG), gradient_data: {str: array} | None,
#   axes: [ {title, xlabel, ylabel, xscale, yscale: str, xlim, ylim: [lo, hi],
#            xticklabels, legend_labels, texts: [str], images, collections, patches: int,
#            lines: [{label: str, x: array, y: array}],
#            violins: [{position: float, orientation: "vertical" | "horizontal",
#                       value_min: float, value_max: float, data: array | None}]} ]
# Arrays are 1-D numeric numpy arrays (lists of numbers are accepted too) of at most MAX_POINTS.

def _float_array(value: object) -> np.ndarray:
    if isinstance(value, list) and all(type(v) in (int, float) for v in value):
        value = np.asarray(value, dtype=np.float64)
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
        raise ValueError(f"expected a numeric numpy array, got {type(value).__name__}"
                         + (f" of dtype {value.dtype}" if isinstance(value, np.ndarray) else ""))
    if value.ndim != 1:
        raise ValueError(f"expected a 1-D array, got shape {value.shape}")
    if value.size > MAX_POINTS:
        raise ValueError(f"array of {value.size} values exceeds the limit of {MAX_POINTS}")
    return value.astype(np.float64)


FloatArray = Annotated[np.ndarray, BeforeValidator(_float_array)]
Text = Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]
Count = Annotated[int, Field(ge=0)]
Pair = Annotated[list[float], Field(min_length=2, max_length=2)]


class _Plain(BaseModel):
    # Strict: a capture is untrusted input, so nothing is coerced ("1" is not a cell number).
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, arbitrary_types_allowed=True)


class LineData(_Plain):
    label: Text
    x: FloatArray
    y: FloatArray

    @model_validator(mode="after")
    def _same_length(self) -> LineData:
        if len(self.x) != len(self.y):
            raise ValueError(f"line {self.label!r} has {len(self.x)} x values but {len(self.y)} y values")
        return self


class ViolinData(_Plain):
    position: float
    orientation: Literal["vertical", "horizontal"]
    value_min: float
    value_max: float
    data: FloatArray | None

    @model_validator(mode="after")
    def _finite(self) -> ViolinData:
        # The capture only records finite values (as matplotlib's KDE uses); NaN would poison every ratio.
        if not all(map(math.isfinite, (self.position, self.value_min, self.value_max))):
            raise ValueError("violin position and extent must be finite numbers")
        if self.value_min > self.value_max:
            raise ValueError(f"violin extent [{self.value_min}, {self.value_max}] is reversed")
        if self.data is not None and (len(self.data) == 0 or not np.isfinite(self.data).all()):
            raise ValueError("violin data must be non-empty and finite")
        return self


class AxesData(_Plain):
    title: Text
    xlabel: Text
    ylabel: Text
    xscale: Text
    yscale: Text
    xlim: Pair
    ylim: Pair
    xticklabels: Annotated[list[Text], Field(max_length=MAX_ITEMS)]
    legend_labels: Annotated[list[Text], Field(max_length=MAX_ITEMS)]
    lines: Annotated[list[LineData], Field(max_length=MAX_ITEMS)]
    violins: Annotated[list[ViolinData], Field(max_length=MAX_ITEMS)]
    images: Count
    collections: Count
    patches: Count
    texts: Annotated[list[Text], Field(max_length=MAX_ITEMS)]


class FigureData(_Plain):
    """A captured figure, validated: what T knows about a figure a student made in S."""

    cell: Count
    index: Count
    helper: Literal["plot_grad"] | None
    size_inches: Pair
    dpi: Annotated[float, Field(gt=0)]
    suptitle: Text
    figure_images: Count
    png: Annotated[bytes, Field(max_length=MAX_PNG_BYTES)]
    axes: Annotated[list[AxesData], Field(max_length=MAX_ITEMS)]
    gradient_data: Annotated[dict[Text, FloatArray], Field(max_length=MAX_ITEMS)] | None
    # The notebook variables that held the figure when its cell ended (added by the executor).
    names: Annotated[list[Text], Field(max_length=MAX_ITEMS)] = []

    @field_validator("png")
    @classmethod
    def _png(cls, png: bytes) -> bytes:
        _png_size(png)  # raises with a clear message on a non-PNG or oversized image
        return png

    @classmethod
    def from_capture(cls, capture: object) -> FigureData:
        """Validate a capture dict; raises pydantic.ValidationError (a ValueError) naming the bad field."""
        return cls.model_validate(capture)

    @property
    def has_images(self) -> bool:
        return self.figure_images > 0 or any(ax.images for ax in self.axes)

    @property
    def n_violins(self) -> int:
        axes = _violin_axes(self)
        return len(axes.violins) if axes else 0


class PlotVerdict(BaseModel):
    """Outcome of a plot check: `problems` are messages for the student, `details` plain numbers."""

    ok: bool
    problems: list[str]
    details: dict[str, Any] = Field(default_factory=dict)


def figures_in_cell(figures: Sequence[FigureData], cell: int) -> list[FigureData]:
    return [f for f in figures if f.cell == cell]


def find_gradient_plot(figures: Sequence[FigureData], *, cell: int | None = None,
                       expected_violins: int | None = None) -> FigureData | None:
    """The figure most likely meant as the gradient plot, or None if there is no figure at all.

    Preference: made by plot_grad, then with the expected number of violins, then with any
    violins; ties go to the latest figure (a re-run cell's last plot). A figure without violins is
    still returned, so that check_gradient_plot can say what is wrong with it.
    """
    candidates = figures_in_cell(figures, cell) if cell is not None else list(figures)
    if not candidates:
        return None
    return max(candidates, key=lambda f: (f.helper == "plot_grad", f.n_violins == expected_violins,
                                          f.n_violins > 0, f.cell, f.index))


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


def _png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from the PNG header, checked before anything decodes the image."""
    if not png.startswith(_PNG_SIGNATURE) or len(png) < 24 or png[12:16] != b"IHDR":
        raise ValueError("the figure image is not a PNG")
    width, height = struct.unpack(">II", png[16:24])
    if not (0 < width <= MAX_SIDE_PX and 0 < height <= MAX_SIDE_PX):
        raise ValueError(f"the figure image is {width}x{height} px; at most {MAX_SIDE_PX} px a side is allowed")
    return width, height


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
    student_size, reference_size = _png_size(student_png), _png_size(reference_png)
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


def side_by_side(student_png: bytes, reference_png: bytes) -> bytes:
    """One PNG showing the student's figure next to the reference, for feedback and review pages."""
    for png in (student_png, reference_png):
        _png_size(png)  # refuse oversized or non-PNG data before decoding it
    images = [imread(io.BytesIO(png), format="png") for png in (student_png, reference_png)]
    dpi, gap, title_room = 100, 20, 40  # pixels between the images and above them for the titles
    width = sum(image.shape[1] for image in images) + gap
    height = max(image.shape[0] for image in images) + title_room
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(fig)  # a standalone figure: pyplot's global state is left alone
    left = 0
    for image, title in zip(images, ("your figure", "reference")):
        # One axes per image, sized to it in pixels, so the figures are shown unscaled.
        rows, cols = image.shape[:2]
        ax = fig.add_axes((left / width, (height - title_room - rows) / height, cols / width, rows / height))
        ax.imshow(image, interpolation="none")
        ax.set_title(title)
        ax.set_axis_off()
        left += cols + gap
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()
