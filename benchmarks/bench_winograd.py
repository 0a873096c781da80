"""3×3 convolutions on the CPU: oneDNN's direct convolution against Winograd F(2, 3) and
F(4, 3) and one unfolded matrix product (deblurdiff/cpu/winograd.py), float32, at the
shapes a 512² model call runs (UNet, ControlNet, LKPN; the downsampling stride-2 ones in
a second table), with each method's largest error against float64 relative to the
output's largest value.

    python benchmarks/bench_winograd.py [--repeats 7] [--vae]

``--vae`` also times the full-size VAE (random weights) encoding and decoding a 512²
image, with oneDNN's convolutions and with :func:`enable_winograd`.

To see an AVX2-only CPU on a newer one, cap the instruction sets:

    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/bench_winograd.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deblurdiff.cpu.tuning import describe_cpu  # noqa: E402
from deblurdiff.cpu.winograd import (  # noqa: E402
    enable_winograd,
    im2col_conv2d,
    winograd_bytes,
    winograd_conv2d,
    winograd_filters,
)

# (input channels, output channels, side): the most frequent 3×3 shapes of a 512² call.
SHAPES = [(320, 320, 64), (640, 320, 64), (128, 128, 64), (640, 640, 32), (1920, 640, 32),
          (1280, 1280, 16), (2560, 1280, 16), (1280, 1280, 8), (2560, 1280, 8)]
# The downsampling (stride-2) convolutions: channels, input side.
STRIDE_TWO_SHAPES = [(320, 64), (640, 32), (1280, 16), (512, 16), (256, 32), (128, 64)]


def timed_methods(methods: dict, exact: torch.Tensor, repeats: int) -> tuple[dict, dict]:
    """Each method's median ms and largest error against ``exact`` (relative to its largest value)."""
    ms = {name: median_ms(fn, repeats) for name, fn in methods.items()}
    err = {name: ((fn().double() - exact).abs().max() / exact.abs().max()).item() for name, fn in methods.items()}
    return ms, err


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


@torch.inference_mode()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--vae", action="store_true", help="also time the VAE at 512²")
    args = parser.parse_args(argv)
    print(f"# {describe_cpu()}")
    caps = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
            if k in os.environ}
    print(f"# ISA caps in the environment: {caps or 'none'}")
    print()
    print("| C → K, side | direct ms | F(2,3) ms | F(4,3) ms | unfolded ms | error direct | F(2,3) | F(4,3) | unfolded |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c, k, side in SHAPES:
        g = torch.Generator().manual_seed(side + c)
        x = torch.randn(1, c, side, side, generator=g)
        weight = torch.randn(k, c, 3, 3, generator=g) / (3 * c**0.5)
        bias = torch.randn(k, generator=g)
        exact = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
        filters = {m: winograd_filters(weight, m) for m in (2, 4)}
        methods = {
            "direct": lambda: F.conv2d(x, weight, bias, padding=1),
            "F2": lambda: winograd_conv2d(x, filters[2], bias, 2),
            "F4": lambda: winograd_conv2d(x, filters[4], bias, 4),
            "unfolded": lambda: im2col_conv2d(x, weight, bias),
        }
        ms, err = timed_methods(methods, exact, args.repeats)
        base = ms["direct"]
        cells = [f"{ms['direct']:.1f}"] + [f"{ms[n]:.1f} ({base / ms[n]:.2f}×)" for n in ("F2", "F4", "unfolded")]
        print(f"| {c} → {k}, {side}² | " + " | ".join(cells) + " | "
              + " | ".join(f"{err[n]:.1e}" for n in methods) + " |", flush=True)
    print()
    print("| stride 2: C → C, side | direct ms | unfolded ms | error direct | unfolded |")
    print("|---|---:|---:|---:|---:|")
    for c, side in STRIDE_TWO_SHAPES:
        g = torch.Generator().manual_seed(side + c)
        x = torch.randn(1, c, side, side, generator=g)
        weight = torch.randn(c, c, 3, 3, generator=g) / (3 * c**0.5)
        bias = torch.randn(c, generator=g)
        exact = F.conv2d(x.double(), weight.double(), bias.double(), stride=2, padding=1)
        methods = {"direct": lambda: F.conv2d(x, weight, bias, stride=2, padding=1),
                   "unfolded": lambda: im2col_conv2d(x, weight, bias, stride=2)}
        ms, err = timed_methods(methods, exact, args.repeats)
        print(f"| {c} → {c}, {side}² | {ms['direct']:.1f} | {ms['unfolded']:.1f} ({ms['direct'] / ms['unfolded']:.2f}×) | "
              f"{err['direct']:.1e} | {err['unfolded']:.1e} |", flush=True)
    if args.vae:
        time_vae(max(1, args.repeats // 3))


def time_vae(repeats: int) -> None:
    from deblurdiff.models.configs import build_components

    torch.set_flush_denormal(True)
    vae = build_components("full", seed=0)["vae"].eval()
    image = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def encode_decode():
        return vae.decode(vae.encode(image).latent_dist.mode()).sample

    direct = median_ms(encode_decode, repeats)
    reference = encode_decode()
    enable_winograd(vae)
    t = time.perf_counter()
    encode_decode()  # transforms the filters
    first = time.perf_counter() - t
    fast = median_ms(encode_decode, repeats)
    err = ((encode_decode() - reference).abs().max() / reference.abs().max()).item()
    print(f"\nVAE encode + decode, 512², float32: direct {direct / 1e3:.1f} s, Winograd {fast / 1e3:.1f} s "
          f"({direct / fast:.2f}×; first call {first:.1f} s, filters {winograd_bytes(vae) / 2**30:.2f} GB), "
          f"difference {err:.1e} of the largest value")


if __name__ == "__main__":
    main()
