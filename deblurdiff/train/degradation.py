"""On-the-fly synthetic degradation of sharp images into blurry training inputs.

The chain is the one named in the reference's training configuration (the
CodeFormer/DiffBIR "first-order" degradation):

1. blur with a random kernel: isotropic or anisotropic Gaussian (41 x 41,
   sigma 0.1-12) as in the reference, plus camera-shake kernels from random
   trajectories (and optionally straight-line motion and defocus disks) from
   :mod:`deblurdiff.train.blur_kernels`;
2. bilinear downsampling by a random factor in [1, 12];
3. additive Gaussian noise, sigma in [0, 15] on the 0-255 scale, clipped;
4. JPEG compression, quality in [30, 100];
5. bilinear resize back to the original size.

Every random draw comes from one ``numpy.random.Generator`` passed in by the
caller, so a sample is a pure function of its seed (the datasets seed it from
``(seed, epoch, index)``). Images are float32 ``H x W x 3`` RGB arrays in
[0, 1].
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .blur_kernels import apply_kernel, defocus_kernel, linear_motion_kernel, motion_kernel

KERNEL_TYPES = ("iso", "aniso", "motion", "linear_motion", "defocus")


@dataclass
class DegradationConfig:
    """Ranges of the synthetic degradation. ``[lo, hi]`` pairs are sampled uniformly.

    The Gaussian, downsampling, noise and JPEG ranges are the reference's
    (``configs/train/train.yaml``). The reference draws ``iso``/``aniso`` with
    probability 0.5 each; by default half of the kernels here are camera-shake
    kernels instead, the blur DeblurDiff is meant to remove.
    """

    kernel_size: int = 41
    kernel_list: list[str] = field(default_factory=lambda: ["iso", "aniso", "motion"])
    kernel_prob: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.5])
    # Gaussian kernels: sigma_x and sigma_y both drawn from this range, rotation in [-pi, pi].
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 12.0])
    # Camera-shake kernels: the trajectory spans an odd-sized square drawn from this range
    # (then zero-padded to kernel_size); shakiness drawn from motion_intensity.
    motion_size: list[int] = field(default_factory=lambda: [7, 41])
    motion_intensity: list[float] = field(default_factory=lambda: [0.1, 0.9])
    # Straight-line motion: length in pixels, any direction.
    linear_length: list[float] = field(default_factory=lambda: [3.0, 40.0])
    # Defocus disk radius in pixels.
    defocus_radius: list[float] = field(default_factory=lambda: [1.0, 10.0])
    downsample_range: list[float] = field(default_factory=lambda: [1.0, 12.0])
    noise_range: list[float] = field(default_factory=lambda: [0.0, 15.0])
    jpeg_range: list[int] = field(default_factory=lambda: [30, 100])

    def __post_init__(self):
        if self.kernel_size < 3 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 3, got {self.kernel_size}")
        unknown = [k for k in self.kernel_list if k not in KERNEL_TYPES]
        if unknown:
            raise ValueError(f"unknown kernel types {unknown}; choose from {list(KERNEL_TYPES)}")
        if len(self.kernel_list) != len(self.kernel_prob) or not self.kernel_list:
            raise ValueError("kernel_list and kernel_prob must be non-empty and of equal length")
        if any(p < 0 for p in self.kernel_prob) or sum(self.kernel_prob) <= 0:
            raise ValueError(f"kernel_prob must be non-negative with a positive sum, got {self.kernel_prob}")
        for name in (
            "blur_sigma",
            "motion_size",
            "motion_intensity",
            "linear_length",
            "defocus_radius",
            "downsample_range",
            "noise_range",
            "jpeg_range",
        ):
            value = getattr(self, name)
            if value is None:
                continue
            if len(value) != 2 or value[0] > value[1]:
                raise ValueError(f"{name} must be [low, high] with low <= high, got {value}")
        if self.blur_sigma[0] <= 0:
            raise ValueError(f"blur_sigma must be positive, got {self.blur_sigma}")
        if self.downsample_range[0] < 1:
            raise ValueError(f"downsample_range must be >= 1, got {self.downsample_range}")
        if self.jpeg_range is not None and not (1 <= self.jpeg_range[0] and self.jpeg_range[1] <= 100):
            raise ValueError(f"jpeg_range must lie in [1, 100], got {self.jpeg_range}")
        ms = self.motion_size
        if ms[0] < 3 or ms[1] > self.kernel_size:
            raise ValueError(f"motion_size must lie in [3, kernel_size={self.kernel_size}], got {ms}")
        if self.linear_length[1] > 2 * (self.kernel_size // 2):
            raise ValueError(f"linear_length {self.linear_length} does not fit kernel_size {self.kernel_size}")
        if 2 * math.ceil(self.defocus_radius[1] - 0.5) + 1 > self.kernel_size:
            raise ValueError(f"defocus_radius {self.defocus_radius} does not fit kernel_size {self.kernel_size}")

    @classmethod
    def from_dict(cls, values: dict | None) -> "DegradationConfig":
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown degradation settings {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- kernels
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ax = np.arange(size, dtype=np.float64) - size // 2
    return np.meshgrid(ax, ax)  # xx (columns), yy (rows)


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float | None = None, theta: float = 0.0) -> np.ndarray:
    """Normalised 2-D Gaussian on a ``size x size`` grid centred on the middle pixel.

    ``sigma_y`` defaults to ``sigma_x`` (isotropic). ``theta`` (radians) rotates the
    ``sigma_x`` axis away from the x axis.
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"size must be a positive odd integer, got {size}")
    sigma_y = sigma_x if sigma_y is None else sigma_y
    if sigma_x <= 0 or sigma_y <= 0:
        raise ValueError(f"sigmas must be positive, got {sigma_x}, {sigma_y}")
    xx, yy = _grid(size)
    c, s = math.cos(theta), math.sin(theta)
    # Coordinates in the kernel's own (rotated) axes.
    u = c * xx + s * yy
    v = -s * xx + c * yy
    kernel = np.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
    return kernel / kernel.sum()


def random_gaussian_kernel(rng: np.random.Generator, size: int, sigma_range, isotropic: bool) -> np.ndarray:
    sigma_x = rng.uniform(*sigma_range)
    if isotropic:
        return gaussian_kernel(size, sigma_x)
    sigma_y = rng.uniform(*sigma_range)
    theta = rng.uniform(-math.pi, math.pi)
    return gaussian_kernel(size, sigma_x, sigma_y, theta)


def _pad_to(kernel: np.ndarray, size: int) -> np.ndarray:
    pad = (size - kernel.shape[0]) // 2
    return np.pad(kernel, pad) if pad > 0 else kernel


def _random_odd(rng: np.random.Generator, low: int, high: int) -> int:
    odds = np.arange(low + (1 - low % 2), high + 1, 2)
    return int(rng.choice(odds))


def random_kernel(rng: np.random.Generator, config: DegradationConfig) -> tuple[str, np.ndarray]:
    """Draw a kernel type by ``kernel_prob`` and a kernel of that type, ``kernel_size`` square."""
    probs = np.asarray(config.kernel_prob, dtype=np.float64)
    kind = config.kernel_list[int(rng.choice(len(probs), p=probs / probs.sum()))]
    size = config.kernel_size
    if kind in ("iso", "aniso"):
        kernel = random_gaussian_kernel(rng, size, config.blur_sigma, isotropic=kind == "iso")
    elif kind == "motion":
        side = _random_odd(rng, int(config.motion_size[0]), int(config.motion_size[1]))
        intensity = rng.uniform(*config.motion_intensity)
        kernel = _pad_to(motion_kernel(side, rng, intensity=intensity), size)
    elif kind == "linear_motion":
        kernel = linear_motion_kernel(rng.uniform(*config.linear_length), rng.uniform(0.0, 180.0), size=size)
    else:  # defocus
        kernel = defocus_kernel(rng.uniform(*config.defocus_radius), size=size)
    return kind, kernel.astype(np.float64)


# ----------------------------------------------------------------------------- image ops
def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize without anti-aliasing (half-pixel centres, like OpenCV's INTER_LINEAR)."""
    if image.shape[:2] == (height, width):
        return image
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    out = F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


def add_gaussian_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Add N(0, sigma/255) noise per pixel and channel; clip to [0, 1]."""
    noise = rng.standard_normal(image.shape).astype(np.float32) * np.float32(sigma / 255.0)
    return np.clip(image + noise, 0.0, 1.0)


def jpeg_compress(image: np.ndarray, quality: int) -> np.ndarray:
    """Round-trip through an in-memory JPEG at ``quality`` (1-100)."""
    array = np.clip(np.rint(np.clip(image, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    return np.asarray(PIL.Image.open(buffer).convert("RGB"), dtype=np.float32) / 255.0


# ----------------------------------------------------------------------------- the chain
def degrade(
    image: np.ndarray, rng: np.random.Generator, config: DegradationConfig | None = None, return_info: bool = False
):
    """Blur -> downsample -> noise -> JPEG -> resize back. ``image``: float ``H x W x 3`` in [0, 1].

    Returns a float32 array of the same shape in [0, 1] (and, with ``return_info``,
    a dict of the parameters drawn, the kernel included).
    """
    config = config or DegradationConfig()
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 image, got shape {image.shape}")
    h, w = image.shape[:2]

    kind, kernel = random_kernel(rng, config)
    out = apply_kernel(image, kernel, mode="reflect").astype(np.float32)

    scale = float(rng.uniform(*config.downsample_range))
    small_h, small_w = max(1, int(h // scale)), max(1, int(w // scale))
    out = resize_bilinear(out, small_h, small_w)

    sigma = None
    if config.noise_range is not None:
        sigma = float(rng.uniform(*config.noise_range))
        out = add_gaussian_noise(out, sigma, rng)

    quality = None
    if config.jpeg_range is not None:
        quality = int(rng.uniform(*config.jpeg_range))
        out = jpeg_compress(out, quality)

    out = np.clip(resize_bilinear(out, h, w), 0.0, 1.0).astype(np.float32)
    if return_info:
        info = dict(kernel_type=kind, kernel=kernel, scale=scale, noise_sigma=sigma, jpeg_quality=quality)
        return out, info
    return out


def sample_rng(seed: int, index: int, epoch: int = 0) -> np.random.Generator:
    """The generator of one sample: a pure function of ``(seed, epoch, index)``."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index)])
