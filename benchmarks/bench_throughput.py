"""Images per second of DeblurDiffPipeline by batch size (what ``--batch-size`` buys), one run.

Full-size models (SD 2.1 UNet, ControlNet, LKPN, VAE) with RANDOM weights: the timings are
the real ones, the images are not deblurring results. Each batch size runs the same
call — ``--size``² images, ``--steps`` denoising steps, one generator per image, VAE
encode and decode included — ``--repeats`` times, after an untimed warm-up call
(``--warmup each``: one per batch size, the CUDA default, since kernels are tuned per
shape; ``once``: one batch-1 call before everything, the CPU default, which takes the
first call's one-time costs out of batch 1's figure), and the table gives images per
second and the ratio to batch 1 measured in this run.

    python benchmarks/bench_throughput.py --device cpu --steps 1 --repeats 1
    python benchmarks/bench_throughput.py --device cuda --dtype fp16

On a shared machine other processes inflate times (the load average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from deblurdiff.pipeline.loading import pick_device  # noqa: E402
from deblurdiff.models.configs import build_components  # noqa: E402
from deblurdiff.parsing import DTYPES  # noqa: E402
from deblurdiff.pipeline.pipeline_deblurdiff import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT, DeblurDiffPipeline  # noqa: E402



def build(device: torch.device, dtype: str, model_size: str) -> DeblurDiffPipeline:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = DeblurDiffPipeline(**build_components(model_size, seed=0))
        # As deployed: the default prompts' embeddings stored, no text encoder in memory.
        embeds = {p: pipe.encode_prompt(p) for p in (DEFAULT_PROMPT, DEFAULT_NEGATIVE_PROMPT)}
        pipe.register_modules(text_encoder=None)
        pipe.set_prompt_embeds(embeds)
        pipe.set_progress_bar_config(disable=True)
    if device.type == "cpu":
        from deblurdiff.cpu.tuning import choose_cpu_config, prepare_cpu_pipeline

        config = choose_cpu_config(dtype=None if dtype == "auto" else dtype)
        print(f"# CPU configuration: {config.describe()}")
        prepare_cpu_pipeline(pipe, config, measure=False)
    else:
        pipe.to(device=device, dtype=DTYPES["fp16" if dtype == "auto" else dtype])
        if device.type == "cuda":  # channels-last and cuDNN autotuning
            for module in (pipe.unet, pipe.controlnet, pipe.lkpn, pipe.vae):
                module.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
    pipe.memory_budget = 1 << 62  # untiled at every batch size: the same work per image
    return pipe


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's peak so far


def run_batch(pipe, batch: int, size: int, steps: int, device: torch.device) -> float:
    gen = torch.Generator().manual_seed(batch)
    images = [torch.rand(size, size, 3, generator=gen).numpy() for _ in range(batch)]
    generators = [torch.Generator().manual_seed(i) for i in range(batch)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    pipe(images, generator=generators, num_inference_steps=steps, output_type="np")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES), help="auto: fp16 on CUDA, the CPU's choice on CPUs")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--batches", default="1,2,4,8", help="batch sizes, comma-separated (default 1,2,4,8)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per call (default: 20 on CUDA, 1 on CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per batch size (default: 3 on CUDA, 1 on CPU)")
    parser.add_argument("--warmup", choices=("each", "once", "none"), default=None,
                        help="untimed calls: each batch size (CUDA default), once at batch 1 (CPU default), none")
    parser.add_argument("--model-size", default="full", help="full (default) or tiny (a quick check of the script)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)

    device = pick_device(None if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    steps = args.steps or (20 if cuda else 1)
    repeats = args.repeats or (3 if cuda else 1)
    warmup = args.warmup or ("each" if cuda else "once")
    batches = [int(b) for b in args.batches.split(",") if b.strip()]

    print(f"# DeblurDiff throughput by batch size — device {device}, dtype {args.dtype}, {args.model_size} models, RANDOM weights")
    print(f"# torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}, "
          f"{torch.get_num_threads()} CPU threads, load average {tuple(round(x, 2) for x in os.getloadavg())}")
    if cuda:
        print(f"# GPU: {torch.cuda.get_device_name(device)}")
    print(f"# {args.size}² images, {steps} step(s) per call (VAE encode and decode included), "
          f"{repeats} timed call(s) per batch size, warm-up: {warmup}")
    sys.stdout.flush()
    pipe = build(device, args.dtype, args.model_size)

    if warmup == "once":
        run_batch(pipe, 1, args.size, steps, device)
    rows = []
    for batch in batches:
        try:
            if warmup == "each":
                run_batch(pipe, batch, args.size, steps, device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            seconds = sum(run_batch(pipe, batch, args.size, steps, device) for _ in range(repeats)) / repeats
            rows.append(dict(batch=batch, seconds=seconds, images_per_s=batch / seconds, peak_gb=peak_bytes(device) / 2**30))
        except torch.OutOfMemoryError:
            rows.append(dict(batch=batch, seconds=None, images_per_s=None, peak_gb=None))
            if cuda:
                torch.cuda.empty_cache()
        done = rows[-1]["seconds"]
        line = "out of memory" if done is None else f"{done:.3f} s per call, peak {rows[-1]['peak_gb']:.2f} GB"
        print(f"# batch {batch}: {line}", flush=True)

    base = next((r["images_per_s"] for r in rows if r["batch"] == 1 and r["images_per_s"]), None)
    peak = "peak GB" + ("" if cuda else " (process so far)")
    print(f"\n| batch | s/call | images/s | vs batch 1 | {peak} |")
    print("|------:|-------:|---------:|-----------:|--------:|")
    for r in rows:
        if r["seconds"] is None:
            print(f"| {r['batch']:5d} |    OOM |        – |          – |       – |")
            continue
        ratio = f"{r['images_per_s'] / base:.2f}×" if base else "–"
        print(f"| {r['batch']:5d} | {r['seconds']:6.2f} | {r['images_per_s']:8.3f} | {ratio:>10} | {r['peak_gb']:7.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=str(device), dtype=args.dtype, size=args.size, steps=steps, repeats=repeats, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
