#!/usr/bin/env python
"""Regenerate the blurry example images in ``examples/``.

The sharp originals are freely licensed photographs shipped with
scikit-image (``skimage.data``; public domain or CC0, see the table written to
``examples/README.md``). Each one is blurred with a synthetic but realistic
kernel from :mod:`deblurdiff.train.blur_kernels`, then given a little sensor noise
and JPEG compression, as a real blurry photo would have:

1. sRGB values are converted to linear light (blur is a physical averaging of
   light, so it happens before the camera's gamma encoding);
2. the image is convolved with the kernel;
3. the result is encoded back to sRGB, mild Gaussian noise is added and it
   is quantised to 8 bits;
4. it is saved as a JPEG.

Everything is seeded, so running the script again reproduces the same kernels
and the same noise (JPEG bytes may differ across libjpeg versions).

Usage::

    python scripts/make_examples.py [--out examples]

Requires scikit-image (a development dependency) in addition to the runtime
requirements.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from deblurdiff.train.blur_kernels import (  # noqa: E402
    apply_kernel,
    defocus_kernel,
    linear_motion_kernel,
    motion_kernel,
)

KERNEL_PREVIEW_SCALE = 4
SIZE_BUDGET_BYTES = 1_000_000


@dataclass(frozen=True)
class Example:
    name: str  # output file stem
    title: str  # caption for galleries
    skimage_name: str  # function in skimage.data
    source: str  # where the original comes from
    license: str  # licence of the original, as stated by scikit-image
    kernel: Callable[[], np.ndarray]
    kernel_description: str
    seed: int  # seeds the noise
    noise_sigma: float  # noise standard deviation in 8-bit sRGB units
    jpeg_quality: int


EXAMPLES: List[Example] = [
    Example(
        name="astronaut_shake",
        title="Astronaut portrait, camera shake",
        skimage_name="astronaut",
        source="Eileen Collins, NASA Great Images database, https://flic.kr/p/r9qvLn",
        license="Public domain (no known copyright restrictions)",
        kernel=lambda: motion_kernel(27, np.random.default_rng(2024), intensity=0.35),
        kernel_description="random camera-shake trajectory, `motion_kernel(27, rng=default_rng(2024), intensity=0.35)`",
        seed=11,
        noise_sigma=1.5,
        jpeg_quality=90,
    ),
    Example(
        name="coffee_defocus",
        title="Coffee cup, out of focus",
        skimage_name="coffee",
        source="Rachel Michetti, courtesy of Pikolo Espresso Bar",
        license="CC0 (no copyright restrictions)",
        kernel=lambda: defocus_kernel(5.5),
        kernel_description="defocus disk, `defocus_kernel(radius=5.5)` (13×13)",
        seed=12,
        noise_sigma=1.5,
        jpeg_quality=90,
    ),
    Example(
        name="chelsea_shake",
        title="Chelsea the cat, strong camera shake",
        skimage_name="chelsea",
        source="Stefan van der Walt",
        license="CC0 (no copyright restrictions)",
        kernel=lambda: motion_kernel(23, np.random.default_rng(7), intensity=0.6),
        kernel_description="random camera-shake trajectory, `motion_kernel(23, rng=default_rng(7), intensity=0.6)`",
        seed=13,
        noise_sigma=2.0,
        jpeg_quality=88,
    ),
    Example(
        name="rocket_linear",
        title="Rocket launch, linear motion",
        skimage_name="rocket",
        source="SpaceX, DSCOVR launch on Falcon 9, https://www.flickr.com/photos/spacexphotos/16511594820/",
        license="Public domain (SpaceX released its photos into the public domain in 2015)",
        kernel=lambda: linear_motion_kernel(length=19, angle=20),
        kernel_description="straight-line motion, `linear_motion_kernel(length=19, angle=20)` (21×21)",
        seed=14,
        noise_sigma=1.5,
        jpeg_quality=90,
    ),
    Example(
        name="camera_shake_grey",
        title="Photographer (greyscale), camera shake",
        skimage_name="camera",
        source="Lav Varshney",
        license="CC0 (no copyright restrictions)",
        kernel=lambda: motion_kernel(31, np.random.default_rng(99), intensity=0.25),
        kernel_description="random camera-shake trajectory, `motion_kernel(31, rng=default_rng(99), intensity=0.25)`",
        seed=15,
        noise_sigma=2.0,
        jpeg_quality=90,
    ),
]


def kernel_to_image(kernel: np.ndarray, scale: int = 1) -> np.ndarray:
    """Visualise a kernel as a uint8 greyscale array (peak = white).

    ``scale`` enlarges each kernel pixel to a ``scale x scale`` block.
    """
    k = np.asarray(kernel, dtype=np.float64)
    peak = k.max()
    img = np.zeros(k.shape, dtype=np.uint8) if peak <= 0 else np.rint(255.0 * k / peak).astype(np.uint8)
    if scale > 1:
        img = np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)
    return img


def srgb_to_linear(x: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in [0, 1] to linear light."""
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    """Linear light in [0, 1] to sRGB-encoded values."""
    x = np.clip(x, 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1.0 / 2.4) - 0.055)


def degrade(sharp: np.ndarray, kernel: np.ndarray, rng: np.random.Generator, noise_sigma: float) -> np.ndarray:
    """Blur a uint8 sRGB image in linear light, add noise and quantise to uint8."""
    linear = srgb_to_linear(sharp.astype(np.float64) / 255.0)
    blurred = linear_to_srgb(apply_kernel(linear, kernel, mode="reflect")) * 255.0
    noisy = blurred + rng.normal(0.0, noise_sigma, size=blurred.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def load_original(skimage_name: str) -> np.ndarray:
    from skimage import data

    return np.asarray(getattr(data, skimage_name)())


def make(out_dir: Path) -> List[Dict[str, object]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    kernel_dir = out_dir / "kernels"
    kernel_dir.mkdir(exist_ok=True)
    records: List[Dict[str, object]] = []
    for ex in EXAMPLES:
        sharp = load_original(ex.skimage_name)
        kernel = ex.kernel()
        assert abs(kernel.sum() - 1.0) < 1e-9 and kernel.min() >= 0
        blurry = degrade(sharp, kernel, np.random.default_rng(ex.seed), ex.noise_sigma)
        mode = "L" if blurry.ndim == 2 else "RGB"
        image_path = out_dir / f"{ex.name}.jpg"
        Image.fromarray(blurry, mode=mode).save(
            image_path, "JPEG", quality=ex.jpeg_quality, optimize=True, subsampling="4:2:0"
        )
        kernel_path = kernel_dir / f"{ex.name}_kernel.png"
        Image.fromarray(kernel_to_image(kernel, KERNEL_PREVIEW_SCALE), mode="L").save(kernel_path, optimize=True)
        h, w = blurry.shape[:2]
        records.append(
            {
                "file": image_path.name,
                "kernel_preview": f"kernels/{kernel_path.name}",
                "title": ex.title,
                "width": w,
                "height": h,
                "colour": "greyscale" if mode == "L" else "RGB",
                "original": f"skimage.data.{ex.skimage_name}()",
                "source": ex.source,
                "license": ex.license,
                "blur": ex.kernel_description,
                "kernel_size": list(kernel.shape),
                "noise_sigma_8bit": ex.noise_sigma,
                "noise_seed": ex.seed,
                "jpeg_quality": ex.jpeg_quality,
                "bytes": image_path.stat().st_size,
            }
        )
    return records


def write_readme(out_dir: Path, records: List[Dict[str, object]]) -> None:
    total = sum(int(r["bytes"]) for r in records)
    lines = [
        "# Example blurry images",
        "",
        "Generated by `scripts/make_examples.py` (do not edit by hand; rerun the script instead).",
        "",
        "The sharp originals are photographs shipped with scikit-image (`skimage.data`, checked",
        "with scikit-image 0.26), each under a public-domain or CC0 licence as stated in the",
        "docstring of its `skimage.data` function (source and licence in the table). They were",
        "blurred synthetically: converted from sRGB to linear light, convolved with the kernel",
        "listed below (from `deblurdiff.train.blur_kernels`), encoded back to sRGB, given mild Gaussian",
        "noise and saved as JPEG. All random choices are seeded. The sharp originals are not",
        "stored here; load them with the `skimage.data` function named in the table.",
        "",
        "| File | Size | Original | Source | Licence | Blur kernel | Noise σ (8-bit) / JPEG quality |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| [`{r['file']}`]({r['file']}) ([kernel]({r['kernel_preview']})) | {r['width']}×{r['height']} "
            f"{r['colour']}, {int(r['bytes']) / 1024:.0f} KiB | `{r['original']}` | {r['source']} | {r['license']} | "
            f"{r['blur']} | {r['noise_sigma_8bit']} (seed {r['noise_seed']}) / {r['jpeg_quality']} |"
        )
    lines += [
        "",
        f"Total size of the images: {total / 1024:.0f} KiB.",
        "",
        f"Kernel previews in `kernels/` are scaled ×{KERNEL_PREVIEW_SCALE} and normalised so that the",
        "brightest kernel pixel is white. `examples.json` holds the same information for programs",
        "(e.g. an example gallery in the app).",
        "",
    ]
    (out_dir / "README.md").write_text("\n".join(lines), encoding="utf-8")
    (out_dir / "examples.json").write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "examples", help="output folder")
    args = parser.parse_args(argv)
    records = make(args.out)
    write_readme(args.out, records)
    total = sum(int(r["bytes"]) for r in records)
    for r in records:
        print(f"{r['file']:28s} {r['width']}x{r['height']:<5} {int(r['bytes']) / 1024:6.1f} KiB  {r['blur']}")
    print(f"total {total / 1024:.1f} KiB")
    if total > SIZE_BUDGET_BYTES:
        print(f"warning: examples exceed the {SIZE_BUDGET_BYTES // 1000} kB budget", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
