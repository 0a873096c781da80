"""What the tests and benchmarks compare the package's paths against: the readable EAC
(:func:`eac_reference`, the ground truth of ``tests/test_eac.py`` and of the parity fixtures),
the usual PyTorch formulations of EAC (``bench_eac.py``) and plain convolutions in place of
Winograd ones (``bench_model.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deblurdiff.ops.eac_shapes import common_dtype, eac_geometry


def eac_reference(x: torch.Tensor, kernels: torch.Tensor, residual: bool = False, groups: int | None = None):
    """Readable ground truth: a sum of shifted copies of ``x``, one per kernel tap (any
    dtype, float64 for gradcheck; autograd)."""
    G, k = eac_geometry(x, kernels, groups)
    x, kernels = common_dtype(x, kernels)
    B, C, H, W = x.shape
    p = k // 2
    padded = F.pad(x, (p, p, p, p))
    # (B, G, k, k, H, W) -> one weight plane per channel: (B, C, k, k, H, W).
    weights = kernels.reshape(B, G, k, k, H, W).repeat_interleave(C // G, dim=1)
    out = torch.zeros_like(x)
    for i in range(k):
        for j in range(k):
            out = out + weights[:, :, i, j] * padded[:, :, i : i + H, j : j + W]
    return out + x if residual else out


def eac_unfold(x, kernels, residual: bool = False, groups: int | None = None):
    """``F.unfold`` the k×k neighbourhoods, multiply, sum (autograd)."""
    G, k = eac_geometry(x, kernels, groups)
    x, kernels = common_dtype(x, kernels)
    B, C, H, W = x.shape
    patches = F.unfold(x, k, padding=k // 2).view(B, G, C // G, k * k, H, W)
    out = (patches * kernels.reshape(B, G, 1, k * k, H, W)).sum(3).view(B, C, H, W)
    return out + x if residual else out


def eac_shifted(x, kernels, residual: bool = False, groups: int | None = None):
    """Out-of-place shifted sums on a padded ``x`` (autograd)."""
    G, k = eac_geometry(x, kernels, groups)
    x, kernels = common_dtype(x, kernels)
    B, C, H, W = x.shape
    p = k // 2
    xp = F.pad(x, (p, p, p, p)).reshape(B, G, C // G, H + 2 * p, W + 2 * p)
    kv = kernels.reshape(B, G, 1, k * k, H, W)
    out = x.reshape(B, G, C // G, H, W) if residual else 0
    for t in range(k * k):
        i, j = divmod(t, k)
        out = out + xp[..., i : i + H, j : j + W] * kv[:, :, :, t]
    return out.reshape(B, C, H, W)


def disable_winograd(module: torch.nn.Module) -> None:
    """Undo ``ops.winograd.enable_winograd``: plain convolutions, transformed filters freed."""
    for conv in module.modules():
        if "_winograd_cache" in conv.__dict__:
            for name in ("forward", "_winograd_plan", "_im2col_max_size", "_winograd_budget", "_winograd_cache"):
                conv.__dict__.pop(name, None)
