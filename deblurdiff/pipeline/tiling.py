"""Tiled processing for large images, as the reference's tiled mode (``--tiled``): windows on the
latent grid (1/8 of the image); the VAE encoder writes each tile's latent over the previous ones;
noise predictions and decoded images are blended with Gaussian weights normalised to sum to one.
The pipeline tiles only when an untiled run's estimated peak memory does not fit (estimates.py).
"""

from __future__ import annotations

import math
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
    windows: Sequence[Window], height: int, width: int, factor: int = 1, device=None
) -> list[torch.Tensor]:
    """Per-window float32 weights (1, 1, h·factor, w·factor) that sum to one at every pixel."""
    w0 = windows[0]
    bump = gaussian_weights(w0.height * factor, w0.width * factor, device=device, dtype=torch.float64)
    total = torch.zeros(height * factor, width * factor, dtype=torch.float64, device=device)
    for win in windows:
        total[win.slices(factor)] += bump
    return [(bump / total[win.slices(factor)]).float()[None, None] for win in windows]


def check_tiling(tile_size: int, tile_stride: int) -> None:
    """Validate tile parameters given in image pixels."""
    if tile_size < SIZE_MULTIPLE or tile_size % SIZE_MULTIPLE:
        raise ValueError(f"tile_size must be a positive multiple of {SIZE_MULTIPLE} pixels, got {tile_size}")
    if tile_stride <= 0 or tile_stride % 8 or tile_stride > tile_size:
        raise ValueError(
            f"tile_stride must be a multiple of 8 pixels between 8 and tile_size ({tile_size}), got {tile_stride}"
        )


def tiled_map(
    fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    inputs: Sequence[torch.Tensor],
    windows: Sequence[Window],
    weights: Sequence[torch.Tensor],
    out_factor: int = 1,
) -> tuple[torch.Tensor, ...]:
    """Apply ``fn`` window by window and blend its outputs with ``weights``, laid out at
    ``out_factor`` × each window. Returns a tuple of float32 tensors, one per output."""
    batch, _, height, width = inputs[0].shape
    outputs: list[torch.Tensor] | None = None
    for win, weight in zip(windows, weights):
        result = fn(*(x[(..., *win.slices())].contiguous() for x in inputs))
        result = result if isinstance(result, tuple) else (result,)
        if outputs is None:
            size = (height * out_factor, width * out_factor)
            outputs = [torch.zeros(batch, r.shape[1], *size, device=r.device) for r in result]
        for out, r in zip(outputs, result):
            out[(..., *win.slices(out_factor))] += r.float() * weight
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
    weights = blend_weights(windows, h, w, 8, device=latents.device)
    return tiled_map(decode, [latents], windows, weights, out_factor=8)[0]
