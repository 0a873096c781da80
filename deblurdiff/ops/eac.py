"""Element-wise adaptive convolution (EAC): every pixel gets its own k×k kernel.

out[b, c, h, w] = sum_{i,j} kernels[b, g(c), i, j, h, w] * x[b, c, h + i - k//2, w + j - k//2],
zero outside the image, with ``kernels`` of shape (B, G*k*k, H, W) and g(c) = c // (C // G).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _kernel_size(x: torch.Tensor, kernels: torch.Tensor, groups: int | None) -> tuple[int, int]:
    if x.ndim != 4 or kernels.ndim != 4:
        raise ValueError(f"x and kernels must be 4-D (B, C, H, W), got {tuple(x.shape)} and {tuple(kernels.shape)}")
    B, C, H, W = x.shape
    if kernels.shape[0] != B or kernels.shape[2:] != (H, W):
        raise ValueError(f"kernels {tuple(kernels.shape)} do not match x {tuple(x.shape)} in batch or size")
    groups = groups or C
    if C % groups:
        raise ValueError(f"channels ({C}) must be a multiple of groups ({groups})")
    taps = kernels.shape[1] // groups
    k = int(round(taps**0.5))
    if kernels.shape[1] != groups * k * k or k % 2 == 0:
        raise ValueError(f"kernels must have G*k*k channels with odd k, got {kernels.shape[1]} for G={groups}")
    return groups, k


def eac_reference(x: torch.Tensor, kernels: torch.Tensor, residual: bool = False, groups: int | None = None):
    """Readable ground truth (unfold), any dtype including float64."""
    G, k = _kernel_size(x, kernels, groups)
    B, C, H, W = x.shape
    patches = F.unfold(x, k, padding=k // 2).view(B, G, C // G, k * k, H, W)
    out = (patches * kernels.view(B, G, 1, k * k, H, W)).sum(3).view(B, C, H, W)
    return out + x if residual else out


def eac(x: torch.Tensor, kernels: torch.Tensor, residual: bool = False, groups: int | None = None, backend=None):
    return eac_reference(x, kernels, residual=residual, groups=groups)
