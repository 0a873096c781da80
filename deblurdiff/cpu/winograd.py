"""3×3 convolutions by Winograd's minimal filtering, F(m×m, 3×3), for float32 on the CPU
(Lavin & Gray, 2015): tiles and filters transformed (``V = Bᵀ d B``, ``U = G g Gᵀ``), multiplied
channel-wise in one batched matrix product and transformed back (``Y = Aᵀ M A``): 2.25× (m = 2) or
4× (m = 4) fewer multiplications, done by MKL's GEMM, which runs closer to peak than oneDNN's direct
convolution on AVX2. Filters are transformed once, in float64, and kept: (m+2)²/9 of their size.

Largest error against float64 relative to the output's largest value (tests/test_winograd.py):
F(2, 3) about 4e-7, F(4, 3) 4e-6 to 1.4e-5, oneDNN's float32 convolution 3e-7 to 9e-6.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F

WINOGRAD_TILES = (2, 4)


@functools.lru_cache(maxsize=None)
def winograd_matrices(m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Bᵀ, G, Aᵀ)`` of F(m, 3) in float64: interpolation points 0, ±1 (m = 2) and
    0, ±1, ±2 (m = 4), each with the point at infinity."""
    if m == 2:
        bt = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
        g = [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]]
        at = [[1, 1, 1, 0], [0, 1, -1, -1]]
    elif m == 4:
        bt = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
              [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
        g = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
             [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
        at = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
    else:
        raise ValueError(f"Winograd tile size must be one of {WINOGRAD_TILES}, got {m}")
    return tuple(torch.tensor(a, dtype=torch.float64) for a in (bt, g, at))


def _plain_three_by_three(conv: torch.nn.Module) -> bool:
    """A 3×3 convolution with stride 1 or 2, zero padding 1, no dilation or groups (the
    ones :func:`im2col_conv2d` runs; Winograd's, stride 1 only)."""
    return (isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride in ((1, 1), (2, 2))
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


def winograd_filters(weight: torch.Tensor, m: int) -> torch.Tensor:
    """``U = G g Gᵀ`` for every filter: (K, C, 3, 3) -> ((m+2)², K, C), computed in float64
    (one product with G ⊗ G) and returned in ``weight``'s dtype."""
    if weight.ndim != 4 or weight.shape[-2:] != (3, 3):
        raise ValueError(f"expected (K, C, 3, 3) filters, got {tuple(weight.shape)}")
    _, g, _ = winograd_matrices(m)
    k, c = weight.shape[:2]
    kron = torch.kron(g, g).to(weight.device)  # ((m+2)², 9): U[p·a + q] = Σ G[p, i] G[q, j] g[i, j]
    u = torch.mm(weight.detach().reshape(k * c, 9).to(torch.float64), kron.T)
    return u.T.to(weight.dtype).reshape(-1, k, c).contiguous()


@functools.lru_cache(maxsize=None)
def _transforms(m: int, channels: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The input transform as a grouped convolution's weight ((m+2)²·C, 1, m+2, m+2) and
    the output transform as an (m², (m+2)²) matrix."""
    bt, _, at = winograd_matrices(m)
    a = m + 2
    input_kernel = torch.einsum("pi,qj->pqij", bt, bt).reshape(a * a, 1, a, a)
    output = torch.einsum("pi,qj->pqij", at, at).reshape(m * m, a * a)
    return input_kernel.repeat(channels, 1, 1, 1).to(dtype), output.to(dtype)


def winograd_conv2d(x: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor | None, m: int) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3×3 ``weight``, given its
    :func:`winograd_filters` ``filters`` (same ``m``). Any height and width (the last
    tiles are cut to size); no autograd formula is needed (inference only)."""
    b, c, h, w = x.shape
    a = m + 2
    taps, k, c_filters = filters.shape
    if taps != a * a or c_filters != c:
        raise ValueError(f"filters of shape {tuple(filters.shape)} do not fit F({m}, 3) and {c} input channels")
    input_kernel, output_transform = _transforms(m, c, x.dtype)
    th, tw = -(-h // m), -(-w // m)
    x = x.contiguous()
    if th * m != h or tw * m != w:  # pad the bottom and right so that the tiles cover the image
        x = F.pad(x, (0, tw * m - w, 0, th * m - h))
    # Every (m+2)×(m+2) tile with stride m, transformed: (B, C·(m+2)², th, tw).
    v = F.conv2d(x, input_kernel, stride=m, padding=1, groups=c)
    tiles = th * tw
    # (positions, C, B·tiles); a strided view for one image, which MKL reads as it is.
    v = v.view(b, c, a * a, tiles).permute(2, 1, 0, 3)
    v = v.reshape(a * a, c, b * tiles) if b > 1 else v.squeeze(2)
    products = torch.bmm(filters, v)  # (positions, K, B·tiles)
    y = torch.mm(output_transform, products.view(a * a, -1))  # (m·m, K·B·tiles)
    y = y.view(m, m, k, b, th, tw).permute(3, 2, 4, 0, 5, 1)  # (B, K, th, m, tw, m)
    out = torch.empty((b, k, th, m, tw, m), dtype=x.dtype, device=x.device)
    if bias is None:
        out.copy_(y)
    else:
        torch.add(y, bias.view(1, k, 1, 1, 1, 1), out=out)
    out = out.view(b, k, th * m, tw * m)
    return out[:, :, :h, :w].contiguous() if th * m != h or tw * m != w else out



class WinogradBudget:
    """Bytes that transformed filters may take, shared by the convolutions of a model
    (filters are transformed when a convolution first runs at a size that uses them)."""

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = max_bytes
        self.used = 0

    def take(self, nbytes: int) -> bool:
        if self.max_bytes is not None and self.used + nbytes > self.max_bytes:
            return False
        self.used += nbytes
        return True


def im2col_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  stride: int = 1) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding=1)`` for a 3×3 ``weight`` as one matrix
    product over the unfolded input. On small feature maps with many channels this beats
    oneDNN's convolution, which reorders the whole filter bank at every call (stride 2
    included: 1280 channels, 16² -> 8², 40.6 -> 15.6 ms on 2 AVX2 cores)."""
    b = x.shape[0]
    h, w = (x.shape[2] - 1) // stride + 1, (x.shape[3] - 1) // stride + 1
    k = weight.shape[0]
    cols = F.unfold(x, 3, padding=1, stride=stride)  # (B, C·9, H·W) of the output
    flat = weight.reshape(k, -1)
    if b == 1:
        out = torch.mm(flat, cols[0]) if bias is None else torch.addmm(bias[:, None], flat, cols[0])
        return out.view(1, k, h, w)
    out = torch.matmul(flat, cols)
    if bias is not None:
        out += bias[:, None]
    return out.view(b, k, h, w)


#: Which F(m, 3) runs at which feature-map size (the smaller side, at least). Measured
#: per convolution on 2 AVX2 cores against oneDNN (benchmarks/results/winograd_cpu.md):
#: F(4, 3) 1.5-2.3× at 32² and 64², F(2, 3) 2.0-2.7× at 16² and 8², unfolding 1.2-2.3×
#: at 16² and 8². In a whole 512² model call, adding ``(16, 2)`` gained only a few
#: percent for 1.8 GB more filters, so by default the maps under 32² are unfolded instead.
DEFAULT_PLAN = ((32, 4),)


def _winograd_forward(self, x: torch.Tensor) -> torch.Tensor:
    if (x.ndim == 4 and x.dtype == torch.float32 and x.device.type == "cpu" and self.weight.dtype == torch.float32
            and not torch.is_grad_enabled()):
        side = min(x.shape[-2:])
        tile = next((m for min_side, m in self._winograd_plan if side >= min_side), None)
        filters = _cached_filters(self, tile) if tile is not None else None
        if filters is not None:
            return winograd_conv2d(x, filters, self.bias, tile)
        if side <= self._im2col_max_size:
            return im2col_conv2d(x, self.weight, self.bias, self.stride[0])
    return type(self).forward(self, x)


_transform_seconds = 0.0


def filter_transform_seconds() -> float:
    """Seconds this process has spent transforming filters (a one-off cost of the first
    call at each size, which timings meant for later calls leave out)."""
    return _transform_seconds


def _cached_filters(conv, tile: int) -> torch.Tensor | None:
    """The filters for F(tile, 3), transformed again when the weights changed; None
    when the budget has no room for them."""
    weight = conv.weight
    # Inference tensors (made under torch.inference_mode) keep no version counter.
    key = (weight.data_ptr(), None if weight.is_inference() else weight._version, weight.dtype)
    cached_key, filters = conv._winograd_cache.get(tile, (None, None))
    if cached_key == key:
        return filters
    if filters is not None:
        conv._winograd_budget.used -= filters.numel() * filters.element_size()
    nbytes = (tile + 2) ** 2 * conv.out_channels * conv.in_channels * conv.weight.element_size()
    filters = None
    if conv._winograd_budget.take(nbytes):
        global _transform_seconds
        start = time.perf_counter()
        filters = winograd_filters(conv.weight, tile)
        _transform_seconds += time.perf_counter() - start
    conv._winograd_cache[tile] = (key, filters)
    return filters


def enable_winograd(module: torch.nn.Module, plan: tuple[tuple[int, int], ...] = DEFAULT_PLAN,
                    im2col_max_size: int = 16, budget: WinogradBudget | int | None = None) -> int:
    """Run ``module``'s plain 3×3 convolutions faster for float32 CPU inputs without autograd.

    ``plan``: ``(min_side, m)`` pairs, largest first: F(m, 3) where the smaller side is at
    least ``min_side``; other sides up to ``im2col_max_size`` (and stride-2 convolutions)
    are unfolded (:func:`im2col_conv2d`), the rest run by oneDNN. Transformed filters are
    made on first use and kept within ``budget`` (bytes or a shared :class:`WinogradBudget`).
    Returns the number of convolutions set up."""
    for _, tile in plan:
        if tile not in WINOGRAD_TILES:
            raise ValueError(f"Winograd tile size must be one of {WINOGRAD_TILES}, got {tile}")
    if not isinstance(budget, WinogradBudget):
        budget = WinogradBudget(budget)
    plan = tuple(sorted(plan, reverse=True))
    count = 0
    for conv in module.modules():
        if not _plain_three_by_three(conv):
            continue
        conv._winograd_plan = plan if conv.stride == (1, 1) else ()
        conv._im2col_max_size, conv._winograd_budget = im2col_max_size, budget
        conv._winograd_cache = {}
        conv.forward = _winograd_forward.__get__(conv)
        count += 1
    return count


def winograd_bytes(module: torch.nn.Module) -> int:
    """Bytes held by the transformed filters of ``module``'s convolutions."""
    return sum(f.numel() * f.element_size() for conv in module.modules()
               for _, f in conv.__dict__.get("_winograd_cache", {}).values() if f is not None)
