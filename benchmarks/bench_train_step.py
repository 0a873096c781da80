"""Time one full-size DeblurDiff training step (random weights, reference architecture).

One step = VAE encoding of the sharp and blurry images, LKPN + ControlNet + frozen UNet
forward, backward to the ControlNet and LKPN, AdamW update: what the training loop does
(``deblurdiff.train.train.training_loss``), minus data loading. The text embedding of the
empty prompt is computed once, as the trainer caches it.

    python benchmarks/bench_train_step.py                      # CPU, fp32, 512x512, batch 1
    python benchmarks/bench_train_step.py --dtype bf16         # frozen models in bf16 + autocast
    python benchmarks/bench_train_step.py --device cuda --dtype both --gradient-checkpointing
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shlex
import sys
import time

import torch

# Run from a checkout without installing the package.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from deblurdiff.parsing import DTYPES  # noqa: E402


def bench(components, args, dtype_name: str) -> list[float]:
    from diffusers import DDPMScheduler

    from deblurdiff.train.train import training_loss

    device = torch.device(args.device)
    weight_dtype = DTYPES[dtype_name]
    vae, unet = components["vae"], components["unet"]
    controlnet, lkpn = components["controlnet"], components["lkpn"]
    for module in (vae, unet):
        module.requires_grad_(False).eval()
        torch.nn.Module.to(module, device=device, dtype=weight_dtype)
    for module in (controlnet, lkpn):
        module.requires_grad_(True).train()
        torch.nn.Module.to(module, device=device, dtype=torch.float32)
    if args.gradient_checkpointing:
        for module in (controlnet, lkpn, unet):
            module.enable_gradient_checkpointing()
    params = list(controlnet.parameters()) + list(lkpn.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = DDPMScheduler.from_config(components["scheduler"].config)
    text = components["text_embeds"].to(device).expand(args.batch_size, -1, -1)

    if weight_dtype == torch.float32:
        autocast = contextlib.nullcontext
    else:

        def autocast():
            return torch.autocast(device.type, dtype=weight_dtype)

    gen = torch.Generator(device="cpu").manual_seed(0)
    sharp = (torch.rand(args.batch_size, 3, args.resolution, args.resolution, generator=gen) * 2 - 1).to(device)
    blurry = torch.rand(args.batch_size, 3, args.resolution, args.resolution, generator=gen).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    for i in range(args.warmup + args.steps):
        sync()
        tic = time.perf_counter()
        loss, _ = training_loss(
            vae=vae, unet=unet, controlnet=controlnet, lkpn=lkpn, noise_scheduler=scheduler,
            sharp=sharp, blurry=blurry, text=text, generator=torch.Generator(device=device).manual_seed(i),
            weight_dtype=weight_dtype, autocast=autocast,
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        elapsed = time.perf_counter() - tic
        label = "warm-up" if i < args.warmup else "timed"
        print(f"  [{dtype_name}] step {i + 1} ({label}): {elapsed:.2f} s, loss {loss.item():.4f}", flush=True)
        if i >= args.warmup:
            times.append(elapsed)
    del optimizer
    if args.gradient_checkpointing:
        for module in (controlnet, lkpn, unet):
            module.disable_gradient_checkpointing()
    return times


def peak_memory_gib(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB (CUDA peak allocated)"
    try:
        import resource

        return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB (process peak RSS)"
    except ImportError:
        return "n/a"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16", "both"],
                        help="both: fp32 then bf16")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (CPU)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from deblurdiff.models.configs import build_components

    print(f"$ python {' '.join(shlex.quote(a) for a in [sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))}")
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
          f"batch {args.batch_size}, {args.resolution}x{args.resolution} -> latent "
          f"{args.resolution // 8}x{args.resolution // 8}, gradient checkpointing {args.gradient_checkpointing}")
    tic = time.perf_counter()
    components = build_components("full", seed=0)
    with torch.no_grad():
        tokenizer = components["tokenizer"]
        ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        components["text_embeds"] = components["text_encoder"](ids).last_hidden_state
    del components["text_encoder"]  # not needed again: the trainer caches the prompt embedding too
    gc.collect()
    names = ("unet", "controlnet", "lkpn", "vae")
    counts = {k: sum(p.numel() for p in components[k].parameters()) / 1e6 for k in names}
    print(f"built in {time.perf_counter() - tic:.1f} s; parameters (M): "
          + ", ".join(f"{k} {v:.1f}" for k, v in counts.items())
          + f"; trained: {counts['controlnet'] + counts['lkpn']:.1f}M")

    results = {}
    for dtype_name in (["fp32", "bf16"] if args.dtype == "both" else [args.dtype]):
        times = bench(components, args, dtype_name)
        results[dtype_name] = sum(times) / len(times)
    print(f"peak memory: {peak_memory_gib(args.device)}")
    for name, seconds in results.items():
        print(f"RESULT {name}: {seconds:.2f} s per training step "
              f"(mean of {args.steps}, batch {args.batch_size}, {args.resolution}^2, {args.device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
