"""Peak memory of one untiled DeblurDiffPipeline call, full-size models, a few sizes.

Fits ``peak - weights = constant + bytes_per_latent_pixel * latent pixels`` (weights
resident before the call are not counted): the memory model in ``deblurdiff.pipeline.estimates``
(scaled by bytes per element for other dtypes). Random weights: memory is the real one,
the images are not deblurring results.

    python benchmarks/bench_peak_memory.py                      # CPU, float32
    python benchmarks/bench_peak_memory.py --device cuda --dtype fp16

On the CPU the peak is the process's resident set size (sampled every 10 ms); on CUDA it
is ``torch.cuda.max_memory_allocated``. One sampling step is run per size: the working
set of a step does not grow with the number of steps.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_inference import PeakRSS  # noqa: E402

from deblurdiff.models.configs import build_components  # noqa: E402
from deblurdiff.parsing import DTYPES  # noqa: E402
from deblurdiff.pipeline.pipeline_deblurdiff import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT, DeblurDiffPipeline  # noqa: E402



def fit(points: list[tuple[int, int]]) -> tuple[float, float]:
    """Least-squares ``bytes = constant + slope * latent_pixels``."""
    x = np.array([p for p, _ in points], dtype=np.float64)
    y = np.array([b for _, b in points], dtype=np.float64)
    slope, constant = np.polyfit(x, y, 1)
    return float(constant), float(slope)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--sizes", default="256,512,768,1024", help="square image sides")
    parser.add_argument("--guided-sizes", default="512,1024", help="sides also run with guidance 3")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    print(f"# torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = DeblurDiffPipeline(**build_components("full", seed=0))
        embeds = {p: pipe.encode_prompt(p) for p in (DEFAULT_PROMPT, DEFAULT_NEGATIVE_PROMPT)}
        pipe.register_modules(text_encoder=None)  # as deployed: stored prompt embeddings
        pipe.set_prompt_embeds(embeds)
        pipe.to(device=device, dtype=DTYPES[args.dtype])
    pipe.set_progress_bar_config(disable=True)
    if not cuda:
        torch.set_flush_denormal(True)

    runs = [(int(s), 1.0) for s in args.sizes.split(",") if s] + [
        (int(s), 3.0) for s in args.guided_sizes.split(",") if s
    ]
    base = torch.cuda.memory_allocated(device) if cuda else PeakRSS.current()
    print(f"# weights resident: {base / 2**30:.2f} GiB", flush=True)
    points: dict[bool, list[tuple[int, int]]] = {False: [], True: []}
    for side, guidance in runs:
        image = torch.rand(1, 3, side // 16, side // 16, generator=torch.Generator().manual_seed(side))
        image = torch.nn.functional.interpolate(image, size=(side, side), mode="bicubic").clamp(0, 1)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        with PeakRSS() as rss:
            pipe(image, num_inference_steps=1, guidance_scale=guidance, tiled=False, output_type="pt",
                 generator=torch.Generator().manual_seed(0))
        peak = torch.cuda.max_memory_allocated(device) if cuda else rss.peak
        latent_pixels = (side // 8) ** 2
        points[guidance != 1.0].append((latent_pixels, peak - base))
        print(f"{side}x{side} guidance {guidance:g}: peak above weights {(peak - base) / 2**30:.3f} GiB "
              f"({latent_pixels} latent pixels)", flush=True)
    for guided, pts in points.items():
        if len(pts) >= 2:
            constant, slope = fit(pts)
            print(f"fit ({'guided' if guided else 'unguided'}): constant {constant / 2**20:.0f} MiB, "
                  f"{slope / 2**10:.1f} KiB per latent pixel", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
