"""Triton kernels for EAC (:mod:`deblurdiff.ops.eac`), forward and backward.

EAC is bandwidth bound (each per-pixel kernel value is used once), so every kernel
streams the kernels once, coalesced along W, and keeps the shifted re-reads of the small
``x`` (or ``grad_out``) tile in cache. A program owns a BLOCK_H x BLOCK_W tile of one
(b, c) plane (forward, and grad_x: the same sweep transposed) or (b, g) plane
(grad_kernels) and unrolls the k*k taps. Loads are in the input dtype, arithmetic in
float32; explicit strides (no copies); the residual is fused.

The launches are ``torch.library.triton_op`` custom operators with an autograd formula:
``torch.export`` keeps them as nodes and Inductor compiles them into its graph. With
symbolic sizes the 8 x 64 tiles are used for every size (they change the work split,
not the arithmetic).

Rows of 8 mod 16 elements (the dynamic ``W = 8 * s``) get vectorised loads through
:func:`alignment`; ``tests/test_triton_compile.py`` checks the load widths for sm_90,
sm_100 and sm_120.

Importing this module imports triton; under ``TRITON_INTERPRET=1`` the kernels also run
on CPU tensors (the tests use that).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.library import triton_op, wrap_triton

from .eac_shapes import common_dtype, eac_geometry

__all__ = ["eac_triton", "launch_config", "alignment", "forward_launch", "grad_x_launch", "grad_kernels_launch",
           "INTERPRETED"]


@triton.jit
def _aligned(value, ALIGN: tl.constexpr):
    """``value`` rounded down to a multiple of ALIGN: unchanged when the launcher passes
    ALIGN > 1 (it does so only for values it knows to be multiples), but now known to
    the compiler, which then vectorises the loads along W."""
    if ALIGN > 1:
        value = value // ALIGN * ALIGN
    return value


@triton.jit
def _aligned_strides(s_batch, s_channel, s_row, ALIGN: tl.constexpr):
    return _aligned(s_batch, ALIGN), _aligned(s_channel, ALIGN), _aligned(s_row, ALIGN)


@triton.jit
def _tile(H, W, tiles_w, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Rows, columns and in-bounds mask of this program's tile."""
    pid_tile = tl.program_id(0)
    hs = (pid_tile // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    ws = (pid_tile % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    return hs, ws, (hs < H) & (ws < W)


@triton.jit
def _eac_taps_kernel(
    src_ptr, k_ptr, out_ptr,
    C, H, W, CPG, tiles_w,
    ssb, ssc, ssh, ssw,
    skb, skc, skh, skw,
    sob, soc, soh, sow,
    K: tl.constexpr, RESIDUAL: tl.constexpr, TRANSPOSED: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr, ALIGN: tl.constexpr,
):
    # Forward (src = x): out[h, w] = sum_{i,j} kernel[i, j, h, w] * x[h + i - P, w + j - P].
    # TRANSPOSED, grad_x (src = grad_out):
    #   out[h, w] = sum_{i,j} grad_out[h - i + P, w - j + P] * kernel[i, j, h - i + P, w - j + P].
    W = _aligned(W, ALIGN)
    ssb, ssc, ssh = _aligned_strides(ssb, ssc, ssh, ALIGN)
    skb, skc, skh = _aligned_strides(skb, skc, skh, ALIGN)
    sob, soc, soh = _aligned_strides(sob, soc, soh, ALIGN)
    pid_plane = tl.program_id(1)
    b = (pid_plane // C).to(tl.int64)
    c = pid_plane % C
    g = (c // CPG).to(tl.int64)
    c = c.to(tl.int64)
    hs, ws, inside = _tile(H, W, tiles_w, BLOCK_H, BLOCK_W)

    src_plane = src_ptr + b * ssb + c * ssc
    k_group = k_ptr + b * skb + g * (K * K) * skc
    P: tl.constexpr = K // 2
    SIGN: tl.constexpr = -1 if TRANSPOSED else 1
    acc = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
    for i in tl.static_range(K):
        hh = hs + SIGN * (i - P)
        row_ok = inside & (hh >= 0) & (hh < H)
        for j in tl.static_range(K):
            ww = ws + SIGN * (j - P)
            m = row_ok & (ww >= 0) & (ww < W)
            sv = tl.load(src_plane + hh * ssh + ww * ssw, mask=m, other=0.0).to(tl.float32)
            if TRANSPOSED:  # the kernels of the source pixel
                kv = tl.load(k_group + (i * K + j) * skc + hh * skh + ww * skw, mask=m, other=0.0)
            else:  # the kernels of the output pixel, streamed
                kv = tl.load(k_group + (i * K + j) * skc + hs * skh + ws * skw, mask=inside, other=0.0)
            acc += sv * kv.to(tl.float32)
            if RESIDUAL:
                if i == P:
                    if j == P:
                        acc += sv
    out = out_ptr + b * sob + c * soc + hs * soh + ws * sow
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _eac_grad_k_kernel(
    go_ptr, x_ptr, gk_ptr,
    G, H, W, tiles_w,
    sgb, sgc, sgh, sgw,
    sxb, sxc, sxh, sxw,
    skb, skc, skh, skw,
    K: tl.constexpr, CPG: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    ALIGN: tl.constexpr,
):
    # grad_kernels[g, i, j, h, w] = sum_{c in group g} grad_out[c, h, w] * x[c, h + i - P, w + j - P]
    W = _aligned(W, ALIGN)
    sgb, sgc, sgh = _aligned_strides(sgb, sgc, sgh, ALIGN)
    sxb, sxc, sxh = _aligned_strides(sxb, sxc, sxh, ALIGN)
    skb, skc, skh = _aligned_strides(skb, skc, skh, ALIGN)
    pid_plane = tl.program_id(1)
    b = (pid_plane // G).to(tl.int64)
    g = (pid_plane % G).to(tl.int64)
    hs, ws, inside = _tile(H, W, tiles_w, BLOCK_H, BLOCK_W)

    c0 = g * CPG
    go_pixels = go_ptr + b * sgb + c0 * sgc + hs * sgh + ws * sgw
    x_group = x_ptr + b * sxb + c0 * sxc
    gk_pixels = gk_ptr + b * skb + g * (K * K) * skc + hs * skh + ws * skw
    P: tl.constexpr = K // 2
    if CPG == 1:
        gv0 = tl.load(go_pixels, mask=inside, other=0.0).to(tl.float32)
    for i in tl.static_range(K):
        hh = hs + (i - P)
        row_ok = inside & (hh >= 0) & (hh < H)
        for j in tl.static_range(K):
            ww = ws + (j - P)
            m = row_ok & (ww >= 0) & (ww < W)
            shifted = hh * sxh + ww * sxw
            if CPG == 1:
                acc = gv0 * tl.load(x_group + shifted, mask=m, other=0.0).to(tl.float32)
            else:
                acc = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
                for cc in range(CPG):
                    gv = tl.load(go_pixels + cc * sgc, mask=inside, other=0.0).to(tl.float32)
                    xv = tl.load(x_group + cc * sxc + shifted, mask=m, other=0.0).to(tl.float32)
                    acc += gv * xv
            tl.store(gk_pixels + (i * K + j) * skc, acc.to(gk_ptr.dtype.element_ty), mask=inside)


INTERPRETED = not isinstance(_eac_taps_kernel, triton.runtime.JITFunction)


DYNAMIC_CONFIG = (8, 64, 4)


def launch_config(H: int, W: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_W, num_warps): tiles of up to 8 x 64 pixels, W innermost
    (:data:`DYNAMIC_CONFIG` when a size is symbolic)."""
    if isinstance(H, torch.SymInt) or isinstance(W, torch.SymInt):
        return DYNAMIC_CONFIG
    block_w = min(64, triton.next_power_of_2(W))
    block_h = min(max(1, 512 // block_w), triton.next_power_of_2(H))
    return block_h, block_w, 4


def _grid(H: int, W: int, planes: int, block_h: int, block_w: int):
    tiles_w = triton.cdiv(W, block_w)
    return (triton.cdiv(H, block_h) * tiles_w, planes), tiles_w


#: Rows are vectorised along W when the compiler knows that the row width and every
#: batch, channel and row stride are multiples of this many elements.
ALIGN = 8


def alignment(W, *tensors: torch.Tensor) -> int:
    """:data:`ALIGN` when ``W`` and the batch, channel and row strides of ``tensors`` are
    provably multiples of it, else 1. Triton's own specialisation only marks integers
    divisible by 16 (AOTInductor: those it can prove so), so a row width of 8 mod 16
    (a latent width of 8 * odd) would otherwise make every load scalar. Sizes may be
    symbolic (tracing for export or AOTInductor): then only what the shape environment
    proves counts, and no guard is added."""
    values = [W] + [s for t in tensors for s in t.stride()[:3]]
    return ALIGN if all(statically_known_true(v % ALIGN == 0) for v in values) else 1


class Launch(NamedTuple):
    """One kernel launch as the operators make it: ``kernel[grid](*args, **kwargs)``."""

    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict


def _taps_launch(transposed: bool, src, kernels, out, groups: int, k: int, residual: bool,
                 block_h: int, block_w: int, num_warps: int) -> Launch:
    B, C, H, W = src.shape
    grid, tiles_w = _grid(H, W, B * C, block_h, block_w)
    return Launch(_eac_taps_kernel, grid, (
        src, kernels, out, C, H, W, C // groups, tiles_w, *src.stride(), *kernels.stride(), *out.stride(),
    ), dict(K=k, RESIDUAL=residual, TRANSPOSED=transposed, BLOCK_H=block_h, BLOCK_W=block_w,
            ALIGN=alignment(W, src, kernels, out), num_warps=num_warps))


#: ``(x, kernels, out, groups, k, residual, block_h, block_w, num_warps)``
forward_launch = functools.partial(_taps_launch, False)
#: ``(grad, kernels, grad_x, groups, k, residual, block_h, block_w, num_warps)``
grad_x_launch = functools.partial(_taps_launch, True)


def grad_kernels_launch(grad, x, grad_k, groups: int, k: int,
                        block_h: int, block_w: int, num_warps: int) -> Launch:
    B, C, H, W = x.shape
    grid, tiles_w = _grid(H, W, B * groups, block_h, block_w)
    return Launch(_eac_grad_k_kernel, grid, (
        grad, x, grad_k, groups, H, W, tiles_w, *grad.stride(), *x.stride(), *grad_k.stride(),
    ), dict(K=k, CPG=C // groups, BLOCK_H=block_h, BLOCK_W=block_w, ALIGN=alignment(W, grad, x, grad_k),
            num_warps=num_warps))


def _run(launch: Launch) -> None:
    # ``wrap_triton`` makes the launch traceable; some torch versions refuse the
    # interpreter's functions, which have nothing to trace.
    kernel = launch.kernel if INTERPRETED else wrap_triton(launch.kernel)
    kernel[launch.grid](*launch.args, **launch.kwargs)


def _taps(transposed: bool, src, kernels, *args) -> torch.Tensor:
    out = torch.empty(src.shape, dtype=src.dtype, device=src.device)
    _run(_taps_launch(transposed, src, kernels, out, *args))
    return out


@triton_op("deblurdiff::eac_triton_forward", mutates_args=())
def _forward_op(x: torch.Tensor, kernels: torch.Tensor, groups: int, k: int, residual: bool,
                block_h: int, block_w: int, num_warps: int) -> torch.Tensor:
    return _taps(False, x, kernels, groups, k, residual, block_h, block_w, num_warps)


@triton_op("deblurdiff::eac_triton_grad_x", mutates_args=())
def _grad_x_op(grad: torch.Tensor, kernels: torch.Tensor, groups: int, k: int, residual: bool,
               block_h: int, block_w: int, num_warps: int) -> torch.Tensor:
    return _taps(True, grad, kernels, groups, k, residual, block_h, block_w, num_warps)


@triton_op("deblurdiff::eac_triton_grad_kernels", mutates_args=())
def _grad_kernels_op(grad: torch.Tensor, x: torch.Tensor, kernels: torch.Tensor, groups: int, k: int,
                     block_h: int, block_w: int, num_warps: int) -> torch.Tensor:
    B, C, H, W = x.shape
    grad_k = torch.empty((B, groups * k * k, H, W), dtype=kernels.dtype, device=x.device)
    _run(grad_kernels_launch(grad, x, grad_k, groups, k, block_h, block_w, num_warps))
    return grad_k


def _setup_context(ctx, inputs, output):
    x, kernels, groups, k, residual, *config = inputs
    ctx.save_for_backward(x, kernels)
    ctx.geometry = (groups, k, residual, config)


def _backward(ctx, grad):
    x, kernels = ctx.saved_tensors
    groups, k, residual, config = ctx.geometry
    grad = grad.to(x.dtype)
    grad_x = grad_k = None
    if ctx.needs_input_grad[0]:
        grad_x = _grad_x_op(grad, kernels, groups, k, residual, *config)
    if ctx.needs_input_grad[1]:
        grad_k = _grad_kernels_op(grad, x, kernels, groups, k, *config)
    return grad_x, grad_k, None, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def eac_triton(x: torch.Tensor, kernels: torch.Tensor, residual: bool = False, groups: int | None = None,
               config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """EAC with the Triton kernels (differentiable in ``x`` and ``kernels``).

    ``config`` overrides :func:`launch_config` as (BLOCK_H, BLOCK_W, num_warps), with
    powers of two for the block sizes.
    """
    G, k = eac_geometry(x, kernels, groups)
    x, kernels = common_dtype(x, kernels)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"EAC: the triton backend supports float32, float16 and bfloat16, not {x.dtype}")
    for t in (x, kernels):
        if not t.is_cuda and not INTERPRETED:
            raise ValueError("EAC: the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                             f"import); got a tensor on {t.device}")
    if x.device != kernels.device:
        raise ValueError(f"EAC: x is on {x.device} but kernels are on {kernels.device}")
    block_h, block_w, warps = config or launch_config(x.shape[2], x.shape[3])
    return _forward_op(x, kernels, G, k, bool(residual), block_h, block_w, warps)
