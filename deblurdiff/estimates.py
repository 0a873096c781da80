"""Run-time estimates: how long an image takes, and what fits in a ZeroGPU run.

Seconds ≈ megapixels processed × (fixed + steps × branches × per-step), where
"megapixels processed" is the padded image, or the sum of its overlapping tiles.
The constants below are estimates until a GPU has measured them (the app replaces
them by a measurement of the loaded model where it can run one before a request).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Callable

from .cpu import CPUConfig, CPUTiming, choose_cpu_config, estimate_cpu_seconds, guided_branches
from .tiling import TILE_SIZE, TILE_STRIDE, count_tiles, padded

logger = logging.getLogger(__name__)


# Seconds per megapixel: (one denoising step, VAE encode + decode), full-size model.
# "cuda": an ESTIMATE for an H100/H200-class GPU in half precision, not yet measured on a GPU.
# "mps": an estimate. The CPU's come from measurements: deblurdiff.cpu.estimate_cpu_seconds.
DEFAULT_SPEEDS = {
    "cuda": (0.35, 0.6),
    "mps": (8.0, 6.0),
}

#: ZeroGPU: GPU time booked for one run = overhead + margin × estimate (the app's own
#: margin over its estimate), at least MIN_GPU_SECONDS. Booked seconds are what ZeroGPU
#: reserves and charges to the visitor's quota (deblurdiff.zerogpu turns them into the
#: duration given to ``@spaces.GPU``).
MIN_GPU_SECONDS = 20
GPU_OVERHEAD_SECONDS = 10
GPU_MARGIN = 1.5
#: A cap on the GPU time one run may book, in seconds: ``DEBLURDIFF_ZEROGPU_MAX_SECONDS``.
#: ZeroGPU documents no per-call maximum; what it enforces is each visitor's daily quota
#: (at most 40 minutes, with PRO), so the default cap is that: no visitor could run more.
GPU_CAP_ENV = "DEBLURDIFF_ZEROGPU_MAX_SECONDS"
DEFAULT_GPU_CAP_SECONDS = 40 * 60


def processed_megapixels(
    width: int, height: int, tiled: bool, tile: int = TILE_SIZE, stride: int = TILE_STRIDE
) -> float:
    """Megapixels the networks process: the padded image, or the sum of its tiles."""
    w, h = padded(width), padded(height)
    if not tiled or max(w, h) <= tile:
        return w * h / 1e6
    return count_tiles(h, w, tile, stride) * min(w, tile) * min(h, tile) / 1e6


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
            tiles = count_tiles(height, width, TILE_SIZE, TILE_STRIDE) if tiled else None
            return estimate_cpu_seconds(
                width, height, steps, guidance_scale, config=self.cpu_config, timing=self.cpu_timing, tiles=tiles
            )
        mpx = processed_megapixels(width, height, tiled)
        return mpx * (self.fixed_s_per_mpx + steps * guided_branches(guidance_scale) * self.step_s_per_mpx)


def gpu_cap_seconds() -> int:
    """The cap on one run's booked GPU time (``DEBLURDIFF_ZEROGPU_MAX_SECONDS``, else the default)."""
    value = os.environ.get(GPU_CAP_ENV, "").strip()
    try:
        cap = int(value) if value else DEFAULT_GPU_CAP_SECONDS
    except ValueError:
        cap = 0
    if cap < MIN_GPU_SECONDS:
        logger.warning("%s=%r is not a number of seconds >= %d; using %d", GPU_CAP_ENV, value, MIN_GPU_SECONDS, DEFAULT_GPU_CAP_SECONDS)
        return DEFAULT_GPU_CAP_SECONDS
    return cap


def gpu_booking_seconds(estimate: float) -> int:
    """Seconds of GPU time a run should have booked: the estimate with a margin."""
    return math.ceil(max(MIN_GPU_SECONDS, GPU_OVERHEAD_SECONDS + GPU_MARGIN * estimate))


def fits_gpu_limit(estimate: float, limit: float | None = None, booked: Callable[[float], float] = gpu_booking_seconds) -> bool:
    """Whether the GPU time booked for a run of ``estimate`` seconds (``booked(estimate)``)
    is within ``limit`` seconds (default: :func:`gpu_cap_seconds`)."""
    return booked(estimate) <= (gpu_cap_seconds() if limit is None else limit)


def gpu_limit_advice(
    speed: SpeedModel,
    width: int,
    height: int,
    steps: int,
    guidance_scale: float = 1.0,
    tiled: bool | None = None,
    *,
    limit: float | None = None,
    booked: Callable[[float], float] = gpu_booking_seconds,
    what: str | None = None,
    note: str = "",
) -> str | None:
    """None when the run's booked GPU time is within ``limit``; otherwise what would fit,
    for the user. ``what`` names the limit ("what you have left today"), ``note`` ends
    the message."""
    limit = gpu_cap_seconds() if limit is None else limit

    def fits(w: int, h: int, n: int) -> bool:
        return fits_gpu_limit(speed.seconds(w, h, n, guidance_scale, tiled), limit, booked)

    estimate = speed.seconds(width, height, steps, guidance_scale, tiled)
    if fits_gpu_limit(estimate, limit, booked):
        return None
    most_steps = max(s for s in range(0, steps) if s == 0 or fits(width, height, s))
    what = what or f"the {limit:.0f} s one run may book here"
    head = (
        f"This run would book about {booked(estimate):.0f} s of GPU time "
        f"(an estimate with a margin), more than {what}."
    )
    # The largest image of the same aspect ratio on which the requested steps fit.
    scale = 1.0
    while scale > 0.02 and not fits(int(width * scale), int(height * scale), steps):
        scale *= 0.97
    resize = f"resize the image to {max(64, math.floor(width * scale))}×{max(64, math.floor(height * scale))} pixels or less"
    if most_steps >= 1:
        plural = "s" if most_steps > 1 else ""
        text = f"{head} At {width}×{height}, at most {most_steps} step{plural} fit{'' if plural else 's'}: choose {most_steps} or fewer, or {resize}."
    else:
        text = f"{head} To run {steps} steps, {resize}."
    return f"{text} {note}".strip()


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
