"""Estimates: how long an image takes (GPU, MPS and CPU), what fits in a ZeroGPU run,
and peak memory, which decides when to tile.

Seconds ≈ megapixels processed × (fixed + steps × branches × per-step), where
"megapixels processed" is the padded image, or the sum of its overlapping tiles.
The GPU constants below are estimates until a GPU has measured them (the app replaces
them by a measurement of the loaded model where it can run one before a request).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch

from .cpu import CPUConfig, CPUTiming, choose_cpu_config
from .tiling import TILE_SIZE, TILE_STRIDE, count_tiles, padded

logger = logging.getLogger(__name__)


# Seconds per megapixel: (one denoising step, VAE encode + decode), full-size model.
# "cuda": an ESTIMATE for an H100/H200-class GPU in half precision, not yet measured on a GPU.
# "mps": an estimate. The CPU's come from measurements: estimate_cpu_seconds below.
DEFAULT_SPEEDS = {"cuda": (0.35, 0.6), "mps": (8.0, 6.0)}

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


# Seconds per megapixel at 512×512: (one step, VAE encode + decode and the rest), full-size
# random weights, 2 threads. Used until the pipeline has been timed on this machine;
# scaled by thread count. bfloat16: an AMD EPYC with AVX-512 BF16 (benchmarks/
# bench_inference.py, bench_model.py). float32, chosen on CPUs without native bf16: an AMD
# EPYC with AVX2 only, 3-step runs with Winograd convolutions (27.8 s per step per
# megapixel, 51.0 s for the rest; benchmarks/results/cpu_estimate.txt), given here without
# Winograd (times WINOGRAD_SPEEDUP).
REFERENCE_THREADS = 2
DEFAULT_CPU_SPEEDS = {"float32": (38.9, 70.4), "bfloat16": (6.5, 28.8)}
# Winograd convolutions (float32): (per step, VAE encode + decode) speed-ups measured at
# 512² on 2 AVX2 cores, Intel Xeon capped at AVX2 (benchmarks/results/cpu_estimate.txt):
# 39.1 -> 27.9 s per step per megapixel, VAE 24.8 -> 18.0 s.
WINOGRAD_SPEEDUP = (1.40, 1.38)
# Time grows faster than the pixel count (activations outgrow the caches; the VAE's
# middle attention is global): per-step time ∝ megapixels ** 1.25 and VAE time ∝
# megapixels ** 1.14, from float32 eager at 512² and 1024² (5.7× and 4.9× for 4× pixels).
STEP_EXPONENT = 1.25
FIXED_EXPONENT = 1.14


def _scaled(seconds_per_mpx: float, mpx: float, at_mpx: float, exponent: float) -> float:
    """Seconds for ``mpx`` given ``seconds_per_mpx`` measured at ``at_mpx``."""
    return seconds_per_mpx * at_mpx * (mpx / at_mpx) ** exponent


def guided_branches(guidance_scale: float | None) -> int:
    """Classifier-free guidance (any scale but 1) runs the networks twice per step."""
    return 2 if guidance_scale is not None and float(guidance_scale) != 1.0 else 1


def estimate_cpu_seconds(width: int, height: int, steps: int, guidance_scale: float = 1.0, *,
                         config: CPUConfig | None = None, timing: CPUTiming | None = None,
                         tiles: int | None = None, tile_size: int = TILE_SIZE) -> float:
    """Seconds for one image of ``width``×``height`` on this CPU.

    Uses ``timing`` (measured by :func:`deblurdiff.cpu.prepare_cpu_pipeline`) when given, else the
    defaults measured for ``config`` on the reference machine, scaled by thread count.
    ``tiles``: the number of ``tile_size`` tiles when the image runs tiled (None:
    untiled)."""
    config = config or choose_cpu_config()
    image_mpx = padded(width) * padded(height) / 1e6
    if timing is not None:
        step, fixed = timing.step_s_per_mpx, timing.fixed_s_per_mpx
        at_mpx = padded(timing.width) * padded(timing.height) / 1e6
    else:
        scale = REFERENCE_THREADS / max(1, torch.get_num_threads())
        default_step, default_fixed = DEFAULT_CPU_SPEEDS[config.dtype_name]
        step, fixed, at_mpx = default_step * scale, default_fixed * scale, 512 * 512 / 1e6
        if config.winograd:
            step, fixed = step / WINOGRAD_SPEEDUP[0], fixed / WINOGRAD_SPEEDUP[1]
    pass_mpx = tile_size * tile_size / 1e6 if tiles else image_mpx
    step_seconds = (tiles or 1) * _scaled(step, pass_mpx, at_mpx, STEP_EXPONENT)
    return _scaled(fixed, image_mpx, at_mpx, FIXED_EXPONENT) + steps * guided_branches(guidance_scale) * step_seconds


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

    def seconds(self, width: int, height: int, steps: int, guidance_scale: float = 1.0, tiled: bool | None = None) -> float:
        tiled = bool(self.should_tile(height, width, tiled) if self.should_tile is not None else tiled)
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
    most_steps, resize = _what_fits(fits, width, height, steps)
    what = what or f"the {limit:.0f} s one run may book here"
    head = (
        f"This run would book about {booked(estimate):.0f} s of GPU time "
        f"(an estimate with a margin), more than {what}."
    )
    if most_steps >= 1:
        plural = "s" if most_steps > 1 else ""
        text = f"{head} At {width}×{height}, at most {most_steps} step{plural} fit{'' if plural else 's'}: choose {most_steps} or fewer, or {resize}."
    else:
        text = f"{head} To run {steps} steps, {resize}."
    return f"{text} {note}".strip()


def _what_fits(fits: Callable[[int, int, int], bool], width: int, height: int, steps: int) -> tuple[int, str]:
    """The most steps under ``steps`` that fit at this size (0: none), and the resize, keeping
    the aspect ratio, on which ``steps`` fit."""
    most_steps = next((n for n in range(steps - 1, 0, -1) if fits(width, height, n)), 0)
    scale = 1.0
    while scale > 0.02 and not fits(max(64, int(width * scale)), max(64, int(height * scale)), steps):
        scale *= 0.97
    return most_steps, f"resize the image to {max(64, math.floor(width * scale))}×{max(64, math.floor(height * scale))} pixels or less"


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


# --------------------------------------------------------------------------
# The cost cap of any device (the ZeroGPU limit above is a separate, stricter one)
# --------------------------------------------------------------------------

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

    def fits(w: int, h: int, n: int) -> bool:
        return speed.seconds(w, h, n, guidance_scale, tiled) <= limit

    estimate = speed.seconds(width, height, steps, guidance_scale, tiled)
    if estimate <= limit:
        return None
    most_steps, resize = _what_fits(fits, width, height, steps)
    head = f"This run would take about {format_seconds(estimate)} here (an estimate), more than the {format_seconds(limit)} this server allows for one image."
    if most_steps >= 1:
        return f"{head} At {width}×{height}, at most {most_steps} step{'s' if most_steps > 1 else ''} fit: choose {most_steps} or fewer, or {resize}."
    return f"{head} To run {steps} steps, {resize}."


# --------------------------------------------------------------------------
# Peak memory, and when to tile
# --------------------------------------------------------------------------

_MEMORY_COMMAND = "python benchmarks/bench_peak_memory.py"
#: Peak bytes of one untiled call above the resident weights, CPU float32:
#: ``constant + per latent pixel × latent pixels`` (the models attend within fixed windows,
#: so the working set grows linearly), by guidance. Unguided: least squares over peaks
#: measured at 256², 512², 768² and 1024² with full-size random-weight models
#: (benchmarks/results/peak_memory_cpu.txt): 0.364, 1.212, 2.629 and 4.493 GiB above the
#: weights; the line is within 6% at 256², 2% above. Guided (both branches in one batch):
#: 1.683 and 4.878 GiB at 512² and 1024², the line through both.
CPU_FP32_PEAK = {False: (117.1e6, 288.8e3), True: (663.6e6, 279.2e3)}
# Headroom over the fitted estimate (allocator fragmentation, other kernels' workspaces).
MEMORY_MARGIN = 1.2


@dataclass(frozen=True)
class MemoryModel:
    """Peak bytes above the resident weights: ``constant + per_latent_pixel × latent pixels``."""

    constant: float
    per_latent_pixel: float
    measured: bool
    source: str

    def bytes(self, latent_pixels: int) -> int:
        return int(self.constant + self.per_latent_pixel * latent_pixels)


def memory_model(device_type: str = "cpu", dtype: torch.dtype = torch.float32, guided: bool = False) -> MemoryModel:
    """The CPU float32 fit, scaled by bytes per element (half in float16/bfloat16): measured
    on the CPU in float32, an ESTIMATE elsewhere until measured with
    ``bench_peak_memory.py --device cuda --dtype fp16``."""
    scale = 0.5 if dtype in (torch.float16, torch.bfloat16) else 1.0
    constant, slope = CPU_FP32_PEAK[bool(guided)]
    measured = device_type == "cpu" and dtype == torch.float32
    source = f"{'measured' if measured else 'estimate from the CPU float32 fit'}: {_MEMORY_COMMAND}"
    return MemoryModel(constant * scale, slope * scale, measured, source)


def estimate_peak_memory(height: int, width: int, device_type: str = "cpu", dtype: torch.dtype = torch.float32,
                         guided: bool = False, tiled: bool = False, tile_size: int = TILE_SIZE,
                         tile_batch_size: int = 1) -> int:
    """Estimated peak bytes, above the resident weights and with ``MEMORY_MARGIN``, of one
    pipeline call on a ``height`` × ``width`` image (padded to 64). Tiled, the networks and
    the VAE see ``tile_batch_size`` tiles at a time."""
    lh, lw = padded(height) // 8, padded(width) // 8
    pixels = lh * lw
    if tiled:
        tile = tile_size // 8
        pixels = min(tile, lh) * min(tile, lw) * max(1, tile_batch_size)
    # Guided: never below unguided (the two fits cross above ~4000² pixels).
    need = max(memory_model(device_type, dtype, g).bytes(pixels) for g in {False, bool(guided)})
    return int(MEMORY_MARGIN * need)


def available_memory(device: torch.device | str) -> int | None:
    """Bytes the device can still give this process (free plus PyTorch's cached blocks on
    CUDA, ``MemAvailable`` on a Linux CPU), or None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    if device.type == "mps":
        try:
            return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
        except (AttributeError, RuntimeError):
            return None
    return None


def should_tile(height: int, width: int, available_bytes: int | None, device_type: str = "cpu",
                dtype: torch.dtype = torch.float32, guided: bool = False, tile_size: int = TILE_SIZE) -> bool:
    """Whether an image of ``height`` × ``width`` pixels should run tiled: only when it does
    not fit in one tile and an untiled run's estimated peak exceeds ``available_bytes``
    (bytes free above the resident weights; None = unknown, run untiled like the reference)."""
    if available_bytes is None or count_tiles(height, width, tile_size, tile_size) <= 1:
        return False
    return estimate_peak_memory(height, width, device_type, dtype, guided) > available_bytes
