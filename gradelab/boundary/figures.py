"""A captured figure as both sides see it: the typed records the trusted side validates a capture
into, their size limits, and the PNG rendering both sides use (the sandbox for a student's figure,
the hidden tests for the reference figure), so the two PNGs are made alike.

Capture dict schema (what `gradelab.sandbox.capture.capture_figure` returns and
`FigureData.from_capture` accepts):
  cell: int, index: int, helper: "plot_grad" | None, size_inches: [w, h], dpi: float,
  suptitle: str, figure_images: int, png: bytes (PNG), gradient_data: {str: array} | None,
  axes: [ {title, xlabel, ylabel, xscale, yscale: str, xlim, ylim: [lo, hi],
           xticklabels, legend_labels, texts: [str], images, collections, patches: int,
           lines: [{label: str, x: array, y: array}],
           violins: [{position: float, orientation: "vertical" | "horizontal",
                      value_min: float, value_max: float, data: array | None}]} ]
Arrays are 1-D numeric numpy arrays (lists of numbers are accepted too) of at most MAX_POINTS.
"""

from __future__ import annotations

import io
import math
import struct
from typing import Annotated, Literal

import matplotlib as mpl
import numpy as np
from matplotlib.figure import Figure
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, field_validator, model_validator

# Limits shared by both sides: the capture side truncates to them, the judging side rejects
# anything beyond them (a capture is untrusted input in T).
MAX_POINTS = 10_000  # values per line coordinate, violin dataset or gradient array
MAX_ITEMS = 200  # axes, lines, violins, texts, tick labels or legend entries per container
MAX_TEXT_CHARS = 1_000
MAX_SIDE_PX = 4_000  # longest side of a captured PNG
MAX_PNG_BYTES = 16 << 20
CAPTURE_DPI = 80  # of every captured figure, and of the reference figures it is compared with

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def render_png(fig: Figure, dpi: float) -> bytes:
    """`fig` as PNG bytes at `dpi` (also draws the figure, which fills in tick labels)."""
    # Savefig settings come from the defaults, not from rcParams a notebook may have changed
    # (e.g. savefig.bbox="tight"), so a student's and the reference's PNG are made alike.
    savefig_defaults = {k: v for k, v in mpl.rcParamsDefault.items() if k.startswith("savefig.")}
    buffer = io.BytesIO()
    with mpl.rc_context(savefig_defaults):
        # zlib level 1: the same pixels, several ms less per figure than the default level 6.
        fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None}, pil_kwargs={"compress_level": 1})
    return buffer.getvalue()


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from the PNG header, checked before anything decodes the image."""
    if not png.startswith(PNG_SIGNATURE) or len(png) < 24 or png[12:16] != b"IHDR":
        raise ValueError("the figure image is not a PNG")
    width, height = struct.unpack(">II", png[16:24])
    if not (0 < width <= MAX_SIDE_PX and 0 < height <= MAX_SIDE_PX):
        raise ValueError(f"the figure image is {width}x{height} px; at most {MAX_SIDE_PX} px a side is allowed")
    return width, height


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
        png_size(png)  # raises with a clear message on a non-PNG or oversized image
        return png

    @classmethod
    def from_capture(cls, capture: object) -> FigureData:
        """Validate a capture dict; raises pydantic.ValidationError (a ValueError) naming the bad field."""
        return cls.model_validate(capture)

    @property
    def has_images(self) -> bool:
        return self.figure_images > 0 or any(ax.images for ax in self.axes)
