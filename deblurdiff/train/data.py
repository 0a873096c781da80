"""Training datasets.

* :class:`PairedDataset`: ``root/sharp/*`` and ``root/blurry/*`` with matching names
  (relative path without extension), as the reference trains (it reads each
  ``HR`` image and the ``Blur`` image beside it).
* :class:`SyntheticBlurDataset`: a folder of sharp images, degraded on the fly by
  :func:`deblurdiff.train.degradation.degrade`.

Both crop to ``resolution`` (random or centred; images whose shorter side is smaller
are first enlarged), optionally flip horizontally, and return a dict with

* ``sharp``: float32 (3, H, W) in [-1, 1] (the range the VAE encodes the target from),
* ``blurry``: float32 (3, H, W) in [0, 1] (the reference encodes the condition ``c``
  from [0, 1], and the pipeline does the same at inference),
* ``prompt``: the text prompt (the reference always trains with ""),
* ``name``: the image's path relative to its folder.

All randomness of a sample comes from ``numpy.random.default_rng([seed, epoch, index])``:
a sample is reproducible, and changes from epoch to epoch through :meth:`set_epoch`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset

from .degradation import DegradationConfig, degrade, sample_rng

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive), as sorted paths relative to it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(
        p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def load_rgb(path: str | Path) -> np.ndarray:
    with PIL.Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def match_pairs(sharp_dir: str | Path, blurry_dir: str | Path) -> list[tuple[Path, Path]]:
    """``(sharp, blurry)`` absolute paths matched by relative path without extension."""
    sharp_dir, blurry_dir = Path(sharp_dir), Path(blurry_dir)
    blurry = {p.with_suffix(""): p for p in list_images(blurry_dir)}
    pairs, missing = [], []
    for rel in list_images(sharp_dir):
        match = blurry.get(rel.with_suffix(""))
        if match is None:
            missing.append(str(rel))
        else:
            pairs.append((sharp_dir / rel, blurry_dir / match))
    if not pairs:
        raise ValueError(f"no image in {sharp_dir} has a counterpart with the same name in {blurry_dir}")
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        print(f"[data] {len(missing)} sharp image(s) without a blurry counterpart skipped: {shown}")
    return pairs


def _enlarge_to(image: np.ndarray, min_side: int) -> np.ndarray:
    h, w = image.shape[:2]
    if min(h, w) >= min_side:
        return image
    scale = min_side / min(h, w)
    size = (max(min_side, round(w * scale)), max(min_side, round(h * scale)))
    return np.asarray(PIL.Image.fromarray(image).resize(size, PIL.Image.BICUBIC))


def _crop_box(h: int, w: int, resolution: int, rng: np.random.Generator, random_crop: bool) -> tuple[int, int]:
    if random_crop:
        return int(rng.integers(0, h - resolution + 1)), int(rng.integers(0, w - resolution + 1))
    return (h - resolution) // 2, (w - resolution) // 2


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """float HWC in [0, 1] -> (3, H, W) float32."""
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1).contiguous()


class _CropFlipDataset(Dataset):
    def __init__(
        self,
        resolution: int | None = 512,
        random_crop: bool = True,
        random_flip: bool = True,
        prompt: str = "",
        seed: int = 0,
    ):
        if resolution is not None and resolution < 8:
            raise ValueError(f"resolution must be at least 8 (or None for whole images), got {resolution}")
        self.resolution = resolution
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.prompt = prompt
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw different crops, flips and degradations in each epoch."""
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        return sample_rng(self.seed, index, self.epoch)

    def _crop_flip(self, images: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        """Same crop and flip for every image of a sample (all of one size)."""
        if len({im.shape for im in images}) > 1:
            raise ValueError(f"images of a pair differ in size: {[im.shape for im in images]}")
        if self.resolution is not None:
            images = [_enlarge_to(im, self.resolution) for im in images]
            h, w = images[0].shape[:2]
            top, left = _crop_box(h, w, self.resolution, rng, self.random_crop)
            r = self.resolution
            images = [im[top : top + r, left : left + r] for im in images]
        if self.random_flip and rng.random() < 0.5:
            images = [im[:, ::-1] for im in images]
        return images


class PairedDataset(_CropFlipDataset):
    """Pre-made pairs: ``sharp_dir`` and ``blurry_dir`` hold images of matching names."""

    def __init__(self, sharp_dir: str | Path, blurry_dir: str | Path, **kwargs):
        super().__init__(**kwargs)
        self.pairs = match_pairs(sharp_dir, blurry_dir)
        self.sharp_dir = Path(sharp_dir)

    @classmethod
    def from_root(cls, root: str | Path, **kwargs) -> "PairedDataset":
        root = Path(root)
        return cls(root / "sharp", root / "blurry", **kwargs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        sharp_path, blurry_path = self.pairs[index]
        rng = self._rng(index)
        sharp, blurry = self._crop_flip([load_rgb(sharp_path), load_rgb(blurry_path)], rng)
        return {
            "sharp": _to_tensor(sharp / 255.0) * 2 - 1,
            "blurry": _to_tensor(blurry / 255.0),
            "prompt": self.prompt,
            "name": str(sharp_path.relative_to(self.sharp_dir)),
        }


class SyntheticBlurDataset(_CropFlipDataset):
    """Sharp images from a folder, cropped, flipped and degraded on the fly."""

    def __init__(self, sharp_dir: str | Path, degradation: DegradationConfig | dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.sharp_dir = Path(sharp_dir)
        self.files = list_images(self.sharp_dir)
        if not self.files:
            raise ValueError(f"no images found in {self.sharp_dir}")
        if not isinstance(degradation, DegradationConfig):
            degradation = DegradationConfig.from_dict(degradation)
        self.degradation = degradation

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        rng = self._rng(index)
        (sharp,) = self._crop_flip([load_rgb(self.sharp_dir / self.files[index])], rng)
        sharp = sharp.astype(np.float32) / 255.0
        blurry = degrade(sharp, rng, self.degradation)
        return {
            "sharp": _to_tensor(sharp) * 2 - 1,
            "blurry": _to_tensor(blurry),
            "prompt": self.prompt,
            "name": str(self.files[index]),
        }


def build_dataset(config, seed: int = 0) -> _CropFlipDataset:
    """The dataset a :class:`deblurdiff.train.config.DataConfig` describes."""
    sharp_dir, blurry_dir = config.folders()
    options = dict(
        resolution=config.resolution,
        random_crop=config.random_crop,
        random_flip=config.random_flip,
        prompt=config.prompt,
        seed=seed,
    )
    if config.type == "paired":
        return PairedDataset(sharp_dir, blurry_dir, **options)
    return SyntheticBlurDataset(sharp_dir, degradation=config.degradation, **options)
