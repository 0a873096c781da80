"""EAC in plain PyTorch (:mod:`deblurdiff.ops.eac`): blocked in-place multiply-adds with
a hand-written backward, as custom operators (``deblurdiff::eac_torch_*``, with fake
implementations and an autograd formula), so that ``torch.export`` and ``torch.compile``
keep EAC as one opaque node instead of tracing loops that depend on the concrete sizes.
"""

from __future__ import annotations

import torch

from .eac_shapes import common_dtype, eac_geometry

__all__ = ["eac_torch"]

_HALF = (torch.float16, torch.bfloat16)


# The fast PyTorch path ----------------------------------------------------------------


# Output elements per block and thread (512 KiB of float32): a block's accumulator,
# input rows and kernel rows stay in cache while the k*k taps sweep over them. Blocks
# grow with torch's thread count, so that each op's share per thread stays this size
# (ATen splits every op across its threads) and there are few ops to synchronise.
_BLOCK = 1 << 17


def _blocks(planes: int, n: int, H: int, W: int, device: torch.device) -> list:
    """(plane slice, first row, end row) blocks of the (planes, n, H, W) output, each of at
    most ``_BLOCK`` elements per thread (or one row of one plane, if that is larger). On
    other devices than the CPU the whole tensor is one block (fewest kernel launches)."""
    if device.type != "cpu":
        return [(slice(None), 0, H)]
    limit = _BLOCK * max(1, torch.get_num_threads())
    plane = n * H * W
    if plane > limit:
        rows = max(1, limit // (n * W))
        return [(slice(q, q + 1), h0, min(H, h0 + rows)) for q in range(planes) for h0 in range(0, H, rows)]
    step = max(1, limit // plane)
    return [(slice(q, q + step), 0, H) for q in range(0, planes, step)]


def _padded(x: torch.Tensor, p: int, dtype: torch.dtype) -> torch.Tensor:
    """Contiguous zero-padded copy of ``x`` in ``dtype`` (one pass, any input layout)."""
    B, C, H, W = x.shape
    xp = torch.zeros((B, C, H + 2 * p, W + 2 * p), dtype=dtype, device=x.device)
    xp[:, :, p : p + H, p : p + W] = x
    return xp


def _forward_taps(x: torch.Tensor, kernels: torch.Tensor, G: int, k: int, residual: bool) -> torch.Tensor:
    """Blocked shifted multiply-adds on a zero-padded ``x``: per cache-sized block of rows,
    one in-place ``addcmul_`` per tap into a float32 accumulator, which also widens
    half-precision kernels on the fly (much faster than converting them first)."""
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

    for planes, h0, h1 in _blocks(P, n, H, W, x.device):
        rows = h1 - h0
        a = acc[planes, :, h0:h1]
        kb = kv[planes, :, h0:h1]
        xb = xp[planes, :, h0 : h1 + 2 * p]
        for t in range(k * k):
            i, j = divmod(t, k)
            a.addcmul_(xb[:, :, i : i + rows, j : j + W], kb[:, t : t + 1])
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

    for planes, h0, h1 in _blocks(P, n, H, W, x.device):
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
            # (P', n, k, k, rows, W) view of the slab: [..., i, j, h, w] is xb[..., h + i, w + j].
            xb = xp[planes, :, h0 : h1 + 2 * p]
            s0, s1, s2, s3 = xb.stride()
            windows = xb.as_strided((*xb.shape[:2], k, k, rows, W), (s0, s1, s2, s3, s2, s3), xb.storage_offset())
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
    grad_x = gx.view(B, C, H, W).to(x.dtype) if need_x else None
    return grad_x, (grad_k.view(B, G * k * k, H, W) if need_k else None)


# Custom operators ---------------------------------------------------------------------


@torch.library.custom_op("deblurdiff::eac_torch_forward", mutates_args=())
def _forward_op(x: torch.Tensor, kernels: torch.Tensor, groups: int, k: int, residual: bool) -> torch.Tensor:
    return _forward_taps(x, kernels, groups, k, residual)


@torch.library.custom_op("deblurdiff::eac_torch_grad_x", mutates_args=())
def _grad_x_op(grad: torch.Tensor, x: torch.Tensor, kernels: torch.Tensor, groups: int, k: int,
               residual: bool) -> torch.Tensor:
    return _backward_taps(grad, x, kernels, groups, k, residual, need_x=True, need_k=False)[0]


@torch.library.custom_op("deblurdiff::eac_torch_grad_kernels", mutates_args=())
def _grad_kernels_op(grad: torch.Tensor, x: torch.Tensor, kernels: torch.Tensor, groups: int, k: int,
                     residual: bool) -> torch.Tensor:
    return _backward_taps(grad, x, kernels, groups, k, residual, need_x=False, need_k=True)[1]


# Fake implementations: the outputs' shapes, for tracing.
_forward_op.register_fake(lambda x, *_: torch.empty_like(x, memory_format=torch.contiguous_format))
_grad_x_op.register_fake(lambda grad, x, *_: torch.empty_like(x, memory_format=torch.contiguous_format))
_grad_kernels_op.register_fake(
    lambda grad, x, kernels, *_: torch.empty_like(kernels, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    x, kernels, groups, k, residual = inputs
    ctx.save_for_backward(x, kernels)
    ctx.geometry = (groups, k, residual)


def _backward(ctx, grad):
    x, kernels = ctx.saved_tensors
    grad_x = grad_k = None
    if ctx.needs_input_grad[0]:
        grad_x = _grad_x_op(grad, x, kernels, *ctx.geometry)
    if ctx.needs_input_grad[1]:
        grad_k = _grad_kernels_op(grad, x, kernels, *ctx.geometry)
    return grad_x, grad_k, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def eac_torch(x: torch.Tensor, kernels: torch.Tensor, residual: bool = False, groups: int | None = None):
    """Fast PyTorch EAC (any device), differentiable in both inputs."""
    G, k = eac_geometry(x, kernels, groups)
    x, kernels = common_dtype(x, kernels)
    return _forward_op(x, kernels, G, k, bool(residual))
