"""Reference renders shared by a worker's submissions.

Drawing a reference figure costs more than most hidden tests (plot_grad's figure: ~50 ms to draw
and encode), and in a class most notebooks hand in the same models: every model of the course's
notebook is built after `torch.manual_seed(0)`, so answers written alike give equal weights. A
render that depends only on data the tests hold (a rebuilt model, fixed arguments) is therefore
kept under a hash of that data and drawn once per worker for equal data.

This is exact memoisation: a hit returns the bytes a miss would have drawn, so no verdict can change.
Renders are made only in test runners T (trusted) from data T computed; a runner's new renders go back to the
supervisor in its `Done` message, and the supervisor hands them to the zygote Z with the next job
(`RunnerJob.renders`); every later runner is forked from Z with them. No file holds them, so
nothing the sandbox can reach can change another student's reference.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Mapping

import numpy as np
import torch

from gradelab.boundary.messages import MAX_RENDER_BYTES, MAX_RENDERS


def content_key(*parts: object) -> str:
    """A sha256 of `parts`: strings, numbers, JSON-able lists and dicts, tensors and arrays (by
    dtype, shape and bytes). Equal keys mean equal inputs, so a render may stand for another."""
    digest = hashlib.sha256()

    def add(part: object) -> None:
        if isinstance(part, torch.Tensor):
            part = part.detach().contiguous().cpu()
            digest.update(f"tensor {part.dtype} {tuple(part.shape)}\0".encode())
            digest.update(part.view(torch.uint8).numpy().tobytes() if part.numel() else b"")
        elif isinstance(part, np.ndarray):
            digest.update(f"array {part.dtype.str} {part.shape}\0".encode())
            digest.update(np.ascontiguousarray(part).tobytes())
        elif isinstance(part, (list, tuple)) and any(isinstance(p, (torch.Tensor, np.ndarray)) for p in part):
            digest.update(f"sequence {len(part)}\0".encode())
            for item in part:
                add(item)
        else:  # plain data; json refuses anything else, so no value is hashed by its repr
            digest.update(f"json {json.dumps(part, sort_keys=True, allow_nan=True)}\0".encode())

    for part in parts:
        add(part)
    return digest.hexdigest()


class RenderCache:
    """Renders by content key, the most recently used MAX_RENDERS of them. In a runner, `made`
    holds the renders it drew itself (what goes back to the supervisor)."""

    def __init__(self, limit: int = MAX_RENDERS) -> None:
        self.limit = limit
        self._renders: OrderedDict[str, bytes] = OrderedDict()
        self.made: dict[str, bytes] = {}

    def __len__(self) -> int:
        return len(self._renders)

    def add(self, renders: Mapping[str, bytes]) -> None:
        for key, png in renders.items():
            self._keep(key, png)

    def get_or_make(self, key: str, make: Callable[[], bytes]) -> bytes:
        """The render kept under `key`, else `make()`'s (kept, and recorded in `made`)."""
        if key in self._renders:
            self._renders.move_to_end(key)
            return self._renders[key]
        png = make()
        if len(png) <= MAX_RENDER_BYTES:  # a larger one is drawn again next time, never refused
            self._keep(key, png)
            if len(self.made) < MAX_RENDERS:
                self.made[key] = png
        return png

    def _keep(self, key: str, png: bytes) -> None:
        self._renders[key] = png
        self._renders.move_to_end(key)
        while len(self._renders) > self.limit:
            self._renders.popitem(last=False)
