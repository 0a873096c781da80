"""One-command GPU check of the EAC Triton kernels (needs CUDA, torch and triton; no network).

    python scripts/gpu_check_eac.py            # correctness, launch-config sweep, benchmark (~2-4 min)
    python scripts/gpu_check_eac.py --no-bench # correctness and sweep only
    python scripts/gpu_check_eac.py --no-sweep --bench-dtypes float16,bfloat16

1. Correctness: the Triton kernels (forward, grad_x, grad_kernels) and the PyTorch path
   against the float64 reference on the GPU, for float32/float16/bfloat16, k = 3/5/7,
   G = C and G < C, odd sizes, several tiles, non-contiguous inputs, residual on/off,
   and ``eac`` dispatching to Triton for CUDA tensors.
2. Launch configurations (BLOCK_H, BLOCK_W, num_warps) timed at B=4, C=4, k=5, 256².
3. The benchmark table of ``benchmarks/bench_eac.py`` (float32 and bfloat16 unless
   ``--bench-dtypes`` says otherwise), with the device copy bandwidth and the percentage
   of it each path reaches.

Ends with a summary; the exit status is 1 if any correctness check failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from deblurdiff.ops import eac  # noqa: E402
from deblurdiff.ops.eac import eac_torch  # noqa: E402
from baselines import eac_reference  # noqa: E402
from deblurdiff.parsing import parse_dtype  # noqa: E402

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}

CASES = [  # B, C, G, k, H, W, residual, layout
    (2, 4, 4, 5, 7, 13, True, "contiguous"),
    (1, 4, 4, 5, 1, 1, True, "contiguous"),
    (3, 4, 2, 3, 9, 70, False, "contiguous"),
    (2, 6, 3, 7, 33, 65, True, "strided"),
    (1, 3, 1, 5, 17, 130, False, "expanded"),
    (4, 4, 4, 5, 64, 64, True, "strided"),
    (2, 4, 4, 5, 131, 257, True, "contiguous"),
    (1, 8, 2, 3, 40, 50, False, "strided"),
]


def make_inputs(B, C, G, k, H, W, dtype, layout, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    K = G * k * k
    x = torch.randn(B, C, H, W, generator=gen).to(device, dtype)
    kernels = (torch.randn(B, K, H, W, generator=gen) / k).to(device, dtype)
    grad = torch.randn(B, C, H, W, generator=gen).to(device, dtype)
    if layout == "strided":  # channels-last x, a window of wider kernels, transposed grad
        x = x.contiguous(memory_format=torch.channels_last)
        wider = torch.zeros(B, K, H, W + 3, dtype=dtype, device=device)
        wider[..., 1 : W + 1] = kernels
        kernels = wider[..., 1 : W + 1]
        grad = grad.transpose(2, 3).contiguous().transpose(2, 3)
    elif layout == "expanded":  # a row window of x, grad with zero strides
        taller = torch.zeros(B, C, H + 2, W, dtype=dtype, device=device)
        taller[:, :, 1 : H + 1] = x
        x = taller[:, :, 1 : H + 1]
        grad = grad[:1, :, :1].expand(B, C, H, W)
    return x, kernels, grad


def errors(fn, case, dtype, device):
    B, C, G, k, H, W, residual, layout = case
    x, kernels, grad = make_inputs(B, C, G, k, H, W, dtype, layout, device)
    x.requires_grad_(True)
    kernels.requires_grad_(True)
    out = fn(x, kernels, residual=residual, groups=G)
    got = [out, *torch.autograd.grad(out, (x, kernels), grad)]
    xd = x.detach().double().requires_grad_(True)
    kd = kernels.detach().double().requires_grad_(True)
    ref = eac_reference(xd, kd, residual=residual, groups=G)
    want = [ref, *torch.autograd.grad(ref, (xd, kd), grad.double())]
    ok_types = all(a.dtype == dtype and a.shape == r.shape for a, r in zip(got, want))
    errs = [((a.double() - r).abs().max() / max(1.0, r.abs().max().item())).item() for a, r in zip(got, want)]
    return errs, ok_types


def check_correctness(device) -> list[str]:
    from deblurdiff.ops.eac_triton import eac_triton

    failures = []
    print(f"{'case':<42} {'dtype':>9} {'path':>7} {'out':>9} {'grad_x':>9} {'grad_k':>9}  ok")
    for case in CASES:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for name, fn in (("triton", eac_triton), ("torch", eac_torch)):
                if name == "torch" and case[4] * case[5] > 5000:
                    continue  # the PyTorch path is covered by the CPU tests; keep this quick
                errs, ok_types = errors(fn, case, dtype, device)
                ok = ok_types and max(errs) <= TOL[dtype]
                label = "B{}C{}G{}k{} {}x{} res={} {}".format(*case)
                print(f"{label:<42} {str(dtype)[6:]:>9} {name:>7} " + " ".join(f"{e:9.1e}" for e in errs)
                      + f"  {'ok' if ok else 'FAIL'}", flush=True)
                if not ok:
                    failures.append(f"{name} {label} {dtype}: {errs}")
    # ``eac`` on CUDA tensors picks Triton (unless the environment variable forces torch).
    from deblurdiff.ops.eac import _choose_backend

    x = torch.randn(1, 4, 8, 8, device=device)
    backend = _choose_backend(x, None)
    print(f"eac() on CUDA tensors uses: {backend}")
    if backend != "triton" and not os.environ.get("DEBLURDIFF_EAC_BACKEND"):
        failures.append(f"dispatch picked {backend}, not triton")
    errs, _ = errors(eac, CASES[0], torch.float32, device)
    if max(errs) > TOL[torch.float32]:
        failures.append(f"eac() dispatch: {errs}")
    return failures


def sweep_configs(device, size: int = 256, reps: int = 50) -> None:
    from bench_eac import _time

    from deblurdiff.ops.eac_triton import eac_triton, launch_config

    B, C, k, S = 4, 4, 5, size
    configs = [launch_config(S, S), (4, 64, 4), (16, 64, 4), (4, 128, 4), (8, 128, 8), (2, 256, 4), (16, 32, 4),
               (32, 64, 8)]
    print(f"launch configs at B={B} C={C} k={k} {S}x{S} (default first)")
    print(f"{'config (BH, BW, warps)':>24} {'dtype':>9} {'fwd us':>9} {'fwd+bwd us':>11}")
    for dtype in (torch.float32, torch.bfloat16):
        x, kernels, grad = make_inputs(B, C, C, k, S, S, dtype, "contiguous", device)
        xr, kr = x.clone().requires_grad_(True), kernels.clone().requires_grad_(True)
        for config in dict.fromkeys(configs):
            def fwd():
                with torch.no_grad():
                    eac_triton(x, kernels, residual=True, config=config)

            def both():
                torch.autograd.grad(eac_triton(xr, kr, residual=True, config=config), (xr, kr), grad)

            print(f"{str(config):>24} {str(dtype)[6:]:>9} {_time(fwd, device, reps) * 1e6:9.1f} "
                  f"{_time(both, device, reps) * 1e6:11.1f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description="GPU check of the EAC Triton kernels")
    parser.add_argument("--no-bench", action="store_true", help="skip the benchmark table")
    parser.add_argument("--no-sweep", action="store_true", help="skip the launch-config sweep")
    parser.add_argument("--bench-dtypes", default="float32,bfloat16", help="comma-separated benchmark dtypes")
    args = parser.parse_args()
    import bench_eac

    bench_dtypes = [d for d in args.bench_dtypes.split(",") if d]
    try:
        [parse_dtype(d) for d in bench_dtypes]
    except ValueError as error:
        parser.error(f"--bench-dtypes: {error}")
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    import triton

    device = torch.device("cuda")
    start = time.time()
    print(f"GPU: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, triton {triton.__version__}")
    print("\n== 1. correctness against the float64 reference ==")
    failures = check_correctness(device)
    print(f"[{time.time() - start:.0f}s]")
    if not args.no_sweep:
        print("\n== 2. launch configurations ==")
        sweep_configs(device)
        print(f"[{time.time() - start:.0f}s]")
    if not args.no_bench:
        for dtype in bench_dtypes:
            print(f"\n== 3. benchmark, {dtype} ==")
            bench_eac.main(["--device", "cuda", "--dtype", dtype])
            print(f"[{time.time() - start:.0f}s]")
    print("\n== summary ==")
    if failures:
        print(f"FAIL: {len(failures)} correctness checks")
        for line in failures:
            print("  " + line)
    else:
        print("PASS: Triton and PyTorch paths match the reference (forward, grad_x, grad_kernels; "
              "float32/float16/bfloat16)")
    print(f"total {time.time() - start:.0f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
