"""Benchmark the EAC (element-wise adaptive convolution) implementations.

    python benchmarks/bench_eac.py            # B = 1..4, C = 4, k = 5 at 64², 128², 256²
    python benchmarks/bench_eac.py --quick    # a smaller table, in seconds
    python benchmarks/bench_eac.py --device cuda --dtype bfloat16

Times the forward pass and forward + backward (gradients of x and kernels) of every
path available on the device: ``reference`` (readable shifted sums), ``unfold``
(F.unfold baseline), ``shifted`` (out-of-place shifted sums), ``torch`` (the fast
PyTorch path that ``eac`` uses without Triton) and, on CUDA, ``triton``.

Effective bandwidth counts the bytes each pass must move at least once: forward
x + kernels + out; forward + backward adds grad_out, x and kernels read again and
grad_x, grad_kernels written. On CUDA the device copy bandwidth (a large tensor copy,
read + write) is measured too, and each row shows the percentage of it reached.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from deblurdiff.ops.eac import eac_torch  # noqa: E402
from deblurdiff.parsing import DTYPES, parse_dtype  # noqa: E402
from baselines import eac_reference, eac_shifted, eac_unfold  # noqa: E402


def _paths(device: torch.device) -> dict:
    paths = {"reference": eac_reference, "unfold": eac_unfold, "shifted": eac_shifted, "torch": eac_torch}
    if device.type == "cuda":
        try:
            from deblurdiff.ops.eac_triton import eac_triton
        except Exception as error:  # triton missing: say so, time the rest
            print(f"triton path unavailable: {error}")
        else:
            paths["triton"] = eac_triton
    return paths


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, mib: int = 512, reps: int = 10) -> float:
    """Bytes per second of a large device-to-device tensor copy (read + write)."""
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = _time(lambda: dst.copy_(src), device, reps)
    return 2 * src.numel() * src.element_size() / seconds


def run(args) -> None:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = _paths(device)
    if args.paths:
        paths = {name: fn for name, fn in paths.items() if name in args.paths.split(",")}
    if device.type == "cuda":
        info = torch.cuda.get_device_name(device)
    else:
        info = f"CPU, {torch.get_num_threads()} threads"
        if hasattr(os, "getloadavg"):  # timings with several threads suffer on a busy machine
            info += f" (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"
    print(f"EAC benchmark: {info}, torch {torch.__version__}, dtype {args.dtype}, C={args.channels}, k={args.k}, "
          f"median of {args.reps}")
    peak = None
    if device.type == "cuda":
        peak = copy_bandwidth(device)
        print(f"device copy bandwidth: {peak / 1e9:.1f} GB/s")
    size = torch.finfo(dtype).bits // 8
    header = f"{'B':>2} {'H×W':>8} {'pass':>8} {'path':>10} {'ms':>9} {'GB/s':>7} {'vs unfold':>9}"
    if peak:
        header += f" {'% copy':>7}"
    print(header)
    print("-" * len(header))
    gen = torch.Generator(device="cpu").manual_seed(0)
    for S in args.sizes:
        for B in args.batches:
            C, k = args.channels, args.k
            x = torch.randn(B, C, S, S, generator=gen).to(device, dtype)
            kernels = (torch.randn(B, C * k * k, S, S, generator=gen) / k).to(device, dtype)
            grad = torch.randn(B, C, S, S, generator=gen).to(device, dtype)
            elems = x.numel() * 2 + kernels.numel()  # x, kernels, out
            for mode in ("fwd", "fwd+bwd"):
                # backward: grad_out, x, kernels read; grad_x, grad_kernels written
                backward = 3 * x.numel() + 2 * kernels.numel()
                bytes_moved = (elems if mode == "fwd" else elems + backward) * size
                baseline = None
                for name, fn in paths.items():
                    if mode == "fwd":
                        def call(fn=fn):
                            with torch.no_grad():
                                fn(x, kernels, residual=True)
                    else:
                        xr, kr = x.detach().requires_grad_(), kernels.detach().requires_grad_()

                        def call(fn=fn, xr=xr, kr=kr):
                            torch.autograd.grad(fn(xr, kr, residual=True), (xr, kr), grad)
                    seconds = _time(call, device, args.reps)
                    if name == "unfold":
                        baseline = seconds
                    speedup = f"{baseline / seconds:8.2f}x" if baseline else f"{'':>9}"
                    row = (f"{B:>2} {f'{S}×{S}':>8} {mode:>8} {name:>10} {seconds * 1e3:9.3f} "
                           f"{bytes_moved / seconds / 1e9:7.2f} {speedup}")
                    if peak:
                        row += f" {100 * bytes_moved / seconds / peak:6.1f}%"
                    print(row, flush=True)
            del x, kernels, grad


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="B in (1, 4), 64² and 128², fewer repetitions")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    parser.add_argument("--dtype", default="fp32", help=f"one of {', '.join(DTYPES)} (default fp32)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="square sizes (default 64 128 256)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 1 2 3 4)")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("-k", type=int, default=5)
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per row")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    parser.add_argument("--paths", default="", help="comma-separated subset, e.g. unfold,torch,triton")
    args = parser.parse_args(argv)
    try:
        parse_dtype(args.dtype)
    except ValueError as error:
        parser.error(str(error))
    if args.sizes is None:
        args.sizes = [64, 128] if args.quick else [64, 128, 256]
    if args.batches is None:
        args.batches = [1, 4] if args.quick else [1, 2, 3, 4]
    if args.reps is None:
        args.reps = 5 if args.quick else 20
    run(args)


if __name__ == "__main__":
    main()
