"""One model call (LKPN + EAC -> ControlNet -> UNet) on the CPU: the CPU configurations
against the reference's, side by side in one process.

Full-size architectures with random weights (the timings are real, the outputs
meaningless), batch 1, a 512×512 image (64×64 latent), no guidance. Each configuration
is timed as the median of ``--repeats`` calls after a warm-up call.

With ``--reference DIR`` (a checkout of the authors' repository, kkkls/DeblurDiff,
which needs ``einops``, ``omegaconf`` and ``ftfy``) the reference's ``ControlLDM`` is
built at full size with random weights (its CUDA EAC kernel replaced by
``eac_reference`` (benchmarks/baselines.py), its VAE and text tower at a small size since a model
call does not use them), timed in its own configuration (float32, eager), and our
networks are converted from the same weights, so that the outputs can be compared too.
The reference runs in a child process of its own, as a user would run it
(``--reference-process same`` runs it in this process instead), and each of our calls is timed right after one of its calls. Without it, our networks are
built with ``build_components("full")`` and ratios are taken against our float32 eager
call.

    python benchmarks/bench_model.py --reference REF_DIR [--repeats 2] [--configs ...]

Configurations (``--configs``; default: all that make sense on this CPU):
  fp32            float32, eager (this project's default before CPU tuning)
  fp32-cl         float32, eager, channels-last
  fp32-winograd   float32, eager, Winograd F(4×4, 3×3) / unfolded 3×3 convolutions
  bf16            bfloat16, eager              (only with native bf16: AVX-512 BF16 or AMX)
  fp32-int8       float32 with dynamic int8 linear layers (costs quality; never a default)
  auto            what the app and CLI run on this CPU (deblurdiff.cpu.tuning.choose_cpu_config and
                  prepare_cpu_pipeline)
Configurations that would crawl on this CPU (bfloat16 without native support) are
skipped with the reason printed. To see what a CPU without AVX-512 does, cap the
instruction sets (and check the bf16 probe printed in the header):

    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/bench_model.py ...

Memory: about 5.5 GB of float32 weights, shared between the reference and our networks,
5.7 GB more in the reference's child process, plus up to 5.5 GB for a
bfloat16 copy and 1.6 GB of Winograd filters: run one such job at a time.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deblurdiff.cpu.tuning import (  # noqa: E402
    choose_cpu_config,
    cpu_features,
    describe_cpu,
    enable_cpu_winograd,
    prepare_cpu_pipeline,
)
from deblurdiff.cpu.winograd import winograd_bytes  # noqa: E402
from baselines import disable_winograd  # noqa: E402
from deblurdiff.models.configs import build_components, make_scheduler, make_test_tokenizer  # noqa: E402

NETWORKS = ("unet", "controlnet", "lkpn")
CONFIGS = {
    "fp32": dict(dtype=torch.float32),
    "fp32-cl": dict(dtype=torch.float32, channels_last=True),
    "fp32-winograd": dict(dtype=torch.float32, winograd=True),
    "bf16": dict(dtype=torch.bfloat16),
    "fp32-int8": dict(dtype=torch.float32, int8=True),
}
DEFAULT_CONFIGS = ("fp32", "fp32-winograd", "bf16", "auto")


def auto_config() -> tuple[str, dict]:
    """The configuration the app chooses on this CPU, as a CONFIGS entry that
    configure() applies with the app's own prepare_cpu_pipeline."""
    config = choose_cpu_config()
    spec = dict(dtype=config.dtype, prepare=config)
    return f"auto ({config.describe().split(' — ')[0]})", spec


MODEL_T = 500


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------ the reference


@torch.no_grad()
def build_reference(ref_dir: Path):
    """The reference's ControlLDM: full-size UNet, ControlNet and LKPN with random
    weights; small VAE and text tower (a model call does not use them)."""
    import yaml

    sys.path.insert(0, str(ROOT / "scripts"))
    from make_parity_fixtures import _LKPN_OVERRIDES, SMALL, import_reference

    ref = import_reference(ref_dir)
    cfg = yaml.safe_load((ref_dir / "configs/inference/cldm.yaml").read_text())["params"]
    _LKPN_OVERRIDES.clear()
    # Small VAE and text tower, 64 channels per attention head like the rest (so that the
    # converter's single head size fits every network).
    vae = {**SMALL["vae"], "ddconfig": {**SMALL["vae"]["ddconfig"], "ch": 64}}
    clip = dict(embed_dim=64, layer="penultimate",
                vision_cfg=dict(image_size=32, layers=1, width=64, head_width=64, patch_size=16),
                text_cfg=dict(context_length=77, vocab_size=1000, width=64, heads=1, layers=2))
    with torch.device("meta"):
        cldm = ref.ControlLDM(unet_cfg=cfg["unet_cfg"], vae_cfg=vae, clip_cfg=clip,
                              controlnet_cfg=cfg["controlnet_cfg"], latent_scale_factor=cfg["latent_scale_factor"])
    cldm.to_empty(device="cpu")
    torch.manual_seed(0)
    done = set()
    for module in cldm.modules():
        if hasattr(module, "reset_parameters") and not isinstance(module, torch.nn.MultiheadAttention):
            module.reset_parameters()
            done.update(id(p) for p in module.parameters(recurse=False))
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and module.weight is not None:
            # Not all ones / zeros, so that every layer's weights matter.
            module.weight.copy_(1 + 0.1 * torch.randn_like(module.weight))
            module.bias.copy_(0.1 * torch.randn_like(module.bias))
    for p in cldm.parameters():
        if id(p) not in done:
            p.copy_(0.02 * torch.randn_like(p))
    for name, b in cldm.named_buffers():
        b.zero_()
    return cldm.eval()


class ReferenceProcess:
    """The reference's model call in a child process (``--serve-reference``): same
    weights (built from the same seed) and inputs, the C allocator as it comes."""

    def __init__(self, ref_dir: Path, latent: int, threads: int | None):
        command = [sys.executable, __file__, "--serve-reference", str(ref_dir), "--latent", str(latent)]
        if threads:
            command += ["--threads", str(threads)]
        self.child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ask("ready")

    def ask(self, line: str) -> str:
        self.child.stdin.write(line + "\n")
        self.child.stdin.flush()
        answer = self.child.stdout.readline().strip()
        if not answer:
            raise RuntimeError(f"the reference process stopped (exit code {self.child.poll()})")
        return answer

    def call(self) -> float:
        """Seconds of one model call."""
        return float(self.ask("call"))

    def output(self) -> torch.Tensor:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "eps.pt"
            self.ask(f"save {path}")
            return torch.load(path)

    def close(self) -> None:
        self.child.stdin.close()
        self.child.wait()


def serve_reference(ref_dir: Path, latent: int) -> None:
    """The child's side of ReferenceProcess: one line in, one line out."""
    answers, sys.stdout = sys.stdout, sys.stderr  # the reference prints as it builds
    torch.set_flush_denormal(True)
    cldm = build_reference(ref_dir.resolve())
    x, c, text = inputs(latent, 1024)
    t, cond, eps = torch.tensor([MODEL_T]), {"c_txt": text, "c_img": c}, None
    print(f"# reference process: built, RSS {rss_gb():.1f} GB", file=sys.stderr, flush=True)
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "call":
            faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            with torch.inference_mode():
                eps = cldm(x, t, cond)[0]
            seconds = time.perf_counter() - start
            print(f"# reference call: {seconds:.2f} s, "
                  f"{resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults:,} page faults", file=sys.stderr)
            answer = f"{seconds:.6f}"
        elif command == "save":
            torch.save(eps, arg)
            answer = "saved"
        else:
            answer = "ready"
        print(answer, file=answers, flush=True)


def ours_from_reference(cldm):
    """Our pipeline converted from the reference's weights (tensors shared, not copied)."""
    from deblurdiff.models.single_file import convert_deblurdiff_checkpoint
    from deblurdiff.pipeline.pipeline_deblurdiff import DeblurDiffPipeline

    state = {k: v for k, v in cldm.state_dict().items() if not k.startswith("clip.model.visual.")}
    components = convert_deblurdiff_checkpoint(state)
    return DeblurDiffPipeline(**components, tokenizer=make_test_tokenizer(), scheduler=make_scheduler())


def ours_random():
    from deblurdiff.pipeline.pipeline_deblurdiff import DeblurDiffPipeline

    return DeblurDiffPipeline(**build_components("full", seed=0))


# ------------------------------------------------------------------ timing


def inputs(latent: int, context: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, latent, latent, generator=g)
    c = torch.randn(1, 4, latent, latent, generator=g) * 0.8
    text = torch.randn(1, 77, context, generator=g)
    return x, c, text


def timed(call, repeats: int) -> tuple[float, float, object]:
    """(first call s, median of ``repeats`` further calls s, last output)."""
    t = time.perf_counter()
    out = call()
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t)
    return first, statistics.median(times) if times else first, out


def bf16_probe() -> tuple[float, float]:
    """ms of a 3×3 convolution (320 channels, 64×64) in float32 and in bfloat16: shows
    whether this CPU (as capped) runs bfloat16 natively."""
    conv = torch.nn.Conv2d(320, 320, 3, padding=1)
    x = torch.randn(1, 320, 64, 64)
    result = []
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            m, xi = conv.to(dtype), x.to(dtype)
            m(xi)
            t = time.perf_counter()
            m(xi)
            result.append(1e3 * (time.perf_counter() - t))
    return result[0], result[1]


def configure(pipe, name: str) -> None:
    spec = CONFIGS[name]
    if "prepare" in spec:
        prepare_cpu_pipeline(pipe, spec["prepare"], measure=False)
        return
    fmt = torch.channels_last if spec.get("channels_last") else torch.contiguous_format
    if pipe.unet.dtype != spec["dtype"]:
        pipe.to(dtype=spec["dtype"])
    for module in (pipe.unet, pipe.controlnet, pipe.lkpn):
        module.to(memory_format=fmt)
    if spec.get("winograd"):
        enable_cpu_winograd(pipe.unet, pipe.controlnet, pipe.lkpn)
    if spec.get("int8"):
        from torch.ao.quantization import quantize_dynamic

        for name_ in ("unet", "controlnet"):
            quantize_dynamic(getattr(pipe, name_), {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
        quantize_dynamic(pipe.lkpn.unet, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


def unconfigure(pipe) -> None:
    """Drop Winograd filters."""
    for module in (pipe.unet, pipe.controlnet, pipe.lkpn, pipe.vae):
        disable_winograd(module)
    gc.collect()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, default=None, help="checkout of kkkls/DeblurDiff")
    parser.add_argument("--configs", nargs="*", default=None, choices=sorted(CONFIGS) + ["auto"])
    parser.add_argument("--repeats", type=int, default=2, help="timed calls after the warm-up (median reported)")
    parser.add_argument("--latent", type=int, default=64, help="latent size (image size / 8)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    parser.add_argument("--eac-share", action="store_true", help="also time EAC alone in the float32 call")
    parser.add_argument("--reference-process", choices=("child", "same"), default="child",
                        help="run the reference in a child process with the allocator as it comes (default), "
                             "or in this process")
    parser.add_argument("--serve-reference", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.serve_reference:
        return serve_reference(args.serve_reference, args.latent)
    diffusers_logging.set_verbosity_error()  # the in-place bfloat16 cast is intended
    # Random weights give denormal activations, which slow float32 kernels erratically
    # (in both implementations alike); flushing them measures the arithmetic.
    torch.set_flush_denormal(True)

    features = cpu_features()
    fp32_ms, bf16_ms = bf16_probe()
    print(f"# {describe_cpu(features)}")
    caps = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
            if k in os.environ}
    print(f"# ISA caps in the environment: {caps or 'none'}")
    print(f"# bf16 probe (3×3 conv, 320 ch, 64×64): float32 {fp32_ms:.1f} ms, bfloat16 {bf16_ms:.1f} ms "
          f"({bf16_ms / fp32_ms:.1f}× float32)")
    print(f"# load average at start {os.getloadavg()[0]:.2f}; full-size networks, RANDOM weights")

    names = list(args.configs or DEFAULT_CONFIGS)
    if "auto" in names:
        auto_name, auto_spec = auto_config()
        CONFIGS[auto_name] = auto_spec
        names[names.index("auto")] = auto_name
    runnable = []
    for name in names:
        if CONFIGS[name]["dtype"] == torch.bfloat16 and not features.native_bf16:
            print(f"# skipped {name}: no native bfloat16 on this CPU (neither AVX-512 BF16 nor AMX usable), "
                  f"bfloat16 would run {bf16_ms / fp32_ms:.0f}× slower than float32")
            continue
        runnable.append(name)
    # int8 last (in place), float32 before bfloat16 (bfloat16 copies replace the float32 weights).
    runnable.sort(key=lambda n: (CONFIGS[n].get("int8", False), CONFIGS[n]["dtype"] != torch.float32))

    t0 = time.perf_counter()
    x, c, text = inputs(args.latent, 1024)
    t = torch.tensor([MODEL_T])
    cldm = ref_call = child = None
    if args.reference:
        cldm = build_reference(args.reference.resolve())
        print(f"# reference built in {time.perf_counter() - t0:.0f} s (RSS {rss_gb():.1f} GB)", flush=True)
        cond = {"c_txt": text, "c_img": c}
        if args.reference_process == "child":
            child = ReferenceProcess(args.reference, args.latent, args.threads)
            print("# the reference runs in a child process (C allocator as it comes)", flush=True)

            def ref_call():
                return child.call()
        else:
            print("# the reference runs in this process", flush=True)
            last = {}

            def ref_call():
                start = time.perf_counter()
                with torch.inference_mode():
                    last["eps"] = cldm(x, t, cond)[0]
                return time.perf_counter() - start

        pipe = ours_from_reference(cldm)  # the same weight tensors
    else:
        pipe = ours_random()
    pipe.set_progress_bar_config(disable=True)
    for name in NETWORKS:
        getattr(pipe, name).eval()
    print("# parameters: " + ", ".join(f"{n} {count(getattr(pipe, n)) / 1e6:,.1f} M" for n in NETWORKS))

    def call():  # the denoiser is built per call: configurations change the model dtype
        with torch.no_grad():
            return pipe.make_denoiser(c, text)(x, t)[0]

    ref_eps = None
    if ref_call is not None:
        ref_call()  # warm-up
        ref_eps = child.output() if child is not None else last["eps"]
    rows, eac_s = [], None
    for name in runnable:
        configure(pipe, name)
        first, _, eps = timed(call, 0)  # warm-up
        # Interleaved with the reference, so that changes in the machine's load hit both.
        ours_s, ref_s, ratios, faults = [], [], [], 0
        for _ in range(args.repeats):
            if ref_call is not None:
                ref_s.append(ref_call())
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt  # ours only, with a child
            to = time.perf_counter()
            eps = call()
            ours_s.append(time.perf_counter() - to)
            faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
            if ref_s:
                ratios.append(ref_s[-1] / ours_s[-1])
        diff = None
        if ref_eps is not None:
            diff = (eps.float() - ref_eps).abs().max().item() / ref_eps.abs().max().item()
        row = dict(name=name, first=first, ours=statistics.median(ours_s), diff=diff,
                   ref=statistics.median(ref_s) if ref_s else None, ratio=statistics.median(ratios) if ratios else None)
        rows.append(row)
        ref_text = f", reference {row['ref']:.2f} s, ratio {row['ratio']:.2f}×" if ratios else ""
        extra = sum(winograd_bytes(getattr(pipe, n)) for n in NETWORKS)
        extra_text = f" (Winograd filters {extra / 2**30:.2f} GB)" if extra else ""
        print(f"  {name}: {row['ours']:.2f} s per call (first {first:.1f} s){ref_text}, RSS {rss_gb():.1f} GB"
              f"{extra_text}, {faults // max(1, args.repeats):,} page faults per call, "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
        if name == "fp32" and args.eac_share:
            from deblurdiff.ops import eac

            with torch.no_grad():
                kernels = pipe.lkpn.predict_kernels(c, x, t.expand(1), text)
                _, eac_s, _ = timed(lambda: eac(c, kernels, residual=True), 5)
        if any(CONFIGS[name].get(key) for key in ("winograd", "prepare")):
            unconfigure(pipe)

    if child is not None:
        child.close()
    size = args.latent * 8
    print()
    where = " in a child process" if child is not None else " in this process"
    against = f"the reference's fp32 eager call{where}, timed alternately with each configuration" if cldm is not None \
        else f"our '{rows[0]['name']}' call"
    print(f"One model call (LKPN + EAC -> ControlNet -> UNet), batch 1, {size}×{size} image, "
          f"median of {args.repeats} after a warm-up call; speed-up against {against}:")
    print()
    print("| configuration | reference s / call | ours s / call | speed-up | first call (s) | max abs diff / max abs (eps vs reference) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = r["ratio"] if r["ratio"] is not None else rows[0]["ours"] / r["ours"]
        d = "–" if r["diff"] is None else f"{r['diff']:.1e}"
        ref = "–" if r["ref"] is None else f"{r['ref']:.2f}"
        print(f"| {r['name']} | {ref} | {r['ours']:.2f} | {ratio:.2f}× | {r['first']:.1f} | {d} |")
    if eac_s is not None:
        fp32 = next(r["ours"] for r in rows if r["name"] == "fp32")
        print(f"\nEAC (+ residual) alone: {1e3 * eac_s:.1f} ms, {100 * eac_s / fp32:.2f}% of the float32 eager call")
    print(f"\n(load average at the end {os.getloadavg()[0]:.2f}; total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
