"""The command line across processes: ``torchrun --nproc_per_node 2 -m deblurdiff ...`` on
the CPU (gloo), tiny random weights; and the split of the work."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from deblurdiff.cli import is_complete
from deblurdiff.distributed import Processes, process_device, shard

ROOT = Path(__file__).resolve().parent.parent


def test_shard_is_deterministic_balanced_and_covers_every_item_once():
    rng = np.random.default_rng(0)
    costs = [int(c) for c in rng.integers(1, 100, 200)]
    shards = shard(costs, 3)
    assert shards == shard(list(costs), 3)
    assert sorted(i for s in shards for i in s) == list(range(200))
    loads = [sum(costs[i] for i in s) for s in shards]
    assert max(loads) - min(loads) <= max(costs)
    # By cost, not by count: one large image balances several small ones.
    assert shard([4, 1, 1, 1, 1], 2) == [[0], [1, 2, 3, 4]]
    assert shard([], 2) == [[], []] and shard([5, 5], 4) == [[0], [1], [], []]


def test_one_process_without_a_launcher():
    alone = Processes()
    assert not alone.distributed and alone.broadcast("x") == "x" and alone.gather(3) == [3]
    alone.finished()
    alone.finished()
    assert alone.finished_overall() == 2
    assert process_device("auto", alone) == "auto"
    assert process_device("cpu", Processes(rank=1, world_size=2, local_rank=1)) == "cpu"


def make_folder(folder: Path, count: int = 7) -> list[Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (80, 64), (64, 64), (64, 128), (64, 64), (96, 64), (64, 64)]
    paths = []
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        path = folder / f"photo{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def torchrun(folder: Path, out: Path, *options: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "deblurdiff", str(folder), "-o", str(out), "--dev-random-weights", "--device", "cpu", "-q", *options,
    ]


def environment() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def rank_counts(err: str) -> dict[int, tuple[int, int]]:
    return {int(r): (int(w), int(f)) for r, w, f in re.findall(r"rank (\d) \(cpu\): (\d+) written, (\d+) failed", err)}


def outputs(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if not p.name.startswith("."))


@pytest.mark.slow
def test_two_processes_write_each_image_once(tmp_path):
    make_folder(tmp_path / "in")
    out = tmp_path / "out"
    done = subprocess.run(
        torchrun(tmp_path / "in", out, "--steps", "1", "--batch-size", "2"),
        capture_output=True, text=True, env=environment(), cwd=ROOT, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert outputs(out) == [f"photo{i}_UNTRAINED.png" for i in range(7)]
    assert all(is_complete(out / name) for name in outputs(out))
    for i in range(7):  # each restored by exactly one rank
        assert len(re.findall(rf"photo{i}\.png → ", done.stderr)) == 1, done.stderr[-3000:]
    counts = rank_counts(done.stderr)
    assert sorted(counts) == [0, 1] and sum(w for w, _ in counts.values()) == 7
    assert all(w >= 2 and f == 0 for w, f in counts.values())  # the work is shared
    assert "7 image(s) written" in done.stderr


@pytest.mark.slow
def test_a_killed_run_resumes_with_only_the_missing_images(tmp_path):
    make_folder(tmp_path / "in")
    out = tmp_path / "out"
    command = torchrun(tmp_path / "in", out, "--steps", "12")
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=environment(), cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while not (out.is_dir() and len(outputs(out)) >= 2):
            assert run.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no outputs appeared"
            time.sleep(0.02)
        # Killed at once, launcher and workers (as an out-of-memory kill or a power cut would).
        victims = [psutil.Process(run.pid), *psutil.Process(run.pid).children(recursive=True)]
        for process in victims:
            process.send_signal(signal.SIGKILL)
        psutil.wait_procs(victims, timeout=30)
    finally:
        run.kill()
        run.wait()
        run.stderr.close()
    first = outputs(out)
    assert 2 <= len(first) < 7, first
    assert all(is_complete(out / name) for name in first)  # written whole or not at all
    before = {name: ((out / name).stat().st_mtime_ns, (out / name).read_bytes()) for name in first}
    (tmp_path / "in" / "notes.png").write_text("not an image")

    again = subprocess.run(command, capture_output=True, text=True, env=environment(), cwd=ROOT, timeout=600)
    assert again.returncode == 1, again.stderr[-3000:]  # the bad file, reported by its rank
    assert "notes.png" in again.stderr and "1 input(s) failed" in again.stderr
    assert outputs(out) == [f"photo{i}_UNTRAINED.png" for i in range(7)]
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())  # a killed write's leftovers are gone
    assert {name: ((out / name).stat().st_mtime_ns, (out / name).read_bytes()) for name in first} == before
    assert f"{len(first)} image(s) already done by an earlier run" in again.stderr
    for name in first:  # not recomputed
        assert f"{name.replace('_UNTRAINED', '')} → " not in again.stderr
    counts = rank_counts(again.stderr)
    assert sum(w for w, _ in counts.values()) == 7 - len(first)
    assert sum(f for _, f in counts.values()) == 1
