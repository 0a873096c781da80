"""Run-time estimates: how long an image takes, and what fits in a ZeroGPU run.

Seconds ≈ megapixels processed × (fixed + steps × branches × per-step), where
"megapixels processed" is the padded image, or the sum of its overlapping tiles.
The constants below are estimates until a GPU has measured them (the app replaces
them by a measurement of the loaded model where it can run one before a request).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from .cpu import CPUConfig, CPUTiming, choose_cpu_config, estimate_cpu_seconds
from .tiling import count_tiles, padded

DEFAULT_TILE = 512
DEFAULT_STRIDE = 256

# Seconds per megapixel: (one denoising step, VAE encode + decode), full-size model.
# "cuda": an ESTIMATE for an H100/H200-class GPU in half precision, not yet measured on a GPU.
# "mps": an estimate. The CPU's come from measurements: deblurdiff.cpu.estimate_cpu_seconds.
DEFAULT_SPEEDS = {
    "cuda": (0.35, 0.6),
    "mps": (8.0, 6.0),
}

#: ZeroGPU: seconds asked for one run are clamped to this range. The upper end is the
#: longest task ZeroGPU accepts (5 minutes, as its maintainers state; not documented).
MIN_GPU_SECONDS = 20
MAX_GPU_SECONDS = 300
#: Seconds asked for = overhead + margin × estimate.
GPU_OVERHEAD_SECONDS = 10
GPU_MARGIN = 1.5


def processed_megapixels(
    width: int, height: int, tiled: bool, tile: int = DEFAULT_TILE, stride: int = DEFAULT_STRIDE
) -> float:
    """Megapixels the networks process: the padded image, or the sum of its tiles."""
    w, h = padded(width), padded(height)
    if not tiled or max(w, h) <= tile:
        return w * h / 1e6
    return count_tiles(h, w, tile, stride) * min(w, tile) * min(h, tile) / 1e6


def branches(guidance_scale: float) -> int:
    """Classifier-free guidance runs the networks twice per step."""
    return 2 if guidance_scale is not None and float(guidance_scale) != 1.0 else 1


@dataclass
class SpeedModel:
    """Seconds ≈ megapixels × (fixed + steps × branches × step)."""

    step_s_per_mpx: float
    fixed_s_per_mpx: float
    device: str
    measured: bool = False
    #: The pipeline's tiling rule ``(height, width, tiled) -> bool``; default: never tile.
    should_tile: Callable[[int, int, bool | None], bool] | None = None
    #: On the CPU: how the networks run, and their measured speed (None: the defaults).
    cpu_config: CPUConfig | None = None
    cpu_timing: CPUTiming | None = None

    @classmethod
    def default(cls, device_type: str, should_tile=None, cpu_config: CPUConfig | None = None) -> "SpeedModel":
        if device_type == "cpu":
            return cls(0.0, 0.0, "cpu", should_tile=should_tile, cpu_config=cpu_config or choose_cpu_config())
        step, fixed = DEFAULT_SPEEDS.get(device_type, DEFAULT_SPEEDS["mps"])
        return cls(step, fixed, device_type, should_tile=should_tile)

    @classmethod
    def measured_cpu(cls, config: CPUConfig, timing: CPUTiming, should_tile=None) -> "SpeedModel":
        return cls(0.0, 0.0, "cpu", measured=True, should_tile=should_tile, cpu_config=config, cpu_timing=timing)

    def _tiled(self, width: int, height: int, tiled: bool | None) -> bool:
        if self.should_tile is not None:
            return bool(self.should_tile(height, width, tiled))
        return bool(tiled)

    def seconds(self, width: int, height: int, steps: int, guidance_scale: float = 1.0, tiled: bool | None = None) -> float:
        tiled = self._tiled(width, height, tiled)
        if self.device == "cpu":
            tiles = count_tiles(height, width, DEFAULT_TILE, DEFAULT_STRIDE) if tiled else None
            return estimate_cpu_seconds(
                width, height, steps, guidance_scale, config=self.cpu_config, timing=self.cpu_timing, tiles=tiles
            )
        mpx = processed_megapixels(width, height, tiled)
        return mpx * (self.fixed_s_per_mpx + steps * branches(guidance_scale) * self.step_s_per_mpx)


def gpu_request_seconds(estimate: float) -> int:
    """Seconds of GPU time to ask ZeroGPU for: the estimate with a margin, clamped."""
    return int(min(MAX_GPU_SECONDS, max(MIN_GPU_SECONDS, GPU_OVERHEAD_SECONDS + GPU_MARGIN * estimate)))


def fits_gpu_limit(estimate: float) -> bool:
    return GPU_OVERHEAD_SECONDS + GPU_MARGIN * estimate <= MAX_GPU_SECONDS


def gpu_limit_advice(
    speed: SpeedModel, width: int, height: int, steps: int, guidance_scale: float = 1.0, tiled: bool | None = None
) -> str | None:
    """None when the run fits in one ZeroGPU task; otherwise what would fit, for the user."""

    def fits(w: int, h: int, n: int) -> bool:
        return fits_gpu_limit(speed.seconds(w, h, n, guidance_scale, tiled))

    estimate = speed.seconds(width, height, steps, guidance_scale, tiled)
    if fits_gpu_limit(estimate):
        return None
    most_steps = max(s for s in range(0, steps) if s == 0 or fits(width, height, s))
    head = (
        f"This run would take about {estimate:.0f} s of GPU time "
        f"(an estimate), more than the {MAX_GPU_SECONDS} s one ZeroGPU run may last."
    )
    # The largest image of the same aspect ratio on which the requested steps fit.
    scale = 1.0
    while scale > 0.02 and not fits(int(width * scale), int(height * scale), steps):
        scale *= 0.97
    resize = f"resize the image to {max(64, math.floor(width * scale))}×{max(64, math.floor(height * scale))} pixels or less"
    if most_steps >= 1:
        plural = "s" if most_steps > 1 else ""
        return f"{head} At {width}×{height}, at most {most_steps} step{plural} fit{'' if plural else 's'}: choose {most_steps} or fewer, or {resize}."
    return f"{head} To run {steps} steps, {resize}."


def format_seconds(seconds: float) -> str:
    if seconds < 1:
        return "under a second"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# --------------------------------------------------------------------------
# The cost cap of any device (the ZeroGPU limit above is a separate, stricter one)
# --------------------------------------------------------------------------

#: Longest estimated run accepted, per device type (seconds); ``DEBLURDIFF_MAX_RUN_SECONDS`` overrides.
MAX_RUN_SECONDS_ENV = "DEBLURDIFF_MAX_RUN_SECONDS"
DEFAULT_MAX_RUN_SECONDS = {"cpu": 3600, "mps": 1800, "cuda": 600}


def max_run_seconds(device_type: str, value=None) -> float:
    """``value``, else ``$DEBLURDIFF_MAX_RUN_SECONDS``, else the device's default."""
    import os

    value = value if value is not None else os.environ.get(MAX_RUN_SECONDS_ENV)
    if value not in (None, ""):
        seconds = float(value)
        if not seconds > 0:
            raise ValueError(f"the longest run must be a positive number of seconds; got {value!r}")
        return seconds
    return DEFAULT_MAX_RUN_SECONDS.get(device_type, DEFAULT_MAX_RUN_SECONDS["mps"])


def run_cost_advice(
    speed: SpeedModel, width: int, height: int, steps: int, guidance_scale: float, tiled: bool | None, limit: float
) -> str | None:
    """None when the estimated run fits in ``limit`` seconds; otherwise what fits, for the user."""

    def fits(w: int, h: int, n: int) -> bool:
        return speed.seconds(w, h, n, guidance_scale, tiled) <= limit

    estimate = speed.seconds(width, height, steps, guidance_scale, tiled)
    if estimate <= limit:
        return None
    most_steps = next((n for n in range(steps - 1, 0, -1) if fits(width, height, n)), 0)
    scale = 1.0
    while scale > 0.02 and not fits(max(64, int(width * scale)), max(64, int(height * scale)), steps):
        scale *= 0.97
    resize = f"resize the image to {max(64, math.floor(width * scale))}×{max(64, math.floor(height * scale))} pixels or less"
    head = f"This run would take about {format_seconds(estimate)} here (an estimate), more than the {format_seconds(limit)} this server allows for one image."
    if most_steps >= 1:
        return f"{head} At {width}×{height}, at most {most_steps} step{'s' if most_steps > 1 else ''} fit: choose {most_steps} or fewer, or {resize}."
    return f"{head} To run {steps} steps, {resize}."
