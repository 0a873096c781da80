"""GPU check of the ahead-of-time path (deblurdiff.aoti) without ZeroGPU (needs CUDA and
triton; no network, random weights: the outputs are not deblurring results).

    python scripts/gpu_check_aoti.py                 # tiny networks, float32 (~2-5 min)
    python scripts/gpu_check_aoti.py --size full --dtype bf16

Exports the LKPN, ControlNet and UNet with dynamic latent sizes, compiles each with
Inductor ahead of time (``torch._inductor.aoti_compile_and_package``, what
``spaces.aoti_compile`` wraps on ZeroGPU), checks that the Triton EAC operator is a node
of the LKPN program, and compares the compiled networks with eager ones at several
sizes and batch sizes. Prints export and compile times; exit status 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from deblurdiff import aoti  # noqa: E402
from deblurdiff.models.configs import build_components  # noqa: E402
from deblurdiff.pipeline import DeblurDiffPipeline  # noqa: E402

TOL = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 1e-2}  # relative to the largest output value
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SIZES = [(8, 8), (24, 16), (72, 40), (136, 200)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", choices=("tiny", "full"))
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 1
    dtype = DTYPES[args.dtype]
    pipe = DeblurDiffPipeline(**build_components(args.size)).to("cuda", dtype)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {args.size} networks, {args.dtype}")

    start = time.perf_counter()
    programs = aoti.export_networks(pipe)
    print(f"export: {time.perf_counter() - start:.1f} s for {len(programs)} programs")
    lkpn_ops = [str(n.target) for n in programs["lkpn", 1].graph.nodes]
    has_triton_eac = "deblurdiff.eac_triton_forward.default" in lkpn_ops
    print(f"Triton EAC operator in the LKPN program: {has_triton_eac}")

    compiled = {}
    for key, program in programs.items():
        start = time.perf_counter()
        path = torch._inductor.aoti_compile_and_package(program)
        compiled[key] = torch._inductor.aoti_load_package(path)
        print(f"compile {key}: {time.perf_counter() - start:.1f} s")

    modules = aoti._modules(pipe)
    failures = [] if has_triton_eac else ["no Triton EAC node in the LKPN program"]
    print(f"{'network':>10} {'batch':>5} {'latent':>9} {'rel. error':>10}")
    for (name, batch), program in sorted(compiled.items()):
        for h, w in SIZES:
            inputs = aoti.example_inputs(pipe, batch, h, w)[name]
            with torch.no_grad():
                want = torch.utils._pytree.tree_leaves(modules[name](*inputs))
                got = torch.utils._pytree.tree_leaves(program(*inputs))
            error = max(((g.float() - x.float()).abs().max() / x.float().abs().max().clamp_min(1e-12)).item()
                        for g, x in zip(got, want))
            ok = error <= TOL[args.dtype]
            print(f"{name:>10} {batch:>5} {f'{h}x{w}':>9} {error:10.2e} {'ok' if ok else 'FAIL'}", flush=True)
            if not ok:
                failures.append(f"{name} batch {batch} {h}x{w}: {error:.2e}")
    print("all compiled networks match eager" if not failures else "FAILED:\n  " + "\n  ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
