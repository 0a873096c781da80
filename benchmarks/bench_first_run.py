"""First start with the official checkpoint, at full size: how long verifying and converting take.

    python benchmarks/bench_first_run.py [--dtype fp32|fp16|bf16] [--workdir DIR]

A float32 checkpoint with random values and the reference's full key/shape list
(tests/fixtures/parity/reference_full_shapes.json.gz, 1.81 B parameters) is written to
WORKDIR, then served by a local copy in place of the Drive download, and
``deblurdiff.pipeline.weights.official_pipeline`` verifies and converts it as on a first start;
finally the cached folder is loaded as on every later start. Prints seconds per phase and
the peak resident memory (memory-mapped checkpoint pages included). Needs about 20 GB of
free disk in WORKDIR. The values are random: nothing here deblurs.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from deblurdiff.parsing import DTYPES  # noqa: E402

SHAPES = ROOT / "tests" / "fixtures" / "parity" / "reference_full_shapes.json.gz"


def write_full_checkpoint(path: Path) -> int:
    """A float32 ``model.pth`` of the full reference layout; values from a memory-mapped file so
    that writing it needs no more RAM than the page cache gives."""
    shapes = json.loads(gzip.open(SHAPES, "rt").read())
    total = sum(math.prod(s) for s in shapes.values())
    backing = path.with_suffix(".values")
    values = np.memmap(backing, dtype=np.float32, mode="w+", shape=(total,))
    block = np.random.default_rng(0).standard_normal(1 << 24, dtype=np.float32) * 0.02
    for start in range(0, total, block.size):
        n = min(block.size, total - start)
        values[start : start + n] = block[:n]
    values.flush()
    state, offset = {}, 0
    for key, shape in shapes.items():
        n = math.prod(shape)
        state[key] = torch.from_numpy(values[offset : offset + n]).view(shape)
        offset += n
    torch.save(state, path)
    del state, values
    backing.unlink()
    return total


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def anonymous_gb() -> float:
    """Resident memory not backed by files (the part that needs RAM), Linux only."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1e6
    except OSError:
        pass
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp16")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="deblurdiff-first-run-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["DEBLURDIFF_CACHE"] = str(work / "cache")

    from deblurdiff.pipeline import weights
    from deblurdiff.pipeline.loading import load_pipeline

    served = work / "served" / "model.pth"
    served.parent.mkdir(exist_ok=True)
    start = time.perf_counter()
    params = write_full_checkpoint(served)
    print(f"wrote a random full-size checkpoint: {params / 1e9:.3f} B parameters, "
          f"{served.stat().st_size / 1e9:.2f} GB, {time.perf_counter() - start:.0f} s")

    phases: dict[str, float] = {}
    peak_anon = {"gb": 0.0}
    sampling = threading.Event()

    def sample() -> None:  # the anonymous (RAM-backed) part, twice a second
        while not sampling.wait(0.5):
            peak_anon["gb"] = max(peak_anon["gb"], anonymous_gb())

    threading.Thread(target=sample, daemon=True).start()
    clock = {"t": time.perf_counter(), "phase": None}

    def report(message: str) -> None:
        now = time.perf_counter()
        if clock["phase"]:
            phases[clock["phase"]] = phases.get(clock["phase"], 0.0) + now - clock["t"]
        clock["t"], clock["phase"] = now, None
        for word, phase in (("Downloading", "copy (stands for the download)"), ("Verifying", "verify (CRCs, tensors, SHA-256)"),
                            ("Converting", f"convert to diffusers {args.dtype}")):
            if message.startswith(word):
                clock["phase"] = phase
        print(f"  [{now - first:7.1f} s] {message}", flush=True)

    dtype = DTYPES[args.dtype]
    first = time.perf_counter()
    folder = weights.official_pipeline(dtype, downloader=lambda dest: shutil.copyfile(served, dest), report=report)
    report("done")
    first_total = time.perf_counter() - first
    first_peak = peak_gb()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())

    start = time.perf_counter()
    pipe = load_pipeline(None, device="cpu", dtype=args.dtype, allow_download=False)
    later = time.perf_counter() - start
    del pipe

    print()
    print(f"command: python benchmarks/bench_first_run.py --dtype {args.dtype}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    for phase, seconds in phases.items():
        print(f"{phase:40s} {seconds:7.1f} s")
    copy = phases.get("copy (stands for the download)", 0.0)
    print(f"{'first start in all, without the download':40s} {first_total - copy:7.1f} s")
    print(f"{'later start: load the cached folder':40s} {later:7.1f} s")
    print(f"converted folder: {size / 1e9:.2f} GB; peak resident memory {max(first_peak, peak_gb()):.1f} GB "
          f"(memory-mapped checkpoint pages included), of which at most {peak_anon['gb']:.1f} GB not file-backed")
    sampling.set()
    shutil.rmtree(work / "served", ignore_errors=True)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
