"""Windowed spatial transformers, as in the reference.

The reference's ``SpatialTransformer`` runs the whole block (norm, projections,
transformer blocks) on overlapping square windows of the map, averages the overlaps and
adds the residual. Window side ``k``: in the SD UNet and the LKPN's UNet 64 at the first
level, halved at each downsampling and doubled again in the decoder; 64 everywhere in the
ControlNet. Per dimension the window is ``min(k, side)``: up to a 64×64 latent (512 px)
this is global attention, above it only windows reproduce the reference.

:func:`enable_windowed_attention` replaces the ``forward`` of each ``Transformer2DModel``
instance (state-dict keys untouched); a map that fits one window runs the original.
"""

from __future__ import annotations

import types

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

DEFAULT_WINDOW = 64

__all__ = ["DEFAULT_WINDOW", "attention_windows", "enable_windowed_attention", "ensure_attention_layout",
           "windowed_transformer_forward"]


def _repeat_batch(value, windows: int, batch: int):
    """Repeat a per-sample tensor for every window (window-major order)."""
    if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch:
        return value.repeat(windows, *([1] * (value.ndim - 1)))
    return value


def _window_index(side, k: int, device: torch.device) -> torch.Tensor:
    """(n, min(k, side)) indices of the pixels of each window along one dimension, placed as
    the reference places them: ``n = ceil(side / k)`` windows spaced by
    ``ceil((side - k) / (n - 1))``, the last one moved back to end at the edge. Integer
    arithmetic only: ``side`` may be a symbolic size (``torch.export`` with dynamic shapes),
    so nothing here branches on it."""
    count = (side + k - 1) // k  # ceil(side / k): one window when side <= k
    k = torch.sym_min(k, side)
    gaps = torch.sym_max(count - 1, 1)
    step = (side - k + gaps - 1) // gaps
    starts = torch.clamp(torch.arange(count, device=device) * step, max=side - k)
    return starts[:, None] + torch.arange(k, device=device)[None, :]


def _overlap_add_by_matmul(out: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, b, h, w):
    """The window outputs summed at their places, and the windows over each pixel, as
    ``P_h @ windows @ P_w^T`` with one-hot placement matrices: under symbolic sizes Inductor's
    ahead-of-time compilation fails on ``index_add``'s scatter. The factors are exact; sums
    may round in another order."""
    n_h, kh = rows.shape
    n_w, kw = cols.shape
    c = out.shape[1]
    windows = out.view(n_h, n_w, b, c, kh, kw).permute(2, 3, 0, 4, 1, 5)
    windows = windows.clone(memory_format=torch.contiguous_format).view(b, c, n_h * kh, n_w * kw)
    place_h = (rows.reshape(n_h * kh)[None, :] == torch.arange(h, device=out.device)[:, None]).to(out.dtype)
    place_w = (cols.reshape(n_w * kw)[None, :] == torch.arange(w, device=out.device)[:, None]).to(out.dtype)
    total = torch.matmul(torch.matmul(place_h, windows), place_w.t())
    count = place_h.sum(1)[:, None] * place_w.sum(1)[None, :]
    return total, count


def windowed_transformer_forward(self, hidden_states: torch.Tensor, *args, **kwargs):
    """``Transformer2DModel.forward`` on the reference's windows of ``hidden_states``: gathered
    with index tensors and summed back with ``index_add``, so the same code runs eagerly and
    under ``torch.export`` with symbolic height and width."""
    window = getattr(self, "attention_window", None)
    original = type(self).forward
    if window is None or hidden_states.ndim != 4:
        return original(self, hidden_states, *args, **kwargs)
    b, c, h, w = hidden_states.shape
    symbolic = isinstance(h, torch.SymInt) or isinstance(w, torch.SymInt)
    if not symbolic and h <= window and w <= window:
        return original(self, hidden_states, *args, **kwargs)  # one window: global attention
    if args:
        raise TypeError("windowed attention takes the transformer's arguments by keyword only")
    if kwargs.get("attention_mask") is not None:
        raise NotImplementedError("windowed attention does not support a spatial attention_mask")

    rows = _window_index(h, window, hidden_states.device)  # (n_h, kh)
    cols = _window_index(w, window, hidden_states.device)  # (n_w, kw)
    n_h, kh = rows.shape
    n_w, kw = cols.shape
    n = n_h * n_w
    # Flat pixel index of every window, window-major (rows outer, columns inner).
    pixels = (rows[:, None, :, None] * w + cols[None, :, None, :]).reshape(n * kh * kw)
    flat = hidden_states.clone(memory_format=torch.contiguous_format).view(b, c, h * w)
    # Windows stacked along the batch, window-major: (n * b, c, kh, kw).
    # (``clone``, not ``contiguous``/``reshape``: those branch on the layout, which
    # depends on whether there is one window, a guard on the size when exporting.)
    parts = flat.index_select(2, pixels).view(b, c, n, kh, kw).permute(2, 0, 1, 3, 4)
    parts = parts.clone(memory_format=torch.contiguous_format).view(n * b, c, kh, kw)
    for name in ("encoder_hidden_states", "encoder_attention_mask", "timestep", "class_labels"):
        if name in kwargs:
            kwargs[name] = _repeat_batch(kwargs[name], n, b)
    if kwargs.get("added_cond_kwargs"):
        kwargs["added_cond_kwargs"] = {k: _repeat_batch(v, n, b) for k, v in kwargs["added_cond_kwargs"].items()}
    return_dict = kwargs.pop("return_dict", True)
    out = original(self, parts, **kwargs, return_dict=False)[0]

    # The residual is the same in every window covering a pixel, so averaging the
    # full outputs equals averaging the transformer's part and adding the residual.
    c_out = out.shape[1]
    if symbolic:
        total, count = _overlap_add_by_matmul(out, rows, cols, b, h, w)
    else:
        out = out.clone(memory_format=torch.contiguous_format).view(n, b, c_out, kh * kw).permute(1, 2, 0, 3)
        out = out.clone(memory_format=torch.contiguous_format).view(b, c_out, n * kh * kw)
        total = out.new_zeros(b, c_out, h * w).index_add(2, pixels, out).view(b, c_out, h, w)
        count = out.new_zeros(h * w).index_add(0, pixels, out.new_ones(n * kh * kw)).view(h, w)
    result = total / count
    return Transformer2DModelOutput(sample=result) if return_dict else (result,)


def _set_window(module: nn.Module, window: int | None) -> None:
    module.attention_window = window
    if not isinstance(module.__dict__.get("forward"), types.MethodType):
        module.forward = types.MethodType(windowed_transformer_forward, module)


def attention_windows(model: nn.Module, base: int | None = DEFAULT_WINDOW) -> dict[str, int | None]:
    """The reference's window side for each spatial transformer of ``model``, by module name.
    Models describe their layout with two class attributes: ``attention_window_root`` (the
    submodule holding the blocks) and ``attention_window_per_level`` (False: one window)."""
    root = getattr(model, "attention_window_root", None)
    if root:
        inner = attention_windows(model.get_submodule(root), base)
        return {f"{root}.{k}": v for k, v in inner.items()}
    per_level = getattr(model, "attention_window_per_level", True)
    levels = len(model.down_blocks)

    def size(level: int) -> int | None:
        if base is None:
            return None
        return max(base >> level, 1) if per_level else base

    windows: dict[str, int | None] = {}
    for i, block in enumerate(model.down_blocks):
        for a, _ in enumerate(getattr(block, "attentions", None) or []):
            windows[f"down_blocks.{i}.attentions.{a}"] = size(i)
    mid = getattr(model, "mid_block", None)
    for a, _ in enumerate(getattr(mid, "attentions", None) or []):
        windows[f"mid_block.attentions.{a}"] = size(levels - 1)
    for j, block in enumerate(getattr(model, "up_blocks", None) or []):
        for a, _ in enumerate(getattr(block, "attentions", None) or []):
            windows[f"up_blocks.{j}.attentions.{a}"] = size(levels - 1 - j)
    return windows


def enable_windowed_attention(model: nn.Module, base: int | None = DEFAULT_WINDOW) -> dict[str, int | None]:
    """Give every spatial transformer of ``model`` the reference's window, ``base`` at the first
    level (``None``: global attention), in place; returns the window per module name."""
    windows = attention_windows(model, base)
    for name, window in windows.items():
        _set_window(model.get_submodule(name), window)
    return windows


def ensure_attention_layout(model: nn.Module, base: int | None = DEFAULT_WINDOW) -> bool:
    """Give ``model`` the reference's windows unless :func:`enable_windowed_attention` gave it
    a layout (windows or global) already (a plain diffusers UNet just loaded has none);
    returns whether it set one."""
    if any(hasattr(model.get_submodule(name), "attention_window") for name in attention_windows(model)):
        return False
    enable_windowed_attention(model, base)
    return True
