"""Figure capture in the sandbox S: `install_recorders` makes matplotlib's violinplot keep the data
behind each body it draws, and `capture_figure` turns a live Figure into the plain dict described
in `gradelab.boundary.figures` (numbers, strings, lists, dicts, bytes and numpy arrays, using
matplotlib and numpy only), which the trusted side validates into a `FigureData`.

Violins are found from the drawn bodies (`PolyCollection`s), never from the student's say-so: the
recorder only attaches the data behind a body that matplotlib's `violinplot` really drew.
"""

from __future__ import annotations

import functools
import inspect
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib import cbook
from matplotlib.axes import Axes
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure

from gradelab.boundary.figures import CAPTURE_DPI, MAX_ITEMS, MAX_POINTS, MAX_SIDE_PX, MAX_TEXT_CHARS, render_png

_RECORD_ATTR = "_gradelab_violins"
_RECORDER_MARK = "_gradelab_recorder"


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


def capture_figure(fig: Figure, *, cell: int, index: int, dpi: float = CAPTURE_DPI) -> dict:
    """Describe `fig` as plain data; the schema is in gradelab.boundary.figures.

    `cell` and `index` say which notebook cell made the figure and which of its figures it is.
    """
    return capture_figure_timed(fig, cell=cell, index=index, dpi=dpi)[0]


def capture_figure_timed(fig: Figure, *, cell: int, index: int, dpi: float = CAPTURE_DPI) -> tuple[dict, float]:
    """`capture_figure`, and the seconds spent rendering the PNG (the part Jupyter would also pay)."""
    width, height = (float(v) for v in fig.get_size_inches())
    # A student can make a huge figure; lowering the dpi keeps the PNG bounded (and the size
    # mismatch then shows up as a clear failure of the image comparison).
    used_dpi = min(float(dpi), MAX_SIDE_PX / max(width, height, 1e-9))
    started = time.perf_counter()
    png = render_png(fig, used_dpi)  # also draws the figure, which fills in tick labels
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
