"""Tiled processing for large images, as the reference's tiled mode, and when to use it.

Windows are laid out on the latent grid (1/8 of the image). As in the reference
(``--tiled``), the VAE encoder writes each tile's latent over the previous ones; noise
predictions and decoded images are blended with Gaussian weights (standard deviation 0.1
of the tile side) normalised to a partition of unity. The pipeline tiles only when an
untiled run's estimated peak memory does not fit (``should_tile``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

# Standard deviation of the blending window as a fraction of the tile side: the
# reference's (a variance of 0.01).
BLEND_SIGMA = 0.1
# Images are padded to multiples of this (latents are 1/8 and the UNet halves them 3 times).
SIZE_MULTIPLE = 64
# The reference's tiled mode: tiles of 512 image pixels every 256.
TILE_SIZE, TILE_STRIDE = 512, 256


@dataclass(frozen=True)
class Window:
    """A ``height`` × ``width`` rectangle at (``top``, ``left``) on the base grid."""

    top: int
    left: int
    height: int
    width: int

    def slices(self, factor: int = 1) -> tuple[slice, slice]:
        """(rows, cols) slices of the window on a grid ``factor`` times finer."""
        return (
            slice(self.top * factor, (self.top + self.height) * factor),
            slice(self.left * factor, (self.left + self.width) * factor),
        )


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile starts along ``length`` every ``stride``, the last one moved back to end at ``length``."""
    if tile <= 0 or stride <= 0:
        raise ValueError(f"tile and stride must be positive, got {tile} and {stride}")
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def sliding_windows(height: int, width: int, tile: int, stride: int) -> list[Window]:
    """Overlapping ``tile``-square windows (clipped to a smaller grid) in row-major order."""
    tile_h, tile_w = min(tile, height), min(tile, width)
    return [
        Window(top, left, tile_h, tile_w)
        for top in tile_starts(height, tile_h, stride)
        for left in tile_starts(width, tile_w, stride)
    ]


def latent_windows(latent_height: int, latent_width: int, tile_size: int, tile_stride: int) -> list[Window]:
    """Windows on the latent grid for tiles given in image pixels (8 per latent pixel)."""
    return sliding_windows(latent_height, latent_width, tile_size // 8, tile_stride // 8)


def padded(side: int) -> int:
    """An image side rounded up to the multiple of 64 that the pipeline pads it to."""
    return math.ceil(side / SIZE_MULTIPLE) * SIZE_MULTIPLE


def count_tiles(height: int, width: int, tile_size: int = TILE_SIZE, tile_stride: int = TILE_STRIDE) -> int:
    """How many tiles cover an image of ``height`` × ``width`` pixels (padded to 64)."""
    return len(latent_windows(padded(height) // 8, padded(width) // 8, tile_size, tile_stride))


def gaussian_weights(
    height: int, width: int, sigma: float = BLEND_SIGMA, device=None, dtype=torch.float32
) -> torch.Tensor:
    """A separable Gaussian bump, ``sigma`` relative to each side, centred at ``height / 2``
    and ``(width - 1) / 2``: the reference's half-pixel asymmetry, kept exactly."""

    def profile(n, centre):
        pos = torch.arange(n, dtype=torch.float64, device=device)
        return torch.exp(-0.5 * ((pos - centre) / (sigma * n)) ** 2)

    return torch.outer(profile(height, height / 2), profile(width, (width - 1) / 2)).to(dtype)


def blend_weights(
    windows: Sequence[Window],
    height: int,
    width: int,
    factor: int = 1,
    sigma: float = BLEND_SIGMA,
    device=None,
    dtype=torch.float32,
) -> list[torch.Tensor]:
    """Per-window weights (1, 1, h·factor, w·factor) that sum to one at every pixel."""
    if not windows:
        raise ValueError("no windows")
    w0 = windows[0]
    bump = gaussian_weights(w0.height * factor, w0.width * factor, sigma, device, torch.float64)
    total = torch.zeros(height * factor, width * factor, dtype=torch.float64, device=device)
    for win in windows:
        total[win.slices(factor)] += bump
    return [(bump / total[win.slices(factor)]).to(dtype)[None, None] for win in windows]


def check_tiling(tile_size: int, tile_stride: int, multiple: int = SIZE_MULTIPLE) -> None:
    """Validate tile parameters given in image pixels."""
    if tile_size < multiple or tile_size % multiple:
        raise ValueError(f"tile_size must be a positive multiple of {multiple} pixels, got {tile_size}")
    if tile_stride <= 0 or tile_stride % 8 or tile_stride > tile_size:
        raise ValueError(
            f"tile_stride must be a multiple of 8 pixels between 8 and tile_size ({tile_size}), got {tile_stride}"
        )


def tiled_map(
    fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    inputs: Sequence[torch.Tensor],
    windows: Sequence[Window],
    weights: Sequence[torch.Tensor],
    in_factor: int = 1,
    out_factor: int = 1,
    batch_size: int = 1,
) -> tuple[torch.Tensor, ...]:
    """Apply ``fn`` window by window (``batch_size`` at once, stacked on the batch) and blend
    its outputs with ``weights``: inputs are sliced at ``in_factor`` × each window, outputs
    laid out at ``out_factor``. Returns a tuple of float32 tensors, one per output."""
    batch = inputs[0].shape[0]
    grid_h = inputs[0].shape[-2] // in_factor
    grid_w = inputs[0].shape[-1] // in_factor
    outputs: list[torch.Tensor] | None = None
    for start in range(0, len(windows), batch_size):
        group = range(start, min(start + batch_size, len(windows)))
        tiles = [torch.cat([x[(..., *windows[i].slices(in_factor))] for i in group]) for x in inputs]
        result = fn(*tiles)
        result = result if isinstance(result, tuple) else (result,)
        if outputs is None:
            outputs = [
                torch.zeros(batch, r.shape[1], grid_h * out_factor, grid_w * out_factor, device=r.device)
                for r in result
            ]
        for out, r in zip(outputs, result):
            for k, i in enumerate(group):
                out[(..., *windows[i].slices(out_factor))] += r[k * batch : (k + 1) * batch].float() * weights[i]
    return tuple(outputs)


def vae_encode_tiled(
    encode: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, tile_size: int, tile_stride: int
) -> torch.Tensor:
    """``encode`` over overlapping tiles, each written over the previous ones (the reference's
    tiled encoder). Returns (B, C, H/8, W/8) float32."""
    h, w = images.shape[-2] // 8, images.shape[-1] // 8
    latents = None
    for win in latent_windows(h, w, tile_size, tile_stride):
        z = encode(images[(..., *win.slices(8))]).float()
        if latents is None:
            latents = torch.zeros(*z.shape[:2], h, w, device=z.device)
        latents[(..., *win.slices())] = z
    return latents


def vae_decode_tiled(
    decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor, tile_size: int, tile_stride: int
) -> torch.Tensor:
    """``decode`` over overlapping tiles blended at image resolution (the reference's tiled
    decoder). Returns (B, C, 8h, 8w) float32."""
    h, w = latents.shape[-2:]
    windows = latent_windows(h, w, tile_size, tile_stride)
    if len(windows) == 1:
        return decode(latents).float()
    weights = blend_weights(windows, h, w, 8, device=latents.device)
    return tiled_map(decode, [latents], windows, weights, in_factor=1, out_factor=8)[0]


# ---------------------------------------------------------------------- when to tile
@dataclass(frozen=True)
class MemoryModel:
    """Peak memory of one pipeline call above the resident weights:
    ``constant + per_latent_pixel × latent pixels`` bytes (the models attend within fixed
    windows, so the working set grows linearly with the image)."""

    constant: float
    per_latent_pixel: float
    measured: bool
    source: str

    def bytes(self, latent_pixels: int) -> int:
        return int(self.constant + self.per_latent_pixel * latent_pixels)


_CPU_COMMAND = "python benchmarks/bench_peak_memory.py"
# CPU float32, unguided: least squares over peaks measured at 256², 512², 768² and 1024²
# with full-size random-weight models (benchmarks/results/peak_memory_cpu.txt): 0.364,
# 1.212, 2.629 and 4.493 GiB above the weights; the line is within 6% at 256², 2% above.
_CPU_FP32 = (117.1e6, 288.8e3)
# Guided (the networks run both branches in one batch): 1.683 and 4.878 GiB at 512² and
# 1024², the line through both.
_CPU_FP32_GUIDED = (663.6e6, 279.2e3)
# (device type, dtype, guided) -> model
PEAK_MEMORY: dict[tuple[str, torch.dtype, bool], MemoryModel] = {}


def _register() -> None:
    fits = {False: _CPU_FP32, True: _CPU_FP32_GUIDED}
    for is_guided, fit in fits.items():
        PEAK_MEMORY[("cpu", torch.float32, is_guided)] = MemoryModel(*fit, True, f"measured: {_CPU_COMMAND}")
    # Other devices and dtypes: ESTIMATES from the CPU float32 fits (half the bytes per
    # element in float16/bfloat16) until measured with
    # ``bench_peak_memory.py --device cuda --dtype fp16``.
    estimate = f"estimate from the CPU float32 fit ({_CPU_COMMAND})"
    for dtype, scale in ((torch.float32, 1.0), (torch.float16, 0.5), (torch.bfloat16, 0.5)):
        for device_type in ("cpu", "cuda", "mps"):
            if device_type == "cpu" and dtype == torch.float32:
                continue
            for is_guided, (constant, slope) in fits.items():
                PEAK_MEMORY[(device_type, dtype, is_guided)] = MemoryModel(
                    constant * scale, slope * scale, False, estimate
                )


_register()

# Headroom over the fitted estimate (allocator fragmentation, other kernels' workspaces).
MEMORY_MARGIN = 1.2


def memory_model(device_type: str = "cpu", dtype: torch.dtype = torch.float32, guided: bool = False) -> MemoryModel:
    """The stored peak-memory model for a device type and dtype (float32's for unknown pairs)."""
    key = (device_type, dtype, bool(guided))
    if key not in PEAK_MEMORY:
        key = ("cpu", torch.float32, bool(guided))
    return PEAK_MEMORY[key]


def estimate_peak_memory(
    height: int,
    width: int,
    device_type: str = "cpu",
    dtype: torch.dtype = torch.float32,
    guided: bool = False,
    tiled: bool = False,
    tile_size: int = TILE_SIZE,
    tile_batch_size: int = 1,
) -> int:
    """Estimated peak bytes, above the resident weights and with ``MEMORY_MARGIN``, of one
    pipeline call on a ``height`` × ``width`` image (padded to 64). Tiled, the networks and
    the VAE see ``tile_batch_size`` tiles at a time."""
    lh, lw = padded(height) // 8, padded(width) // 8
    pixels = lh * lw
    if tiled:
        tile = tile_size // 8
        pixels = min(tile, lh) * min(tile, lw) * max(1, tile_batch_size)
    need = memory_model(device_type, dtype).bytes(pixels)
    if guided:  # never below unguided (the two fits cross above ~4000² pixels)
        need = max(need, memory_model(device_type, dtype, True).bytes(pixels))
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


def should_tile(
    height: int,
    width: int,
    available_bytes: int | None,
    device_type: str = "cpu",
    dtype: torch.dtype = torch.float32,
    guided: bool = False,
    tile_size: int = TILE_SIZE,
) -> bool:
    """Whether an image of ``height`` × ``width`` pixels should run tiled: only when it does
    not fit in one tile and an untiled run's estimated peak exceeds ``available_bytes``
    (bytes free above the resident weights; None = unknown, run untiled like the reference)."""
    if available_bytes is None or count_tiles(height, width, tile_size, tile_size) <= 1:
        return False
    return estimate_peak_memory(height, width, device_type, dtype, guided) > available_bytes
