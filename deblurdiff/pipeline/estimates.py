"""Estimates: how long an image takes (GPU, MPS and CPU), what fits in a ZeroGPU run,
and peak memory, which decides when to tile.

Seconds ≈ passes × (fixed + steps × branches × per-step), each term in seconds per megapixel
of one pass (the padded image untiled, else each tile); on the CPU time grows faster than the
pixel count (``CPU_EXPONENTS``). The app replaces the GPU defaults by a measurement where it can.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch

from ..cpu.tuning import CPUConfig, CPUTiming, choose_cpu_config
from .tiling import TILE_SIZE, count_tiles, padded

logger = logging.getLogger(__name__)


# Seconds per megapixel: (one denoising step, VAE encode + decode), full-size model.
# "cuda": an ESTIMATE for an H100/H200-class GPU in half precision, not yet measured on a GPU.
# "mps": an estimate. The CPU's come from measurements (below).
DEFAULT_SPEEDS = {"cuda": (0.35, 0.6), "mps": (8.0, 6.0)}

#: ZeroGPU: one run books overhead + margin × estimate, at least MIN_GPU_SECONDS: what ZeroGPU
#: reserves and charges to the visitor's quota (deblurdiff.space.zerogpu makes it ``@spaces.GPU``'s duration).
MIN_GPU_SECONDS = 20
GPU_OVERHEAD_SECONDS = 10
GPU_MARGIN = 1.5
#: A cap on the GPU time one run may book, in seconds: ``DEBLURDIFF_ZEROGPU_MAX_SECONDS``.
#: ZeroGPU documents no per-call maximum; what it enforces is each visitor's daily quota
#: (at most 40 minutes, with PRO), so the default cap is that: no visitor could run more.
GPU_CAP_ENV = "DEBLURDIFF_ZEROGPU_MAX_SECONDS"
DEFAULT_GPU_CAP_SECONDS = 40 * 60


# Seconds per megapixel at 512×512, (one step, VAE encode + decode and the rest), full-size random
# weights, 2 threads (scaled by thread count), until the pipeline is timed on this machine.
# bfloat16: an AMD EPYC with AVX-512 BF16 (benchmarks/bench_inference.py, bench_model.py). float32
# (CPUs without native bf16): an AVX2-only AMD EPYC, 3-step runs with Winograd convolutions (27.8 s
# per step per megapixel, 51.0 s the rest; benchmarks/results/cpu_estimate.txt), here without them.
REFERENCE_THREADS = 2
REFERENCE_MPX = 512 * 512 / 1e6
DEFAULT_CPU_SPEEDS = {"float32": (38.9, 70.4), "bfloat16": (6.5, 28.8)}
# Winograd (float32) speed-ups, (per step, VAE), at 512² on 2 cores of an Intel Xeon capped at AVX2
# (benchmarks/results/cpu_estimate.txt): 39.1 -> 27.9 s per step per megapixel, VAE 24.8 -> 18.0 s.
WINOGRAD_SPEEDUP = (1.40, 1.38)
# Time grows faster than the pixel count (activations outgrow the caches; the VAE's
# middle attention is global): per-step time ∝ megapixels ** 1.25 and VAE time ∝
# megapixels ** 1.14, from float32 eager at 512² and 1024² (5.7× and 4.9× for 4× pixels).
CPU_EXPONENTS = (1.25, 1.14)


def is_guided(guidance_scale: float | None) -> bool:
    """Classifier-free guidance (any scale but 1) runs the networks twice per step."""
    return guidance_scale is not None and float(guidance_scale) != 1.0


def processed_megapixels(width: int, height: int, tiled: bool) -> float:
    """Megapixels the networks process: the padded image, or the sum of its tiles."""
    w, h = padded(width), padded(height)
    if not tiled:
        return w * h / 1e6
    return count_tiles(h, w) * min(w, TILE_SIZE) * min(h, TILE_SIZE) / 1e6


@dataclass
class SpeedModel:
    """Seconds per megapixel of one step and of the rest, measured on passes of ``at_mpx``."""

    step_s_per_mpx: float
    fixed_s_per_mpx: float
    device: str
    measured: bool = False
    #: The pipeline's tiling rule ``(height, width, tiled) -> bool``; default: never tile.
    should_tile: Callable[[int, int, bool | None], bool] | None = None
    at_mpx: float = REFERENCE_MPX

    @classmethod
    def default(cls, device_type: str, should_tile=None, cpu_config: CPUConfig | None = None) -> "SpeedModel":
        if device_type != "cpu":
            step, fixed = DEFAULT_SPEEDS.get(device_type, DEFAULT_SPEEDS["mps"])
            return cls(step, fixed, device_type, should_tile=should_tile)
        config = cpu_config or choose_cpu_config()
        scale = REFERENCE_THREADS / max(1, torch.get_num_threads())
        step, fixed = DEFAULT_CPU_SPEEDS[config.dtype_name]
        if config.winograd:
            step, fixed = step / WINOGRAD_SPEEDUP[0], fixed / WINOGRAD_SPEEDUP[1]
        return cls(step * scale, fixed * scale, "cpu", should_tile=should_tile)

    @classmethod
    def measured_cpu(cls, config: CPUConfig, timing: CPUTiming, should_tile=None) -> "SpeedModel":
        """The CPU's speed as ``timing`` measured it with ``config`` applied (its speed-ups included)."""
        mpx = padded(timing.width) * padded(timing.height) / 1e6
        return cls(timing.step_seconds / mpx, timing.fixed_seconds / mpx, "cpu", True, should_tile, mpx)

    def seconds(self, width: int, height: int, steps: int, guidance_scale: float = 1.0, tiled: bool | None = None) -> float:
        tiled = bool(self.should_tile(height, width, tiled) if self.should_tile is not None else tiled)
        passes = count_tiles(height, width) if tiled else 1
        mpx = processed_megapixels(width, height, tiled) / passes
        step_exponent, fixed_exponent = CPU_EXPONENTS if self.device == "cpu" else (1.0, 1.0)

        def scaled(s_per_mpx: float, exponent: float) -> float:
            return s_per_mpx * self.at_mpx * (mpx / self.at_mpx) ** exponent

        branches = 2 if is_guided(guidance_scale) else 1
        step = scaled(self.step_s_per_mpx, step_exponent)
        return passes * (scaled(self.fixed_s_per_mpx, fixed_exponent) + steps * branches * step)


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

    def cost(w: int, h: int, n: int) -> float:
        return booked(speed.seconds(w, h, n, guidance_scale, tiled))

    if cost(width, height, steps) <= limit:
        return None
    what = what or f"the {limit:.0f} s one run may book here"
    head = (
        f"This run would book about {cost(width, height, steps):.0f} s of GPU time "
        f"(an estimate with a margin), more than {what}."
    )
    return f"{head} {_what_fits(cost, limit, width, height, steps)} {note}".strip()


def _what_fits(cost: Callable[[int, int, int], float], limit: float, width: int, height: int, steps: int) -> str:
    """What fits in ``limit``: the most steps under ``steps`` at this size, else (or also)
    the resize, keeping the aspect ratio, on which ``steps`` fit."""

    def fits(w: int, h: int, n: int) -> bool:
        return cost(w, h, n) <= limit

    most = next((n for n in range(steps - 1, 0, -1) if fits(width, height, n)), 0)
    scale = 1.0
    while scale > 0.02 and not fits(max(64, int(width * scale)), max(64, int(height * scale)), steps):
        scale *= 0.97
    resize = f"resize the image to {max(64, math.floor(width * scale))}×{max(64, math.floor(height * scale))} pixels or less"
    if most:
        return f"At {width}×{height}, at most {format_steps(most)} fit{'s' if most == 1 else ''}: choose {most} or fewer, or {resize}."
    return f"To run {steps} steps, {resize}."


def format_seconds(seconds: float) -> str:
    if seconds < 1:
        return "under a second"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def format_steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


#: Longest estimated run accepted, per device type (seconds); ``DEBLURDIFF_MAX_RUN_SECONDS`` overrides.
MAX_RUN_SECONDS_ENV = "DEBLURDIFF_MAX_RUN_SECONDS"
DEFAULT_MAX_RUN_SECONDS = {"cpu": 3600, "mps": 1800, "cuda": 600}


def max_run_seconds(device_type: str, value=None) -> float:
    """``value``, else ``$DEBLURDIFF_MAX_RUN_SECONDS``, else the device's default."""
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

    def cost(w: int, h: int, n: int) -> float:
        return speed.seconds(w, h, n, guidance_scale, tiled)

    estimate = cost(width, height, steps)
    if estimate <= limit:
        return None
    head = f"This run would take about {format_seconds(estimate)} here (an estimate), more than the {format_seconds(limit)} this server allows for one image."
    return f"{head} {_what_fits(cost, limit, width, height, steps)}"


#: Peak bytes of one untiled call above the resident weights, CPU float32, by guidance:
#: ``constant + per latent pixel × latent pixels`` (the models attend within fixed windows, so the
#: working set grows linearly). Unguided: least squares over 0.364, 1.212, 2.629 and 4.493 GiB at
#: 256², 512², 768² and 1024², full-size random weights (benchmarks/results/peak_memory_cpu.txt,
#: ``bench_peak_memory.py``), within 6% at 256², 2% above. Guided (one batch): the line through 1.683
#: and 4.878 GiB at 512² and 1024². Elsewhere an ESTIMATE scaled by bytes per element (half in
#: float16/bfloat16) until measured with ``bench_peak_memory.py --device cuda --dtype fp16``.
CPU_FP32_PEAK = {False: (117.1e6, 288.8e3), True: (663.6e6, 279.2e3)}
# Headroom over the fitted estimate (allocator fragmentation, other kernels' workspaces).
MEMORY_MARGIN = 1.2


def estimate_peak_memory(height: int, width: int, dtype: torch.dtype = torch.float32, guided: bool = False) -> int:
    """Estimated peak bytes, above the resident weights and with ``MEMORY_MARGIN``, of one
    untiled pipeline call on a ``height`` × ``width`` image (padded to 64)."""
    latent_pixels = (padded(height) // 8) * (padded(width) // 8)
    scale = 0.5 if dtype in (torch.float16, torch.bfloat16) else 1.0
    # Guided: never below unguided (the two fits cross above ~4000² pixels).
    need = max(constant + slope * latent_pixels for constant, slope in (CPU_FP32_PEAK[False], CPU_FP32_PEAK[guided]))
    return int(MEMORY_MARGIN * scale * need)


def available_memory(device: torch.device | str) -> int | None:
    """Bytes the device can still give this process (free plus PyTorch's cached blocks on
    CUDA, ``MemAvailable`` on a Linux CPU), or None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):  # not Linux: unknown
        return None


def should_tile(height: int, width: int, available_bytes: int | None, dtype: torch.dtype = torch.float32,
                guided: bool = False, tile_size: int = TILE_SIZE) -> bool:
    """Whether an image larger than one tile should run tiled: when an untiled run's estimated peak
    exceeds ``available_bytes`` above the weights (None = unknown: untiled, like the reference)."""
    if available_bytes is None or count_tiles(height, width, tile_size, tile_size) <= 1:
        return False
    return estimate_peak_memory(height, width, dtype, guided) > available_bytes
