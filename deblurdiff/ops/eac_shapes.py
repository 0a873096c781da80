"""Shape checks shared by every EAC implementation (the bottom of :mod:`deblurdiff.ops`)."""

from __future__ import annotations

import torch

__all__ = ["eac_geometry", "common_dtype"]


def _odd_square_root(n: int) -> int | None:
    k = int(round(n**0.5))
    return k if k * k == n and k % 2 == 1 else None


def eac_geometry(x: torch.Tensor, kernels: torch.Tensor, groups: int | None = None) -> tuple[int, int]:
    """Validate the shapes and return ``(G, k)``.

    Without ``groups`` the number of kernel groups is inferred from the shapes: G = C
    (one kernel per channel) when ``kernels`` has C*k*k channels with odd k, otherwise
    the largest divisor G of C for which ``kernels`` has G*k*k channels with odd k.
    """
    if x.ndim != 4 or kernels.ndim != 4:
        raise ValueError(
            f"EAC: x and kernels must be 4-D (B, C, H, W) and (B, G*k*k, H, W), "
            f"got {tuple(x.shape)} and {tuple(kernels.shape)}"
        )
    B, C, H, W = x.shape
    if kernels.shape[0] != B:
        raise ValueError(f"EAC: batch mismatch, x {tuple(x.shape)} vs kernels {tuple(kernels.shape)}")
    if tuple(kernels.shape[2:]) != (H, W):
        raise ValueError(
            f"EAC: spatial size mismatch, x is {H}x{W} but kernels are "
            f"{kernels.shape[2]}x{kernels.shape[3]} ({tuple(x.shape)} vs {tuple(kernels.shape)})"
        )
    K = kernels.shape[1]
    if groups is not None and (groups < 1 or C % groups):
        raise ValueError(f"EAC: channels C={C} must be a multiple of the number of kernel groups G={groups}")
    candidates = [groups] if groups is not None else [d for d in range(C, 0, -1) if C % d == 0]
    for g in candidates:
        if K % g == 0 and (k := _odd_square_root(K // g)) is not None:
            return g, k
    if groups is not None:
        raise ValueError(f"EAC: kernels must have G*k*k channels with odd k; got {K} channels for G={groups}")
    raise ValueError(
        f"EAC: kernels must have G*k*k channels with odd k and C={C} a multiple of G; "
        f"got {K} kernel channels (e.g. {C * 25} for G=C={C}, k=5)"
    )


def common_dtype(x: torch.Tensor, kernels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both tensors in their promoted dtype."""
    dtype = torch.promote_types(x.dtype, kernels.dtype)
    return x.to(dtype), kernels.to(dtype)
