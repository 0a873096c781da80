"""Synthetic blur kernels (point-spread functions) and a convolution helper.

Used to make the example gallery and reusable for generating training pairs.
Everything here depends on numpy only.

Conventions
-----------
* Kernels are 2-D ``float64`` arrays, non-negative, summing to 1, with odd side
  lengths so that the centre pixel is well defined (a kernel applied with
  :func:`apply_kernel` does not shift the image when its centroid is at the
  centre pixel).
* Coordinates are ``(x, y)`` with ``x`` to the right and ``y`` *down*, as in an
  image. Angles are in degrees, measured counter-clockwise *as displayed*
  (0 = horizontal, 90 = vertical).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np

__all__ = [
    "motion_kernel",
    "linear_motion_kernel",
    "defocus_kernel",
    "apply_kernel",
]

RngLike = Union[np.random.Generator, int, None]


def _as_rng(rng: RngLike) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (bool, np.bool_)):
        raise TypeError("rng must be a numpy Generator, an integer seed or None, not a bool")
    return np.random.default_rng(rng)


def _check_odd_size(size: int, name: str = "size", minimum: int = 1) -> int:
    if isinstance(size, (bool, np.bool_)) or not isinstance(size, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(size).__name__}")
    size = int(size)
    if size < minimum or size % 2 == 0:
        raise ValueError(f"{name} must be an odd integer >= {minimum}, got {size}")
    return size


def _splat(kernel: np.ndarray, xs: np.ndarray, ys: np.ndarray, weights: np.ndarray) -> None:
    """Add ``weights`` at sub-pixel positions ``(xs, ys)`` with bilinear interpolation.

    Positions are in pixel coordinates of ``kernel`` (pixel centres at integers).
    Mass falling outside the kernel is dropped (callers keep points inside).
    """
    h, w = kernel.shape
    x0 = np.floor(xs).astype(np.int64)
    y0 = np.floor(ys).astype(np.int64)
    fx = xs - x0
    fy = ys - y0
    for dx, dy, wgt in (
        (0, 0, (1 - fx) * (1 - fy)),
        (1, 0, fx * (1 - fy)),
        (0, 1, (1 - fx) * fy),
        (1, 1, fx * fy),
    ):
        xi = x0 + dx
        yi = y0 + dy
        ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        np.add.at(kernel, (yi[ok], xi[ok]), (weights * wgt)[ok])


def _normalise(kernel: np.ndarray) -> np.ndarray:
    kernel = np.clip(kernel, 0.0, None)
    total = kernel.sum()
    if not np.isfinite(total) or total <= 0:
        # Degenerate input: fall back to the identity kernel.
        kernel = np.zeros_like(kernel)
        kernel[kernel.shape[0] // 2, kernel.shape[1] // 2] = 1.0
        return kernel
    return kernel / total


def _delta(size: int) -> np.ndarray:
    k = np.zeros((size, size), dtype=np.float64)
    k[size // 2, size // 2] = 1.0
    return k


def _rasterise_path(points: np.ndarray, size: int, samples_per_px: int = 8) -> np.ndarray:
    """Rasterise a polyline traversed at one segment per unit time.

    Each segment receives the same total weight (the camera spends the same
    exposure time on each step), spread evenly along its length, so slow parts
    of the trajectory come out brighter, as in a real long exposure.
    """
    kernel = np.zeros((size, size), dtype=np.float64)
    if len(points) == 1:
        _splat(kernel, points[:1, 0], points[:1, 1], np.ones(1))
        return _normalise(kernel)
    starts = points[:-1]
    ends = points[1:]
    seg_len = np.linalg.norm(ends - starts, axis=1)
    xs, ys, ws = [], [], []
    for (p, q, length) in zip(starts, ends, seg_len):
        n = max(2, int(math.ceil(length * samples_per_px)) + 1)
        # Midpoint sampling: n samples evenly inside the segment, none shared.
        t = (np.arange(n) + 0.5) / n
        xs.append(p[0] + (q[0] - p[0]) * t)
        ys.append(p[1] + (q[1] - p[1]) * t)
        ws.append(np.full(n, 1.0 / n))
    _splat(kernel, np.concatenate(xs), np.concatenate(ys), np.concatenate(ws))
    return _normalise(kernel)


def motion_kernel(
    size: int,
    rng: RngLike = None,
    *,
    intensity: Optional[float] = None,
    num_steps: int = 64,
    momentum: float = 0.85,
) -> np.ndarray:
    """Camera-shake kernel from a random, smooth camera trajectory.

    The trajectory is a random walk with inertia: at each of ``num_steps``
    steps the velocity keeps ``momentum`` of its previous value and receives a
    random Gaussian acceleration; with a probability growing with
    ``intensity`` it also receives an abrupt jerk (a sudden hand movement).
    The path is centred on its centroid, scaled so that it spans the kernel
    (its farthest point is one pixel inside the border) and rasterised with
    sub-pixel (bilinear) accuracy, giving equal exposure time to every step.

    Parameters
    ----------
    size:
        Odd kernel side length in pixels (>= 3). The blur extent scales with it.
    rng:
        ``numpy.random.Generator``, integer seed or ``None``. The same seed
        always gives the same kernel.
    intensity:
        Shakiness in ``[0, 1]``: 0 gives a gently curved stroke, 1 an erratic
        zig-zag. ``None`` draws it uniformly from ``[0.1, 0.9]`` using ``rng``.
    num_steps:
        Number of trajectory steps (>= 2).
    momentum:
        Velocity persistence in ``[0, 1)``; higher gives smoother paths.

    Returns
    -------
    ``(size, size)`` float64 array, non-negative, summing to 1.
    """
    size = _check_odd_size(size, minimum=3)
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    gen = _as_rng(rng)
    if intensity is None:
        intensity = float(gen.uniform(0.1, 0.9))
    intensity = float(intensity)
    if not 0.0 <= intensity <= 1.0:
        raise ValueError(f"intensity must be in [0, 1], got {intensity}")

    angle = gen.uniform(0.0, 2.0 * math.pi)
    velocity = np.array([math.cos(angle), math.sin(angle)])
    position = np.zeros(2)
    points = [position.copy()]
    jerk_probability = 0.02 + 0.18 * intensity
    accel_scale = 0.15 + 0.85 * intensity
    for _ in range(num_steps):
        accel = gen.normal(0.0, accel_scale, size=2)
        # Weak pull back towards the start: hands shake around a rest position.
        accel -= 0.02 * intensity * position
        if gen.random() < jerk_probability:
            accel += gen.normal(0.0, 2.0 + 4.0 * intensity, size=2)
        velocity = momentum * velocity + (1.0 - momentum) * accel * 4.0
        speed = np.linalg.norm(velocity)
        if speed > 0:
            # Speed varies smoothly around 1 (never stops entirely).
            target = 1.0 + 0.5 * gen.standard_normal() * intensity
            velocity *= max(0.2, target) / speed
        position = position + velocity
        points.append(position.copy())
    path = np.asarray(points)

    # Centre on the time-weighted centroid so the blurred image is not shifted.
    path -= path.mean(axis=0)
    extent = np.abs(path).max()
    radius = size // 2 - 1
    if extent > 0:
        path *= radius / extent
    path += size // 2
    return _rasterise_path(path, size)


def linear_motion_kernel(length: float, angle: float, size: Optional[int] = None) -> np.ndarray:
    """Uniform straight-line motion blur.

    Parameters
    ----------
    length:
        Length of the motion in pixels (>= 0; 0 gives the identity kernel).
    angle:
        Direction in degrees, counter-clockwise as displayed (0 = horizontal).
    size:
        Odd kernel side; by default the smallest odd size that holds the line
        plus a one-pixel margin.

    Returns
    -------
    ``(size, size)`` float64 array, non-negative, summing to 1.
    """
    length = float(length)
    angle = float(angle)
    if not math.isfinite(length) or length < 0:
        raise ValueError(f"length must be a finite number >= 0, got {length}")
    if not math.isfinite(angle):
        raise ValueError(f"angle must be finite, got {angle}")
    if size is None:
        size = 2 * int(math.ceil(length / 2.0)) + 3
    size = _check_odd_size(size)
    if length < 1e-6:
        return _delta(size)
    max_len = 2.0 * (size // 2)
    if length > max_len + 1e-9:
        # Checked against the horizontal/vertical extent so that every angle fits.
        raise ValueError(f"length {length} does not fit in a kernel of size {size} (max {max_len:g})")
    theta = math.radians(angle)
    dx, dy = math.cos(theta), -math.sin(theta)  # y axis points down
    c = size // 2
    half = length / 2.0
    points = np.array([[c - half * dx, c - half * dy], [c + half * dx, c + half * dy]])
    return _rasterise_path(points, size)


def defocus_kernel(radius: float, size: Optional[int] = None, *, supersample: int = 8) -> np.ndarray:
    """Out-of-focus blur: a uniform disk with anti-aliased edges.

    Parameters
    ----------
    radius:
        Disk radius in pixels (>= 0; below 0.5 gives the identity kernel).
    size:
        Odd kernel side; by default the smallest odd size holding the disk,
        ``2 * ceil(radius - 0.5) + 1``.
    supersample:
        Sub-samples per pixel side used to compute the partial coverage of
        edge pixels.

    Returns
    -------
    ``(size, size)`` float64 array, non-negative, summing to 1.
    """
    radius = float(radius)
    if not math.isfinite(radius) or radius < 0:
        raise ValueError(f"radius must be a finite number >= 0, got {radius}")
    if size is None:
        size = 2 * max(0, int(math.ceil(radius - 0.5))) + 1
    size = _check_odd_size(size)
    if radius < 0.5:
        return _delta(size)
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    c = size // 2
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    coords = (np.arange(size) - c)[:, None] + offsets[None, :]  # (size, s)
    coords = coords.reshape(-1)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    inside = (xx * xx + yy * yy) <= radius * radius
    coverage = inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))
    return _normalise(coverage.astype(np.float64))


_PAD_MODES = {"reflect", "symmetric", "edge", "wrap", "constant"}


def apply_kernel(image_array: np.ndarray, kernel: np.ndarray, *, mode: str = "reflect") -> np.ndarray:
    """Convolve an image with a blur kernel (true convolution, FFT based).

    Parameters
    ----------
    image_array:
        ``H x W`` or ``H x W x C`` array. Integer images (uint8, uint16) are
        returned with the same dtype, rounded and clipped to the dtype's range;
        float images are returned as float (same dtype for float32/float64)
        without clipping.
    kernel:
        2-D kernel; it is used as given (not re-normalised).
    mode:
        Border handling, a ``numpy.pad`` mode: ``reflect`` (default),
        ``symmetric``, ``edge``, ``wrap`` or ``constant`` (zeros).

    Returns
    -------
    Array with the same shape as ``image_array``; output pixel ``(y, x)`` is
    centred on input pixel ``(y, x)`` for odd-sized kernels.
    """
    img = np.asarray(image_array)
    k = np.asarray(kernel, dtype=np.float64)
    if k.ndim != 2 or k.size == 0:
        raise ValueError(f"kernel must be a non-empty 2-D array, got shape {k.shape}")
    if img.ndim not in (2, 3):
        raise ValueError(f"image_array must be H x W or H x W x C, got shape {img.shape}")
    if mode not in _PAD_MODES:
        raise ValueError(f"mode must be one of {sorted(_PAD_MODES)}, got {mode!r}")
    if img.dtype == np.bool_ or img.dtype.kind not in "uif":
        raise TypeError(f"unsupported image dtype {img.dtype}")

    squeeze = img.ndim == 2
    data = img[..., None] if squeeze else img
    h, w, _ = data.shape
    kh, kw = k.shape
    pad_y = (kh // 2, kh - 1 - kh // 2)
    pad_x = (kw // 2, kw - 1 - kw // 2)
    padded = np.pad(data.astype(np.float64), (pad_y, pad_x, (0, 0)), mode=mode)
    ph, pw = padded.shape[:2]
    spec_img = np.fft.rfft2(padded, s=(ph, pw), axes=(0, 1))
    spec_k = np.fft.rfft2(k, s=(ph, pw))
    full = np.fft.irfft2(spec_img * spec_k[..., None], s=(ph, pw), axes=(0, 1))
    out = full[kh - 1 : kh - 1 + h, kw - 1 : kw - 1 + w]
    if squeeze:
        out = out[..., 0]

    if img.dtype.kind in "ui":
        info = np.iinfo(img.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(img.dtype)
    if img.dtype in (np.float32, np.float64):
        return out.astype(img.dtype, copy=False)
    return out.astype(np.float32)
