"""Reference data for the hidden tests, computed from the reference solutions at release time.

Thresholds come from here, never from numbers typed into a test: the depths of q3_1 are what the
reference code finds.

The file is byte-identical on every CPU, whatever kernels torch picks (its vectorised kernels by
the CPU's instruction set, which ATEN_CPU_CAPABILITY overrides; MKL's code path for matrix
products, which MKL_CBWR overrides), and two releases are byte-identical (fixed seeds, one torch
thread). It holds integers and the threshold, no computed float:
- The dying depths run the reference's own procedure in float32, as a student's notebook does.
  A depth is an integer; it changes only if a median gradient crosses the threshold. Kernel
  choices move those medians by about 3e-6 relative, and the release stops unless the depth is
  the same with the threshold DEPTH_MARGIN (10%) lower and higher: no median is that close to it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gradelab.project import load_reference
from gradelab.release.checks import ReleaseError

DEPTH_ACTIVATIONS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh}  # the activations whose dying depth is recorded
DYING_THRESHOLD = 1e-6
DEPTH_MARGIN = 0.1


def dying_depth(ref, activation: type[nn.Module]) -> int | None:
    """The reference's smallest_dying_depth, refused when a median gradient is near the threshold."""
    with torch.random.fork_rng(devices=[]):
        depths = [ref.smallest_dying_depth(activation(), threshold=DYING_THRESHOLD * factor)
                  for factor in (1 - DEPTH_MARGIN, 1, 1 + DEPTH_MARGIN)]
    if len(set(depths)) > 1:
        raise ReleaseError(
            f"smallest_dying_depth({activation.__name__}()) gives {depths} with the threshold "
            f"{DYING_THRESHOLD:g} lowered by {DEPTH_MARGIN:.0%}, as is and raised by {DEPTH_MARGIN:.0%}: a median "
            f"gradient lies that close to the threshold, where another CPU's float32 kernels could change the "
            f"depth; choose a threshold further from the medians")
    return depths[1]


def compute(solutions_dir: Path) -> dict:
    torch.set_num_threads(1)
    ref = load_reference(solutions_dir)
    depths = {name: dying_depth(ref, activation) for name, activation in DEPTH_ACTIVATIONS.items()}
    return {"dying_depth": depths, "dying_depth_threshold": DYING_THRESHOLD}
