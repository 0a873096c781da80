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

:func:`eac` picks one: Triton for CUDA tensors when ``triton`` imports, the PyTorch
path otherwise. The environment variable ``DEBLURDIFF_EAC_BACKEND`` (``auto``,
``torch`` or ``triton``) overrides the choice.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

__all__ = ["eac", "eac_reference", "eac_torch", "eac_unfold", "eac_shifted", "eac_geometry", "BACKEND_ENV"]

BACKEND_ENV = "DEBLURDIFF_EAC_BACKEND"
_BACKENDS = ("auto", "torch", "triton")
_HALF = (torch.float16, torch.bfloat16)


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
    if groups is not None:
        if groups < 1 or C % groups:
            raise ValueError(f"EAC: channels C={C} must be a multiple of the number of kernel groups G={groups}")
        k = _odd_square_root(K // groups) if K % groups == 0 else None
        if k is None:
            raise ValueError(
                f"EAC: kernels must have G*k*k channels with odd k; got {K} channels for G={groups}"
            )
        return groups, k
    for g in sorted((d for d in range(1, C + 1) if C % d == 0), reverse=True):
        if K % g == 0 and (k := _odd_square_root(K // g)) is not None:
            return g, k
    raise ValueError(
        f"EAC: kernels must have G*k*k channels with odd k and C={C} a multiple of G; "
        f"got {K} kernel channels (e.g. {C * 25} for G=C={C}, k=5)"
    )


def _common_dtype(x: torch.Tensor, kernels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.promote_types(x.dtype, kernels.dtype)
    return x.to(dtype), kernels.to(dtype)


def eac_reference(x: torch.Tensor, kernels: torch.Tensor, residual: bool = False, groups: int | None = None):
    """Readable ground truth: a sum of shifted copies of ``x``, one per kernel tap.

    Works in any dtype (use float64 for gradcheck) and supports autograd.
    """
    G, k = eac_geometry(x, kernels, groups)
    x, kernels = _common_dtype(x, kernels)
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


def eac_unfold(x: torch.Tensor, kernels: torch.Tensor, residual: bool = False, groups: int | None = None):
    """Baseline: ``F.unfold`` the k×k neighbourhoods, multiply, sum (autograd)."""
    G, k = eac_geometry(x, kernels, groups)
    x, kernels = _common_dtype(x, kernels)
    B, C, H, W = x.shape
    patches = F.unfold(x, k, padding=k // 2).view(B, G, C // G, k * k, H, W)
    out = (patches * kernels.reshape(B, G, 1, k * k, H, W)).sum(3).view(B, C, H, W)
    return out + x if residual else out


def eac_shifted(x: torch.Tensor, kernels: torch.Tensor, residual: bool = False, groups: int | None = None):
    """Baseline: out-of-place shifted sums on a padded ``x`` (autograd)."""
    G, k = eac_geometry(x, kernels, groups)
    x, kernels = _common_dtype(x, kernels)
    B, C, H, W = x.shape
    p = k // 2
    xp = F.pad(x, (p, p, p, p)).reshape(B, G, C // G, H + 2 * p, W + 2 * p)
    kv = kernels.reshape(B, G, 1, k * k, H, W)
    out = x.reshape(B, G, C // G, H, W) if residual else 0
    for t in range(k * k):
        i, j = divmod(t, k)
        out = out + xp[..., i : i + H, j : j + W] * kv[:, :, :, t]
    return out.reshape(B, C, H, W)


# The fast PyTorch path ----------------------------------------------------------------


# Output elements per block and thread (512 KiB of float32): a block's accumulator,
# input rows and kernel rows stay in cache while the k*k taps sweep over them. Blocks
# grow with torch's thread count, so that each op's share per thread stays this size
# (ATen splits every op across its threads) and there are few ops to synchronise.
_BLOCK = 1 << 17


def _blocks(planes: int, n: int, H: int, W: int, limit: int) -> list:
    """(plane slice, first row, end row) blocks of at most ``limit`` output elements
    (or one row of one plane, if that is larger)."""
    plane = n * H * W
    if plane > limit:
        rows = max(1, limit // (n * W))
        return [(slice(q, q + 1), h0, min(H, h0 + rows)) for q in range(planes) for h0 in range(0, H, rows)]
    step = max(1, limit // plane)
    return [(slice(q, q + step), 0, H) for q in range(0, planes, step)]


def _run_blocks(work, planes: int, n: int, H: int, W: int, device: torch.device) -> None:
    """``work(block)`` for every block of the (planes, n, H, W) output.

    On other devices than the CPU the whole tensor is one block (fewest kernel launches).
    """
    if device.type != "cpu":
        work((slice(None), 0, H))
        return
    for block in _blocks(planes, n, H, W, _BLOCK * max(1, torch.get_num_threads())):
        work(block)


def _padded(x: torch.Tensor, p: int, dtype: torch.dtype) -> torch.Tensor:
    """Contiguous zero-padded copy of ``x`` in ``dtype`` (one pass, any input layout)."""
    B, C, H, W = x.shape
    xp = torch.zeros((B, C, H + 2 * p, W + 2 * p), dtype=dtype, device=x.device)
    xp[:, :, p : p + H, p : p + W] = x
    return xp


def _windows(xb: torch.Tensor, k: int, rows: int, W: int) -> torch.Tensor:
    """View (P, n, k, k, rows, W) of a padded slab (P, n, rows + k - 1, W + k - 1):
    element [..., i, j, h, w] is xb[..., h + i, w + j]."""
    s0, s1, s2, s3 = xb.stride()
    return xb.as_strided((xb.shape[0], xb.shape[1], k, k, rows, W), (s0, s1, s2, s3, s2, s3), xb.storage_offset())


def _forward_taps(x: torch.Tensor, kernels: torch.Tensor, G: int, k: int, residual: bool) -> torch.Tensor:
    """Blocked shifted multiply-adds on a zero-padded ``x``; float32 accumulation for halves.

    The planes (b, g) are processed in cache-sized blocks of rows; inside a block each
    of the k*k taps is one in-place ``addcmul_`` (shifted x rows times that tap's
    kernel rows) into the accumulator. Half-precision kernels are read as they are:
    ``addcmul_`` into a float32 accumulator widens them on the fly, which is much faster
    than converting them first.
    """
    B, C, H, W = x.shape
    n, p, P = C // G, k // 2, B * G
    acc_dtype = torch.float32 if x.dtype in _HALF else x.dtype
    xp = _padded(x, p, acc_dtype).view(P, n, H + 2 * p, W + 2 * p)
    kv = kernels.reshape(P, k * k, H, W)
    if residual:
        out = x.to(acc_dtype, memory_format=torch.contiguous_format, copy=True)
    else:
        out = torch.zeros((B, C, H, W), dtype=acc_dtype, device=x.device)
    acc = out.view(P, n, H, W)

    def work(block):
        planes, h0, h1 = block
        rows = h1 - h0
        a = acc[planes, :, h0:h1]
        kb = kv[planes, :, h0:h1]
        xb = xp[planes, :, h0 : h1 + 2 * p]
        for t in range(k * k):
            i, j = divmod(t, k)
            a.addcmul_(xb[:, :, i : i + rows, j : j + W], kb[:, t : t + 1])

    _run_blocks(work, P, n, H, W, x.device)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _backward_taps(grad: torch.Tensor, x: torch.Tensor, kernels: torch.Tensor, G: int, k: int,
                   residual: bool, need_x: bool, need_k: bool):
    """Gradients of :func:`_forward_taps`, blocked the same way.

    grad_x[h, w] = sum_{i,j} grad[h - i + p, w - j + p] * kernel[i, j, h - i + p, w - j + p]
    (gathered over each tap's valid rectangle, so blocks write only their own rows);
    grad_kernels[g, i, j, h, w] = sum over the group's channels of
    grad[h, w] * x[h + i - p, w + j - p].
    """
    B, C, H, W = x.shape
    n, p, P = C // G, k // 2, B * G
    acc_dtype = torch.float32 if x.dtype in _HALF else x.dtype
    g = grad.to(acc_dtype).reshape(P, n, H, W)
    kv = kernels.reshape(P, k * k, H, W)
    gx = xp = grad_k = None
    if need_x:
        if residual:
            gx = grad.to(acc_dtype, memory_format=torch.contiguous_format, copy=True).view(P, n, H, W)
        else:
            gx = torch.zeros((P, n, H, W), dtype=acc_dtype, device=x.device)
    if need_k:
        xp = _padded(x, p, acc_dtype).view(P, n, H + 2 * p, W + 2 * p)
        grad_k = torch.empty((P, k * k, H, W), dtype=kernels.dtype, device=x.device)

    def work(block):
        planes, h0, h1 = block
        rows = h1 - h0
        if need_x:
            lo, hi = max(0, h0 - p), min(H, h1 + p)  # the rows of grad and kernels read
            gs, ks = g[planes, :, lo:hi], kv[planes, :, lo:hi]
            dst = gx[planes]
            for t in range(k * k):
                di, dj = divmod(t, k)
                di, dj = di - p, dj - p
                r0, r1 = max(h0, di), min(h1, H + di)  # output rows with a source row inside
                c0, c1 = max(0, dj), min(W, W + dj)
                if r0 < r1 and c0 < c1:
                    src = (slice(None), slice(None), slice(r0 - di - lo, r1 - di - lo), slice(c0 - dj, c1 - dj))
                    dst[:, :, r0:r1, c0:c1].addcmul_(gs[src], ks[:, t : t + 1][src])
        if need_k:
            # All k*k taps in one op per channel: grad (broadcast over the taps) times
            # a strided view of the k x k windows of x.
            gb = g[planes, :, None, None, h0:h1]  # (P', n, 1, 1, rows, W)
            windows = _windows(xp[planes, :, h0 : h1 + 2 * p], k, rows, W)  # (P', n, k, k, rows, W)
            dst = grad_k[planes, :, h0:h1].unflatten(1, (k, k))  # (P', k, k, rows, W)
            if n == 1:
                torch.mul(gb[:, 0], windows[:, 0], out=dst)
            else:
                acc = dst if dst.dtype == acc_dtype else torch.empty(dst.shape, dtype=acc_dtype, device=x.device)
                torch.mul(gb[:, 0], windows[:, 0], out=acc)
                for c in range(1, n):
                    acc.addcmul_(gb[:, c], windows[:, c])
                if acc is not dst:
                    dst.copy_(acc)

    _run_blocks(work, P, n, H, W, x.device)
    grad_x = gx.view(B, C, H, W).to(x.dtype) if need_x else None
    return grad_x, (grad_k.view(B, G * k * k, H, W) if need_k else None)


class _EACTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernels, G, k, residual):
        ctx.save_for_backward(x, kernels)
        ctx.geometry = (G, k, residual)
        return _forward_taps(x, kernels, G, k, residual)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, kernels = ctx.saved_tensors
        G, k, residual = ctx.geometry
        grad_x, grad_k = _backward_taps(
            grad, x, kernels, G, k, residual, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        return grad_x, grad_k, None, None, None


def eac_torch(x: torch.Tensor, kernels: torch.Tensor, residual: bool = False, groups: int | None = None):
    """Fast PyTorch EAC (any device), with a hand-written backward."""
    G, k = eac_geometry(x, kernels, groups)
    x, kernels = _common_dtype(x, kernels)
    return _EACTorch.apply(x, kernels, G, k, residual)


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
