"""Reference data for the hidden tests, computed from the reference solutions at release time.

Thresholds come from here, never from numbers typed into a test: the gradient bands of the plot
questions are what the reference models produce over many seeds, and the depths of q3_1 are what
the reference code finds. Fixed seeds and one torch thread make the file byte-identical across
releases on one machine.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import torch
from torch import nn

BAND_SEEDS = range(2000)
# A correct student model is one more draw from this distribution: the band is nearly the whole
# range of 2000 reference draws, widened by a factor of 2 each way, so that a correct answer
# falls outside it far less often than 1 time in 1000 (a band that rejects 1 correct answer in
# 25 is not a fair grade). A wrong model (another activation, the wrong plot) still lands far away.
BAND_QUANTILES = (0.0005, 0.9995)
BAND_MARGIN = math.log10(2.0)
ACTIVATIONS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}


def load_reference(solutions_dir: Path):
    """Import the extracted reference module (and the helpers beside it)."""
    if str(solutions_dir) not in sys.path:
        sys.path.insert(0, str(solutions_dir))
    spec = importlib.util.spec_from_file_location("reference_solutions", solutions_dir / "reference_solutions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compute(solutions_dir: Path) -> dict:
    from gradelab import plots

    torch.set_num_threads(1)
    ref = load_reference(solutions_dir)
    bands = {}
    for init, build in (("uniform", ref.build_model), ("glorot", ref.build_model_glorot)):
        for name, activation in ACTIVATIONS.items():
            band = plots.reference_band(build, activation(), seeds=BAND_SEEDS, quantiles=BAND_QUANTILES,
                                        description=f"a {name} network with {init} initialisation")
            band["log10_ratio_low"] -= BAND_MARGIN
            band["log10_ratio_high"] += BAND_MARGIN
            bands[f"{name}_{init}"] = band
    with torch.random.fork_rng():
        depths = {name: ref.smallest_dying_depth(ACTIVATIONS[name]()) for name in ("sigmoid", "tanh")}
    return {"gradient_bands": bands, "dying_depth": depths, "dying_depth_threshold": 1e-6}
