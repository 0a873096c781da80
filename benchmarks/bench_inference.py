"""Inference speed and memory of DeblurDiffPipeline, full-size models, one run.

The models are the full-size architectures (SD 2.1 UNet, ControlNet, LKPN, VAE) with
random weights: timings and memory are the real ones, the images are NOT deblurring
results and are only used to compare precisions (PSNR against float32, same seed).

The baseline is the reference configuration reproduced with this code: float32, eager,
untiled, the reference's 50-step DDPM, guidance 1, PyTorch's default settings. The other
GPU rows run with cuDNN autotuning (``torch.backends.cudnn.benchmark``). Every other row is one optimisation
(or a stack of them) at the same size, reported as ratios against that baseline.

    python benchmarks/bench_inference.py                 # preset from the device
    python benchmarks/bench_inference.py --preset cpu    # reduced set (see below)
    python benchmarks/bench_inference.py --json out.json

Presets:
  gpu  512², 1024², 2048²: float32 / float16 / bfloat16, channels-last, torch.compile,
       DPM-Solver++ and DDIM in 20 steps, tiling at 1024² and 2048². 512² runs all
       its steps; larger sizes run a few and extrapolate to the sampler's full count.
       Peak memory is torch.cuda.max_memory_allocated (weights included).
  cpu  512² (2 steps run; the second one's time extrapolated to the full count) and
       1024² untiled vs tiled (1 step). No compile (not used on CPU), no float16.
       Peak memory is the process's peak resident set size (weights included).
On the CPU denormals are flushed to zero (random weights produce them, and they slow
float32 kernels erratically). Per-image times are VAE encode + decode + steps × time per step. On the CPU, other
processes sharing the machine inflate times (the load average is printed).

On a shared machine, run full-size jobs one at a time (e.g. under `flock LOCKFILE ...`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from deblurdiff.pipeline.loading import pick_device  # noqa: E402
from deblurdiff.models.configs import build_components  # noqa: E402
from deblurdiff.parsing import DTYPES  # noqa: E402
from deblurdiff.pipeline.pipeline_deblurdiff import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT, DeblurDiffPipeline  # noqa: E402

SAMPLER_STEPS = {"ddpm": 50, "ddim": 20, "dpmsolver++": 20}


@dataclass
class Case:
    name: str
    size: int
    dtype: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    tiled: bool = False
    sampler: str = "ddpm"
    steps_run: int = 50  # steps actually run (the rest is extrapolated)
    compare_to: str | None = None  # name of the case whose output PSNR is taken against

    @property
    def steps_image(self) -> int:
        return SAMPLER_STEPS[self.sampler]

    @property
    def key(self) -> str:
        return f"{self.name}@{self.size}"


@dataclass
class Result:
    case: Case
    status: str = "ok"
    encode_s: float = math.nan
    decode_s: float = math.nan
    step_s: float = math.nan
    image_s: float = math.nan
    warmup_s: float = math.nan
    peak_gb: float = math.nan
    psnr_db: float | None = None
    extra: dict = field(default_factory=dict)


BASE = "fp32 eager (reference)"


def gpu_cases() -> list[Case]:
    """In execution order: what the targets need first (the time budget may cut the tail),
    few switches of precision and compilation; PSNR is computed once all have run."""
    cl = dict(dtype="bf16", channels_last=True)
    return [
        Case(BASE, 512),
        Case("fp16", 512, "fp16", compare_to=BASE),
        Case("bf16", 512, "bf16", compare_to=BASE),
        Case("bf16 + channels_last", 512, **cl, compare_to=BASE),
        Case("bf16 + channels_last", 1024, **cl, steps_run=5, compare_to=BASE),
        Case("bf16 + cl + compile", 512, **cl, compile=True, compare_to=BASE),
        Case("bf16 + cl + compile, DPM-Solver++ 20", 512, **cl, compile=True, sampler="dpmsolver++", steps_run=20),
        Case("bf16 + cl + compile, DDIM 20", 512, **cl, compile=True, sampler="ddim", steps_run=20),
        Case("bf16 + cl + compile, tiled", 2048, **cl, compile=True, tiled=True, steps_run=2, compare_to=BASE),
        Case("bf16 + cl + compile, tiled", 1024, **cl, compile=True, tiled=True, steps_run=5, compare_to=BASE),
        Case("bf16 + cl + compile, tiled, DPM-Solver++ 20", 2048, **cl, compile=True, tiled=True,
             sampler="dpmsolver++", steps_run=2),
        Case(BASE, 1024, steps_run=5),
        Case(BASE, 2048, steps_run=2),
    ]


def cpu_cases() -> list[Case]:
    """In execution order (float32 first: without master weights precision only goes down)."""
    return [
        Case(BASE, 512, steps_run=2),
        Case("fp32 + channels_last", 512, "fp32", True, steps_run=2, compare_to=BASE),
        Case(BASE, 1024, steps_run=1),
        Case("fp32, tiled (9 tiles)", 1024, "fp32", tiled=True, steps_run=1, compare_to=BASE),
        Case("bf16", 512, "bf16", steps_run=2, compare_to=BASE),
        Case("bf16, DPM-Solver++ 20", 512, "bf16", sampler="dpmsolver++", steps_run=2),
    ]


class PeakRSS:
    """Peak resident set size of this process while active (sampled every 10 ms)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(0.01)

    def __enter__(self):
        self.peak = self.current()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


class Bench:
    def __init__(self, device: torch.device, keep_master: bool, model_size: str = "full"):
        self.device = device
        self.cuda = device.type == "cuda"
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self.cuda:
                with torch.device(device):
                    components = build_components(model_size, seed=0)
            else:
                components = build_components(model_size, seed=0)
            pipe = DeblurDiffPipeline(**components)
            # As deployed: the default prompts' embeddings are stored, no text encoder in memory.
            embeds = {p: pipe.encode_prompt(p) for p in (DEFAULT_PROMPT, DEFAULT_NEGATIVE_PROMPT)}
            pipe.register_modules(text_encoder=None)
            del components
            pipe.set_prompt_embeds(embeds)
            pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.build_s = time.perf_counter() - t
        self.modules = {"unet": pipe.unet, "controlnet": pipe.controlnet, "lkpn": pipe.lkpn, "vae": pipe.vae}
        # float32 master weights (host memory), so that every precision starts from them.
        self.master = (
            {n: {k: v.detach().to("cpu", copy=True) for k, v in m.state_dict().items()} for n, m in self.modules.items()}
            if keep_master
            else None
        )
        self.state = dict(dtype="fp32", channels_last=False, compile=False)
        self.outputs: dict[str, torch.Tensor] = {}

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def configure(self, case: Case) -> None:
        pipe = self.pipe
        if self.cuda:  # the baseline runs with PyTorch's defaults
            torch.backends.cudnn.benchmark = case.name != BASE
        if case.dtype != self.state["dtype"]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pipe.to(dtype=DTYPES[case.dtype])
            if self.master is not None:
                for name, module in self.modules.items():
                    module.load_state_dict(self.master[name])
            elif self.state["dtype"] != "fp32":
                raise RuntimeError("without float32 master weights precisions must go fp32 -> one other")
            self.state["dtype"] = case.dtype
            self.state["channels_last"] = False  # .to(dtype) keeps the format, but re-apply below
        fmt = torch.channels_last if case.channels_last else torch.contiguous_format
        for module in self.modules.values():
            module.to(memory_format=fmt)
        self.state["channels_last"] = case.channels_last
        if case.compile and not self.state["compile"]:
            for module in (pipe.unet, pipe.controlnet, pipe.lkpn.unet):
                module.compile(dynamic=False)
            self.state["compile"] = True
        elif not case.compile and self.state["compile"]:
            for module in (pipe.unet, pipe.controlnet, pipe.lkpn.unet):
                module._compiled_call_impl = None
            self.state["compile"] = False

    def image(self, size: int) -> torch.Tensor:
        rng = np.random.default_rng(size)
        # Smooth random content (a real photo's statistics matter little for timing).
        small = torch.from_numpy(rng.random((1, 3, size // 16, size // 16), dtype=np.float32))
        return torch.nn.functional.interpolate(small, size=(size, size), mode="bicubic").clamp(0, 1)

    def run_case(self, case: Case) -> Result:
        pipe, res = self.pipe, Result(case)
        self.configure(case)
        image = self.image(case.size)
        kwargs = dict(sampler=case.sampler, tiled=case.tiled, guidance_scale=1.0, output_type="pt")

        timings = {"encode": 0.0, "decode": 0.0}
        original = {"encode": pipe.encode_condition, "decode": pipe.decode_latents}

        def timed(name):
            def wrapper(*a, **kw):
                self.sync()
                t = time.perf_counter()
                out = original[name](*a, **kw)
                self.sync()
                timings[name] += time.perf_counter() - t
                return out

            return wrapper

        stamps = []

        def stamp(p, i, t, kw):
            self.sync()
            stamps.append(time.perf_counter())
            return {}

        if self.cuda:  # cuDNN autotuning and compilation for this shape
            t = time.perf_counter()
            pipe(image, num_inference_steps=1, generator=torch.Generator().manual_seed(0), **kwargs)
            self.sync()
            res.warmup_s = time.perf_counter() - t
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

        pipe.encode_condition, pipe.decode_latents = timed("encode"), timed("decode")
        try:
            with PeakRSS() as rss:
                t0 = time.perf_counter()
                out = pipe(
                    image,
                    num_inference_steps=case.steps_run,
                    generator=torch.Generator().manual_seed(0),
                    callback_on_step_end=None if self.cuda else stamp,
                    **kwargs,
                ).images
                self.sync()
                total = time.perf_counter() - t0
        finally:
            del pipe.encode_condition, pipe.decode_latents
        res.encode_s, res.decode_s = timings["encode"], timings["decode"]
        loop = total - res.encode_s - res.decode_s
        if len(stamps) >= 2:  # steady state: the steps after the first
            res.step_s = float(np.median(np.diff(stamps)))
        else:
            res.step_s = loop / case.steps_run
        if case.steps_run == case.steps_image:
            res.image_s = total
        else:
            res.image_s = res.encode_s + res.decode_s + case.steps_image * res.step_s
        res.peak_gb = (torch.cuda.max_memory_allocated() if self.cuda else rss.peak) / 2**30
        out = out.float().cpu()
        self.outputs[case.key] = out
        res.extra["finite"] = bool(torch.isfinite(out).all())
        return res

    def fill_psnr(self, results: list[Result]) -> None:
        for r in results:
            c = r.case
            out = self.outputs.get(c.key)
            ref = self.outputs.get(f"{c.compare_to}@{c.size}") if c.compare_to else None
            if out is not None and ref is not None:
                mse = (out - ref).pow(2).mean().item()
                r.psnr_db = float("inf") if mse == 0 else 10 * math.log10(1 / mse)


def fmt(x, spec=".2f", suffix=""):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:{spec}}{suffix}"


def table(results: list[Result], cuda: bool) -> str:
    base = {r.case.size: r for r in results if r.case.name == BASE and r.status == "ok"}
    head = (
        f"| {'configuration':<44} | size  | steps (run) | s/step | s/image | speed-up | peak GB | mem ratio | PSNR vs fp32 |"
    )
    lines = [head, "|" + "|".join("-" * (len(p)) for p in head.split("|")[1:-1]) + "|"]
    order = {id(r): i for i, r in enumerate(results)}
    for r in sorted(results, key=lambda r: (r.case.size, r.case.name != BASE, order[id(r)])):
        c, b = r.case, base.get(r.case.size)
        if r.status != "ok":
            lines.append(f"| {c.name:<44} | {c.size:>5} | {r.status}")
            continue
        speed = b.image_s / r.image_s if b else None
        mem = r.peak_gb / b.peak_gb if b else None
        psnr = fmt(r.psnr_db, ".1f", " dB") if r.psnr_db is not None else "–"
        if not r.extra.get("finite", True):
            psnr += " (non-finite output)"
        lines.append(
            f"| {c.name:<44} | {c.size:>5} | {c.steps_image:>4} ({c.steps_run:>3}) | {fmt(r.step_s, '.3f'):>6} | "
            f"{fmt(r.image_s, '.2f'):>7} | {fmt(speed, '.2f', '×'):>8} | {fmt(r.peak_gb):>7} | {fmt(mem, '.2f'):>9} | "
            f"{psnr:>12} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--preset", choices=["gpu", "cpu"], default=None, help="default: from the device")
    parser.add_argument("--sizes", type=int, nargs="*", default=None, help="only these sizes")
    parser.add_argument("--only", nargs="*", default=None, help="only configurations whose name contains one of these")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile configurations")
    parser.add_argument("--budget-s", type=float, default=None, help="skip what would start after this many seconds")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--model-size", choices=["full", "tiny"], default="full", help="tiny: to check this script")
    args = parser.parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # casting notices from .to(dtype)

    device = pick_device(args.device)
    if device.type == "cpu":
        # Random weights give denormal activations, which slow float32 CPU kernels 1.5-3×
        # (and erratically); flushing them to zero measures the arithmetic instead.
        torch.set_flush_denormal(True)
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    cases = gpu_cases() if preset == "gpu" else cpu_cases()
    if args.sizes:
        cases = [c for c in cases if c.size in args.sizes]
    if args.only:
        cases = [c for c in cases if c.name == BASE or any(s in c.name for s in args.only)]
    if args.no_compile:
        cases = [c for c in cases if not c.compile]

    start = time.perf_counter()
    print(f"# DeblurDiff inference benchmark — preset {preset}, device {device}", flush=True)
    print(f"# torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}", flush=True)
    if device.type == "cuda":
        print(f"# GPU: {torch.cuda.get_device_name(device)}", flush=True)
    else:
        print(f"# CPU threads: {torch.get_num_threads()}, load average at start: {os.getloadavg()}", flush=True)
    print(f"# {args.model_size}-size models, RANDOM weights: real timings, outputs are not deblurring results", flush=True)

    bench = Bench(device, keep_master=preset == "gpu", model_size=args.model_size)
    weights_gb = sum(p.numel() * p.element_size() for m in bench.modules.values() for p in m.parameters()) / 2**30
    print(f"# built in {bench.build_s:.0f} s; UNet+ControlNet+LKPN+VAE weights {weights_gb:.2f} GB in fp32 "
          "(text encoder not loaded: stored default-prompt embeddings)", flush=True)

    results = []
    for case in cases:
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            results.append(Result(case, status="skipped (time budget)"))
            continue
        try:
            r = bench.run_case(case)
        except torch.cuda.OutOfMemoryError:
            r = Result(case, status="out of memory")
            torch.cuda.empty_cache()
        except Exception as exc:  # report and go on with the other configurations
            r = Result(case, status=f"failed: {type(exc).__name__}: {exc}"[:160])
        results.append(r)
        print(f"  {case.key:<55} {r.status:<4} step {fmt(r.step_s, '.3f')} s, image {fmt(r.image_s)} s, "
              f"peak {fmt(r.peak_gb)} GB, warm-up {fmt(r.warmup_s, '.1f')} s", flush=True)

    bench.fill_psnr(results)
    print()
    print(table(results, device.type == "cuda"))
    print()
    print("speed-up and mem ratio: against the fp32 eager untiled DDPM-50 row of the same size; s/image is for "
          "the sampler's full step count (50 DDPM, 20 DDIM / DPM-Solver++); 'steps (run)' is how many ran. "
          "PSNR: same seed, same steps, output in [0, 1] against that row.")
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**asdict(r.case), **{k: v for k, v in asdict(r).items() if k != "case"}} for r in results], f,
                      indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
