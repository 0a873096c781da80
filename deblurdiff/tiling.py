"""Tiled processing for large images: overlapping windows, Gaussian blending, tiled VAE.

Everything is laid out on the *latent* grid (1/8 of the image): a window is a
rectangle of latent pixels; the VAE encoder reads it at 8× (image pixels) and the
decoder writes it at 8×. Overlapping outputs are blended with Gaussian weights
normalised to a partition of unity, so every output pixel is a convex combination
of the tiles that cover it and a region covered by one tile is that tile's value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

# Standard deviation of the blending window, as a fraction of the tile side. Small
# enough that a tile's border (where zero padding and missing context hurt most)
# barely counts wherever another tile covers it; large enough that neighbouring
# tiles cross-fade over a wide band instead of switching abruptly.
BLEND_SIGMA = 0.15


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
    """Start offsets of tiles of ``tile`` along ``length`` every ``stride``; the last
    tile is moved back to end at ``length``. A length that fits in one tile gives [0]."""
    if tile <= 0 or stride <= 0:
        raise ValueError(f"tile and stride must be positive, got {tile} and {stride}")
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def sliding_windows(height: int, width: int, tile: int, stride: int) -> list[Window]:
    """Overlapping windows covering a ``height`` × ``width`` grid, in row-major order.

    Windows are ``tile`` square, clipped to the grid when the grid is smaller, so all
    windows of one call have the same size (they can be batched)."""
    tile_h, tile_w = min(tile, height), min(tile, width)
    return [
        Window(top, left, tile_h, tile_w)
        for top in tile_starts(height, tile_h, stride)
        for left in tile_starts(width, tile_w, stride)
    ]


def gaussian_weights(
    height: int, width: int, sigma: float = BLEND_SIGMA, device=None, dtype=torch.float32
) -> torch.Tensor:
    """A separable Gaussian bump (``height``, ``width``), peak 1 at the centre, strictly
    positive everywhere; ``sigma`` is relative to each side's length."""

    def profile(n):
        pos = torch.arange(n, dtype=torch.float64, device=device)
        return torch.exp(-0.5 * ((pos - (n - 1) / 2) / (sigma * n)) ** 2)

    return torch.outer(profile(height), profile(width)).to(dtype)


def blend_weights(
    windows: Sequence[Window],
    height: int,
    width: int,
    factor: int = 1,
    sigma: float = BLEND_SIGMA,
    device=None,
    dtype=torch.float32,
) -> list[torch.Tensor]:
    """Per-window weights (1, 1, h·factor, w·factor) for output on a grid ``factor`` times
    finer than the windows', normalised so that at every pixel the weights of the windows
    covering it sum to one. A pixel covered by a single window gets weight exactly 1."""
    if not windows:
        raise ValueError("no windows")
    w0 = windows[0]
    bump = gaussian_weights(w0.height * factor, w0.width * factor, sigma, device, torch.float64)
    total = torch.zeros(height * factor, width * factor, dtype=torch.float64, device=device)
    for win in windows:
        total[win.slices(factor)] += bump
    weights = [(bump / total[win.slices(factor)]).to(dtype)[None, None] for win in windows]
    return weights


def check_tiling(tile_size: int, tile_stride: int, multiple: int = 64) -> None:
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
    """Apply ``fn`` window by window and blend its outputs.

    ``inputs`` are sliced at ``in_factor`` × each window; ``fn(*tiles)`` returns one tensor
    or a tuple, each laid out at ``out_factor`` × the window; ``weights`` come from
    ``blend_weights(..., factor=out_factor)``. Up to ``batch_size`` windows go through
    ``fn`` at once, stacked along the batch dimension (B = inputs' batch per window).
    Returns a tuple of float32 tensors, one per output of ``fn``.
    """
    batch = inputs[0].shape[0]
    grid_h = inputs[0].shape[-2] // in_factor
    grid_w = inputs[0].shape[-1] // in_factor
    outputs: list[torch.Tensor] | None = None
    for start in range(0, len(windows), batch_size):
        group = range(start, min(start + batch_size, len(windows)))
        tiles = [
            torch.cat([x[(..., *windows[i].slices(in_factor))] for i in group]) if len(group) > 1
            else x[(..., *windows[group[0]].slices(in_factor))]
            for x in inputs
        ]
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


def latent_windows(latent_height: int, latent_width: int, tile_size: int, tile_stride: int) -> list[Window]:
    """Windows on the latent grid for tiles given in image pixels (8 per latent pixel)."""
    return sliding_windows(latent_height, latent_width, tile_size // 8, tile_stride // 8)


def vae_encode_tiled(
    encode: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    tile_size: int,
    tile_stride: int,
    sigma: float = BLEND_SIGMA,
) -> torch.Tensor:
    """Blend ``encode(image_tile)`` (any per-latent-pixel output, e.g. the posterior's
    mean and log-variance) over overlapping ``tile_size``-pixel tiles.

    ``images``: (B, 3, H, W) with H, W multiples of 8. Returns (B, C, H/8, W/8), float32."""
    h, w = images.shape[-2] // 8, images.shape[-1] // 8
    windows = latent_windows(h, w, tile_size, tile_stride)
    if len(windows) == 1:
        return encode(images).float()
    weights = blend_weights(windows, h, w, 1, sigma, images.device)
    return tiled_map(encode, [images], windows, weights, in_factor=8, out_factor=1)[0]


def vae_decode_tiled(
    decode: Callable[[torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    tile_size: int,
    tile_stride: int,
    sigma: float = BLEND_SIGMA,
) -> torch.Tensor:
    """Blend ``decode(latent_tile)`` (image tiles 8× larger) over overlapping tiles of
    ``tile_size`` image pixels. Returns (B, C, 8h, 8w), float32."""
    h, w = latents.shape[-2:]
    windows = latent_windows(h, w, tile_size, tile_stride)
    if len(windows) == 1:
        return decode(latents).float()
    weights = blend_weights(windows, h, w, 8, sigma, latents.device)
    return tiled_map(decode, [latents], windows, weights, in_factor=1, out_factor=8)[0]


def count_tiles(height: int, width: int, tile_size: int, tile_stride: int) -> int:
    """How many tiles cover an image of ``height`` × ``width`` pixels (padded to 64)."""
    lh, lw = math.ceil(height / 64) * 8, math.ceil(width / 64) * 8
    return len(latent_windows(lh, lw, tile_size, tile_stride))
