"""GPU check of the ahead-of-time path (deblurdiff.space.aoti) without ZeroGPU (needs CUDA and
triton; no network, random weights: the outputs are not deblurring results).

    python scripts/gpu_check_aoti.py                 # tiny networks, float32 (~2-5 min)
    python scripts/gpu_check_aoti.py --size full --dtype bf16 --batches 1

Exports the LKPN, ControlNet and UNet with dynamic latent sizes (as ``aoti.export_networks``
does), compiles each with Inductor ahead of time (``torch._inductor.aoti_compile_and_package``,
what ``spaces.aoti_compile`` wraps on ZeroGPU), checks that the Triton EAC operator is a node
of the LKPN program, compares the compiled networks with eager ones at several sizes, and
times both at a 512² image's latent. One row per program as soon as it is compiled (so a
time limit still leaves the finished ones); exit status 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from deblurdiff.space import aoti  # noqa: E402
from deblurdiff.models.configs import build_components  # noqa: E402
from deblurdiff.parsing import DTYPES  # noqa: E402
from deblurdiff.pipeline.pipeline_deblurdiff import DeblurDiffPipeline  # noqa: E402

TOL = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 1e-2}  # relative to the largest output value
SIZES = [(8, 8), (24, 16), (72, 40), (136, 200)]  # latent sides checked against eager
SPEED_LATENT = (64, 64)  # a 512² image


def median_ms(fn, reps: int) -> float:
    with torch.no_grad():
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def relative_error(got, want) -> float:
    got, want = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)
    return max(((g.float() - x.float()).abs().max() / x.float().abs().max().clamp_min(1e-12)).item()
               for g, x in zip(got, want))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", choices=("tiny", "full"))
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--batches", default=",".join(map(str, aoti.BATCH_SIZES)), help="e.g. 1,2")
    parser.add_argument("--networks", default=",".join(aoti.NETWORKS), help="subset of " + ",".join(aoti.NETWORKS))
    parser.add_argument("--reps", type=int, default=10, help="timed calls per network")
    args = parser.parse_args()
    networks = [n for n in args.networks.split(",") if n]
    if unknown := set(networks) - set(aoti.NETWORKS):
        parser.error(f"unknown networks {sorted(unknown)}; choose from {','.join(aoti.NETWORKS)}")
    try:
        batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        parser.error(f"--batches takes comma-separated integers, got {args.batches!r}")
    if not torch.cuda.is_available():
        print("needs CUDA: no CUDA device is visible")
        return 2
    dtype = DTYPES[args.dtype]
    start = time.perf_counter()
    pipe = DeblurDiffPipeline(**build_components(args.size)).to("cuda", dtype)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {args.size} networks, {args.dtype}; "
          f"built in {time.perf_counter() - start:.0f} s", flush=True)
    modules = aoti._modules(pipe)
    failures = []
    print(f"{'network':>10} {'batch':>5} {'export s':>8} {'compile s':>9} {'max rel. err':>12} "
          f"{'eager ms':>8} {'AoTI ms':>8} {'speed-up':>8}  (ms at latent {SPEED_LATENT[0]}x{SPEED_LATENT[1]})",
          flush=True)
    for batch in batches:
        inputs = aoti.example_inputs(pipe, batch)
        for name in networks:
            t0 = time.perf_counter()
            program = aoti.export_network(modules[name], inputs[name])
            export_s = time.perf_counter() - t0
            if name == "lkpn":
                ops = {str(n.target) for n in program.graph.nodes}
                if "deblurdiff.eac_triton_forward.default" not in ops:
                    failures.append(f"no Triton EAC node in the LKPN program (batch {batch})")
            t0 = time.perf_counter()
            compiled = torch._inductor.aoti_load_package(torch._inductor.aoti_compile_and_package(program))
            compile_s = time.perf_counter() - t0
            error = 0.0
            for h, w in SIZES:
                sample = aoti.example_inputs(pipe, batch, h, w)[name]
                with torch.no_grad():
                    error = max(error, relative_error(compiled(*sample), modules[name](*sample)))
            if error > TOL[args.dtype]:
                failures.append(f"{name} batch {batch}: max rel. error {error:.2e} > {TOL[args.dtype]:.0e}")
            sample = aoti.example_inputs(pipe, batch, *SPEED_LATENT)[name]
            eager_ms = median_ms(lambda: modules[name](*sample), args.reps)
            aoti_ms = median_ms(lambda: compiled(*sample), args.reps)
            print(f"{name:>10} {batch:>5} {export_s:8.1f} {compile_s:9.1f} {error:12.2e} {eager_ms:8.2f} "
                  f"{aoti_ms:8.2f} {eager_ms / aoti_ms:7.2f}x  {'ok' if error <= TOL[args.dtype] else 'FAIL'}",
                  flush=True)
            del compiled
            torch.cuda.empty_cache()
    print(f"total {time.perf_counter() - start:.0f} s")
    print("all compiled networks match eager" if not failures else "FAILED:\n  " + "\n  ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
