"""How close the CPU time estimate shown before a run comes to the measured time.

Builds the full-size pipeline with random weights (real timings, meaningless images),
applies the configuration the app would choose on this CPU (``deblurdiff.cpu.tuning``), lets
it measure itself at the warm-up size as the app does at start, then runs whole images
(VAE encode, ``--steps`` denoising steps, decode) at a few sizes and prints, for each,
the estimate from the built-in constants, the estimate from the start-up measurement,
and the measured time.

    python benchmarks/bench_cpu_estimate.py [--steps 4] [--sizes 512x512 768x512]

Only the relative error matters here; other processes on the machine inflate both
the start-up measurement and the runs (the load average is printed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deblurdiff.cpu.tuning import choose_cpu_config, describe_cpu, prepare_cpu_pipeline  # noqa: E402
from deblurdiff.pipeline.estimates import SpeedModel  # noqa: E402
from deblurdiff.models.configs import build_components  # noqa: E402
from deblurdiff.pipeline.pipeline_deblurdiff import DeblurDiffPipeline  # noqa: E402


def size(text: str) -> tuple[int, int]:
    w, _, h = text.partition("x")
    return int(w), int(h)


@torch.no_grad()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--sizes", type=size, nargs="*", default=[(512, 512), (768, 512)])
    args = parser.parse_args(argv)
    diffusers_logging.set_verbosity_error()

    config = choose_cpu_config()
    print(f"# {describe_cpu()}")
    print(f"# configuration: {config.describe()}")
    print(f"# load average at start {os.getloadavg()[0]:.2f}; full-size networks, RANDOM weights", flush=True)
    pipe = DeblurDiffPipeline(**build_components("full", seed=0))
    pipe.set_progress_bar_config(disable=True)
    t = time.perf_counter()
    timing = prepare_cpu_pipeline(pipe, config, progress=lambda m: print(f"# {m}", flush=True))
    print(f"# start-up (warm-up and measurement) {time.perf_counter() - t:.0f} s: {timing}", flush=True)

    rows = []
    for w, h in args.sizes:
        image = torch.rand(1, 3, h, w)
        default = SpeedModel.default("cpu", cpu_config=config).seconds(w, h, args.steps)
        measured_estimate = SpeedModel.measured_cpu(config, timing).seconds(w, h, args.steps)
        t = time.perf_counter()
        pipe(image, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0), output_type="pt")
        actual = time.perf_counter() - t
        rows.append((w, h, default, measured_estimate, actual))
        print(f"  {w}×{h}: estimate {default:.1f} s (built-in) / {measured_estimate:.1f} s (start-up measurement), "
              f"measured {actual:.1f} s, load {os.getloadavg()[0]:.2f}", flush=True)

    print()
    print(f"{args.steps} steps, guidance 1, untiled:")
    print()
    print("| size | estimate, built-in (s) | error | estimate, start-up measurement (s) | error | measured (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for w, h, default, est, actual in rows:
        print(f"| {w}×{h} | {default:.1f} | {100 * (default / actual - 1):+.0f}% | {est:.1f} | "
              f"{100 * (est / actual - 1):+.0f}% | {actual:.1f} |")
    print(f"\n(load average at the end {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
