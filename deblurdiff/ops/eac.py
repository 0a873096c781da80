"""Element-wise adaptive convolution (EAC): every pixel gets its own k×k kernel.

    out[b, c, h, w] = sum_{i,j} kernels[b, g(c), i, j, h, w] * x[b, c, h + i - k//2, w + j - k//2]

with zero padding. ``x`` is (B, C, H, W); ``kernels`` (B, G*k*k, H, W) with odd ``k``;
channel ``c`` uses group ``c // (C // G)`` (DeblurDiff: k = 5, G = C = 4).
``residual=True`` returns ``x + EAC(x, kernels)``.

:func:`eac_torch` (blocked in-place multiply-adds, float32 accumulation, hand-written
backward) lives in :mod:`.eac_pytorch`, the Triton kernels in :mod:`.eac_triton`; both are
custom operators, so ``torch.export`` and ``torch.compile`` see one node. The readable
``eac_reference`` that the tests check them against is in ``benchmarks/baselines.py``.
:func:`eac` uses Triton for CUDA tensors when it imports, else PyTorch;
``DEBLURDIFF_EAC_BACKEND`` (``auto``, ``torch``, ``triton``) overrides the choice.
"""

from __future__ import annotations

import functools
import os

import torch

from .eac_pytorch import eac_torch
from .eac_shapes import eac_geometry

__all__ = ["eac", "eac_torch", "eac_geometry", "BACKEND_ENV"]

BACKEND_ENV = "DEBLURDIFF_EAC_BACKEND"
_BACKENDS = ("auto", "torch", "triton")


@functools.cache
def _triton_module() -> tuple:
    """(``eac_triton``, None) if triton imports, else (None, the error)."""
    try:
        from . import eac_triton
    except Exception as error:  # triton missing or broken
        return None, error
    return eac_triton, None


def _choose_backend(x: torch.Tensor, backend: str | None) -> str:
    choice = (backend or "auto").strip().lower()
    if choice == "auto":
        choice = (os.environ.get(BACKEND_ENV) or "auto").strip().lower()
    if choice not in _BACKENDS:
        raise ValueError(f"EAC: backend must be one of {_BACKENDS} or None, got {choice!r}")
    if choice == "auto":
        return "triton" if x.is_cuda and _triton_module()[0] is not None else "torch"
    return choice


def eac(x: torch.Tensor, kernels: torch.Tensor, residual: bool = False, backend: str | None = None,
        *, groups: int | None = None) -> torch.Tensor:
    """EAC, differentiable in both inputs on every backend; ``backend``: None/``"auto"``,
    ``"torch"`` or ``"triton"`` (see the module's docstring)."""
    eac_geometry(x, kernels, groups)
    chosen = _choose_backend(x, backend)
    if chosen == "triton":
        module, error = _triton_module()
        if module is None:
            raise RuntimeError(f"EAC: the triton backend was requested but triton does not import: {error}")
        return module.eac_triton(x, kernels, residual=residual, groups=groups)
    return eac_torch(x, kernels, residual=residual, groups=groups)
