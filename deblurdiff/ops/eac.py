"""Element-wise adaptive convolution (EAC): every pixel gets its own k×k kernel.

DeblurDiff's LKPN predicts one k×k kernel per latent pixel (and per channel group);
EAC applies them to the blurry latent ``c``::

    out[b, c, h, w] = sum_{i,j} kernels[b, g(c), i, j, h, w] * x[b, c, h + i - k//2, w + j - k//2]

with zero padding outside the image (stride 1, output the size of ``x``).
``x`` is (B, C, H, W); ``kernels`` is (B, G*k*k, H, W), read as (B, G, k, k, H, W);
channel ``c`` uses group ``g(c) = c // (C // G)``; ``k`` is odd (DeblurDiff: k = 5,
G = C = 4). ``residual=True`` returns ``x + EAC(x, kernels)``.

Implementations:

* :func:`eac_reference` -- readable shifted sums, any dtype (float64 for gradcheck);
  the ground truth of the tests.
* :func:`eac_unfold`, :func:`eac_shifted` -- the usual PyTorch formulations, kept as
  benchmark baselines.
* :func:`eac_torch` -- the fast PyTorch path (CPU, or CUDA without Triton): one
  in-place multiply-add per tap over cache-sized blocks, float32 accumulation for
  float16/bfloat16, and a hand-written backward.
* ``eac_triton.eac_triton`` -- fused Triton kernels (forward and both gradients).

The first four live in :mod:`.eac_pytorch`, the Triton kernels in :mod:`.eac_triton`;
both register custom operators (``torch.library``) so that ``torch.export`` and
``torch.compile`` see EAC as one node with dynamic shapes, and Inductor compiles the
Triton kernels into its graph.

:func:`eac` picks one: Triton for CUDA tensors when ``triton`` imports, the PyTorch
path otherwise. The environment variable ``DEBLURDIFF_EAC_BACKEND`` (``auto``,
``torch`` or ``triton``) overrides the choice.
"""

from __future__ import annotations

import os

import torch

from .eac_pytorch import eac_reference, eac_shifted, eac_torch, eac_unfold
from .eac_shapes import eac_geometry

__all__ = ["eac", "eac_reference", "eac_torch", "eac_unfold", "eac_shifted", "eac_geometry", "BACKEND_ENV"]

BACKEND_ENV = "DEBLURDIFF_EAC_BACKEND"
_BACKENDS = ("auto", "torch", "triton")


# Dispatch ---------------------------------------------------------------------------

_triton_state: dict = {}


def _triton_module():
    """``eac_triton`` if triton imports (cached), else None."""
    if "module" not in _triton_state:
        try:
            from . import eac_triton
        except Exception as error:  # triton missing or broken
            _triton_state["module"], _triton_state["error"] = None, error
        else:
            _triton_state["module"] = eac_triton
    return _triton_state["module"]


def _choose_backend(x: torch.Tensor, backend: str | None) -> str:
    choice = (backend or "auto").strip().lower()
    if choice == "auto":
        choice = (os.environ.get(BACKEND_ENV) or "auto").strip().lower()
    if choice not in _BACKENDS:
        raise ValueError(f"EAC: backend must be one of {_BACKENDS} or None, got {choice!r}")
    if choice == "auto":
        return "triton" if x.is_cuda and _triton_module() is not None else "torch"
    return choice


def eac(x: torch.Tensor, kernels: torch.Tensor, residual: bool = False, backend: str | None = None,
        *, groups: int | None = None) -> torch.Tensor:
    """Element-wise adaptive convolution; ``x + EAC(x, kernels)`` with ``residual=True``.

    ``x``: (B, C, H, W); ``kernels``: (B, G*k*k, H, W) with odd k and C a multiple of G
    (G inferred, see :func:`eac_geometry`, or given as ``groups``). ``backend``: None or
    ``"auto"`` (Triton for CUDA tensors when available, else PyTorch), ``"torch"`` or
    ``"triton"``. With None/``"auto"``, ``DEBLURDIFF_EAC_BACKEND`` forces a backend.
    Differentiable in both inputs on every backend.
    """
    eac_geometry(x, kernels, groups)
    chosen = _choose_backend(x, backend)
    if chosen == "triton":
        module = _triton_module()
        if module is None:
            raise RuntimeError(f"EAC: the triton backend was requested but triton does not import: "
                               f"{_triton_state.get('error')}")
        return module.eac_triton(x, kernels, residual=residual, groups=groups)
    return eac_torch(x, kernels, residual=residual, groups=groups)
