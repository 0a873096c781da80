"""PSNR / SSIM (and LPIPS when available) over a folder of sharp/blurry pairs.

::

    # metrics of the blurry inputs themselves (the baseline)
    python -m deblurdiff.train.evaluate --pairs DIR
    # restore every blurry image with a model, time it, score the results
    python -m deblurdiff.train.evaluate --pairs DIR --model runs/deblurdiff/pipeline --steps 50 --output restored/
    # score images restored elsewhere (same names as in DIR/sharp)
    python -m deblurdiff.train.evaluate --pairs DIR --restored restored/

``DIR`` holds ``sharp/`` and ``blurry/`` with matching names (``--sharp``/``--blurry`` name
the folders directly). Metrics are computed on 8-bit RGB (``--y-channel``: on BT.601 luma),
optionally ignoring ``--crop-border`` pixels on each side. PSNR and SSIM come from
scikit-image when it is installed, else from the equivalent implementations below (SSIM of
Wang et al.: 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03). LPIPS (AlexNet) is
computed only when the ``lpips`` package and its backbone weights are already on this
machine; otherwise it is reported as skipped (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image

from .data import load_rgb, match_pairs

# ----------------------------------------------------------------------------- metrics
_SSIM_SIGMA = 1.5
_SSIM_RADIUS = 5  # int(3.5 * sigma + 0.5): scikit-image's truncation of the Gaussian window


def _psnr_numpy(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * math.log10(data_range**2 / mse))


def _gaussian_filter(x: np.ndarray) -> np.ndarray:
    """Separable Gaussian blur of a 2-D array, borders mirrored (scipy's 'reflect')."""
    ax = np.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, dtype=np.float64)
    w = np.exp(-0.5 * (ax / _SSIM_SIGMA) ** 2)
    w /= w.sum()
    r = _SSIM_RADIUS
    padded = np.pad(x, r, mode="symmetric")
    rows = sum(w[i] * padded[i : i + x.shape[0], :] for i in range(2 * r + 1))
    return sum(w[i] * rows[:, i : i + x.shape[1]] for i in range(2 * r + 1))


def _ssim_channel(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = _gaussian_filter(a), _gaussian_filter(b)
    var_a = _gaussian_filter(a * a) - mu_a**2
    var_b = _gaussian_filter(b * b) - mu_b**2
    cov = _gaussian_filter(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    pad = (2 * _SSIM_RADIUS + 1 - 1) // 2
    return float(s[pad:-pad, pad:-pad].mean())


def _ssim_numpy(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    if a.ndim == 2:
        return _ssim_channel(a, b, data_range)
    return float(np.mean([_ssim_channel(a[..., i], b[..., i], data_range) for i in range(a.shape[2])]))


def metric_backend() -> str:
    try:
        import skimage.metrics  # noqa: F401

        return "scikit-image"
    except ImportError:
        return "builtin"


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    return _psnr_numpy(a, b, data_range)


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0, backend: str | None = None) -> float:
    """SSIM of two HxW or HxWxC images (Gaussian-window variant, channels averaged)."""
    backend = backend or metric_backend()
    if backend == "scikit-image":
        from skimage.metrics import structural_similarity

        return float(
            structural_similarity(
                a.astype(np.float64),
                b.astype(np.float64),
                data_range=data_range,
                channel_axis=2 if a.ndim == 3 else None,
                gaussian_weights=True,
                sigma=_SSIM_SIGMA,
                use_sample_covariance=False,
            )
        )
    return _ssim_numpy(a, b, data_range)


def to_y(image: np.ndarray) -> np.ndarray:
    """uint8 RGB -> BT.601 luma on the 0-255 scale (16-235), float64."""
    x = image.astype(np.float64) / 255.0
    return 16.0 + 65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]


def prepare(image: np.ndarray, crop_border: int = 0, y_channel: bool = False) -> np.ndarray:
    if crop_border:
        image = image[crop_border:-crop_border, crop_border:-crop_border]
    return to_y(image) if y_channel else image.astype(np.float64)


class LPIPSMetric:
    """LPIPS (AlexNet) if it can run without downloading anything; ``reason`` says why not."""

    def __init__(self, device: str = "cpu", enabled: bool = True):
        self.model, self.reason = None, None
        if not enabled:
            self.reason = "skipped (--no-lpips)"
            return
        try:
            import lpips
            import torch
        except ImportError:
            self.reason = "skipped: the `lpips` package is not installed"
            return
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        if not any(hub.glob("alexnet-owt-*.pth")):
            self.reason = f"skipped: the AlexNet weights LPIPS needs are not in {hub} (nothing is downloaded)"
            return
        try:
            self.model = lpips.LPIPS(net="alex", verbose=False).to(device).eval()
        except Exception as exc:  # a broken install should not stop the other metrics
            self.reason = f"skipped: LPIPS could not be loaded ({exc})"
            return
        self.device = device

    def __call__(self, a: np.ndarray, b: np.ndarray) -> float | None:
        if self.model is None:
            return None
        import torch

        def tensor(x):
            return torch.from_numpy(x.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None].to(self.device)

        with torch.no_grad():
            return float(self.model(tensor(a), tensor(b)).item())


# ----------------------------------------------------------------------------- evaluation
def score(
    candidate: np.ndarray, sharp: np.ndarray, crop_border: int = 0, y_channel: bool = False, lpips_metric=None
) -> dict:
    if candidate.shape != sharp.shape:
        raise ValueError(f"size mismatch: {candidate.shape} vs sharp {sharp.shape}")
    a, b = prepare(candidate, crop_border, y_channel), prepare(sharp, crop_border, y_channel)
    out = {"psnr": psnr(a, b), "ssim": ssim(a, b)}
    if lpips_metric is not None and lpips_metric.model is not None:
        out["lpips"] = lpips_metric(candidate, sharp)
    return out


def _find_restored(restored_dir: Path, name: Path) -> Path:
    for candidate in [restored_dir / name] + [restored_dir / name.with_suffix(s) for s in (".png", ".jpg", ".jpeg")]:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no restored image for {name} in {restored_dir}")


def evaluate(
    sharp_dir: str | Path,
    blurry_dir: str | Path,
    *,
    restored_dir: str | Path | None = None,
    pipe=None,
    num_inference_steps: int = 50,
    seed: int = 0,
    output_dir: str | Path | None = None,
    crop_border: int = 0,
    y_channel: bool = False,
    limit: int | None = None,
    use_lpips: bool = True,
    pipe_kwargs: dict | None = None,
) -> dict:
    """Per-image and mean metrics of the blurry inputs and (with ``restored_dir`` or ``pipe``)
    of the restored images against the sharp ones; with ``pipe``, seconds per image too."""
    sharp_dir, blurry_dir = Path(sharp_dir), Path(blurry_dir)
    pairs = match_pairs(sharp_dir, blurry_dir)[:limit]
    lpips_metric = LPIPSMetric(device=str(getattr(pipe, "device", "cpu")), enabled=use_lpips)
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (sharp_path, blurry_path) in enumerate(pairs):
        name = sharp_path.relative_to(sharp_dir)
        sharp, blurry = load_rgb(sharp_path), load_rgb(blurry_path)
        row = {"name": str(name)}
        row.update({f"blurry_{k}": v for k, v in score(blurry, sharp, crop_border, y_channel, lpips_metric).items()})
        restored = None
        if pipe is not None:
            import torch

            device = getattr(pipe, "device", torch.device("cpu"))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            tic = time.perf_counter()
            result = pipe(
                PIL.Image.fromarray(blurry),
                num_inference_steps=num_inference_steps,
                generator=torch.Generator(device="cpu").manual_seed(seed + i),
                **(pipe_kwargs or {}),
            ).images[0]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            row["seconds"] = time.perf_counter() - tic
            restored = np.asarray(result.convert("RGB"))
            if output_dir is not None:
                target = Path(output_dir) / name.with_suffix(".png")
                target.parent.mkdir(parents=True, exist_ok=True)
                result.save(target)
        elif restored_dir is not None:
            restored = load_rgb(_find_restored(Path(restored_dir), name))
        if restored is not None:
            row.update(score(restored, sharp, crop_border, y_channel, lpips_metric))
        rows.append(row)

    keys = [k for k in rows[0] if k != "name"] if rows else []
    means = {k: float(np.mean([r[k] for r in rows if r.get(k) is not None])) for k in keys}
    if pipe is not None and len(rows) > 1:
        means["seconds_after_first"] = float(np.mean([r["seconds"] for r in rows[1:]]))
    return {
        "count": len(rows),
        "metric_backend": metric_backend(),
        "lpips": "computed" if lpips_metric.model is not None else lpips_metric.reason,
        "y_channel": y_channel,
        "crop_border": crop_border,
        "mean": means,
        "images": rows,
    }


def format_summary(result: dict) -> str:
    m = result["mean"]
    lines = [f"{result['count']} image pairs (metrics: {result['metric_backend']}; LPIPS: {result['lpips']})"]
    space = "Y channel" if result["y_channel"] else "RGB"
    lines.append(f"  blurry input : PSNR {m['blurry_psnr']:.3f} dB  SSIM {m['blurry_ssim']:.4f}" + (
        f"  LPIPS {m['blurry_lpips']:.4f}" if "blurry_lpips" in m else "") + f"  ({space})")
    if "psnr" in m:
        lines.append(f"  restored     : PSNR {m['psnr']:.3f} dB  SSIM {m['ssim']:.4f}" + (
            f"  LPIPS {m['lpips']:.4f}" if "lpips" in m else ""))
    if "seconds" in m:
        extra = f" ({m['seconds_after_first']:.3f} s after the first)" if "seconds_after_first" in m else ""
        lines.append(f"  time         : {m['seconds']:.3f} s per image{extra}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deblurdiff.train.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", help="folder holding sharp/ and blurry/ with matching file names")
    parser.add_argument("--sharp", help="folder of sharp (ground-truth) images")
    parser.add_argument("--blurry", help="folder of blurry images")
    parser.add_argument("--restored", help="folder of already restored images (names as in the sharp folder)")
    parser.add_argument("--model", help="restore with this model: pipeline folder, Hub id, model.pth or random-tiny")
    parser.add_argument("--tokenizer", help="tokenizer for a single-file checkpoint")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="fp32, fp16, bf16 or auto")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (default 50, the reference's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="save the restored images here (with --model)")
    parser.add_argument("--limit", type=int, help="only the first N pairs")
    parser.add_argument("--crop-border", type=int, default=0)
    parser.add_argument("--y-channel", action="store_true", help="metrics on BT.601 luma instead of RGB")
    parser.add_argument("--no-lpips", action="store_true")
    parser.add_argument("--json", help="write the full results (per image) to this JSON file")
    parser.add_argument("--csv", help="write the per-image results to this CSV file")
    args = parser.parse_args(argv)

    if args.pairs:
        sharp_dir = Path(args.sharp or Path(args.pairs) / "sharp")
        blurry_dir = Path(args.blurry or Path(args.pairs) / "blurry")
    elif args.sharp and args.blurry:
        sharp_dir, blurry_dir = Path(args.sharp), Path(args.blurry)
    else:
        parser.error("give --pairs DIR, or --sharp and --blurry")
    if args.model and args.restored:
        parser.error("--model and --restored are exclusive")

    pipe = None
    if args.model:
        from ..pipeline.loading import ModelUnavailableError, load_pipeline

        try:
            pipe = load_pipeline(args.model, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype)
        except ModelUnavailableError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if getattr(pipe, "untrained", False):
            print("warning: untrained weights: the restored images are not deblurred", file=sys.stderr)
    try:
        result = evaluate(
            sharp_dir,
            blurry_dir,
            restored_dir=args.restored,
            pipe=pipe,
            num_inference_steps=args.steps,
            seed=args.seed,
            output_dir=args.output,
            crop_border=args.crop_border,
            y_channel=args.y_channel,
            limit=args.limit,
            use_lpips=not args.no_lpips,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.csv and result["images"]:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(result["images"][0]))
            writer.writeheader()
            writer.writerows(result["images"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
