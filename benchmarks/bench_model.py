"""Size of every full-size component and the time of one denoising step on the CPU.

Builds the full-size architectures with random weights (``build_components("full")``:
the timings are real, the outputs meaningless), prints parameter counts per component,
then times one denoising step: LKPN (kernels + EAC) -> ControlNet -> UNet, batch 1, a
512×512 image (64×64 latent), no guidance, float32 (and bfloat16 with ``--bf16``).

    python benchmarks/bench_model.py [--bf16] [--repeats 3] [--latent 64] [--threads N]

It needs about 7 GB of memory for the float32 weights (the bfloat16 run converts the
three networks in place): run one such job at a time.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
from diffusers.utils import logging as diffusers_logging

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from deblurdiff.models.configs import build_components  # noqa: E402

NETWORKS = ("vae", "text_encoder", "unet", "controlnet", "lkpn")


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.inference_mode()
def time_step(components: dict, dtype: torch.dtype, latent: int, repeats: int) -> dict[str, float]:
    """Median seconds of each network and of the whole step (after one warm-up run)."""
    lkpn, controlnet, unet = components["lkpn"], components["controlnet"], components["unet"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, latent, latent, generator=g).to(dtype)
    c = torch.randn(1, 4, latent, latent, generator=g).to(dtype)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g).to(dtype)
    t = torch.tensor([500])
    times = {"lkpn": [], "controlnet": [], "unet": [], "step": []}
    for run in range(repeats + 1):
        t0 = time.perf_counter()
        z_s = lkpn(c, x, t, text)
        t1 = time.perf_counter()
        down, mid = controlnet(x, t, text, hint=torch.cat([c, z_s], dim=1))
        t2 = time.perf_counter()
        eps = unet(x, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                   mid_block_additional_residual=mid).sample
        t3 = time.perf_counter()
        assert torch.isfinite(eps.float()).all()
        if run:  # the first run is a warm-up
            for key, value in (("lkpn", t1 - t0), ("controlnet", t2 - t1), ("unet", t3 - t2), ("step", t3 - t0)):
                times[key].append(value)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bf16", action="store_true", help="also time bfloat16 weights and activations")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (median reported)")
    parser.add_argument("--latent", type=int, default=64, help="latent size (image size / 8)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    parser.add_argument("--size", default="full", choices=["full", "tiny"], help="tiny: a quick check of the script")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    diffusers_logging.set_verbosity_error()  # the in-place bfloat16 cast is intended

    t0 = time.perf_counter()
    components = build_components(args.size, seed=0)
    built = time.perf_counter() - t0
    for name in NETWORKS:
        components[name].eval()

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}; built in {built:.0f} s")
    print()
    print("| component | parameters |")
    print("|---|---:|")
    for name in NETWORKS:
        print(f"| {name} | {count(components[name]) / 1e6:,.1f} M |")
    print(f"| **total** | {sum(count(components[n]) for n in NETWORKS) / 1e6:,.1f} M |")
    print()

    rows = [("fp32", time_step(components, torch.float32, args.latent, args.repeats))]
    if args.bf16:
        for name in ("lkpn", "controlnet", "unet"):
            components[name].to(torch.bfloat16)  # in place: no second copy of the weights
        rows.append(("bf16", time_step(components, torch.bfloat16, args.latent, args.repeats)))

    size = args.latent * 8
    print(f"One denoising step, batch 1, {size}×{size} image ({args.latent}×{args.latent} latent), "
          f"CPU, median of {args.repeats} (s):")
    print()
    print("| dtype | LKPN | ControlNet | UNet | step | 50 steps (est.) |")
    print("|---|---:|---:|---:|---:|---:|")
    for dtype, r in rows:
        print(f"| {dtype} | {r['lkpn']:.2f} | {r['controlnet']:.2f} | {r['unet']:.2f} | {r['step']:.2f} | "
              f"{50 * r['step'] / 60:.1f} min |")
    print(f"\n(load average at the end {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
