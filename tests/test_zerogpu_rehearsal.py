"""The app on ZeroGPU, rehearsed on the CPU with the real ``spaces`` package.

tests/zerogpu_rehearsal_app.py runs in its own process (``spaces`` reads
``SPACES_ZERO_GPU`` when imported): it serves ZeroGPU's device API on loopback
(tests/zerogpu_standin.py), starts the app with the tiny random model through the real
``spaces`` start-up (CUDA emulation, placement on "cuda", the ahead-of-time compile
call, weight packing, ``/startup-report``), drives it with ``gradio_client`` and prints
what it saw. Only the forked worker's CUDA initialisation runs on the CPU, and the
compile step itself is stood in for (see the script's docstring).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "zerogpu_rehearsal_app.py"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")  # spaces keeps its clean-up records under ~/.zerogpu
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
    env.pop("SPACES_ZERO_GPU", None)
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


pytestmark = pytest.mark.slow


def test_start_up_places_the_model_on_emulated_cuda_and_compiles_ahead_of_time(report):
    startup = report["startup"]
    # Placed on "cuda" at start-up (spaces' emulation), bf16, and packed for the workers.
    assert startup["device"] == "cuda" and startup["dtype"] == "torch.bfloat16"
    assert startup["emulated_cuda_tensors"] > 0 and startup["packed_bytes"] > 0 and startup["startup_report"] == 1
    # The compile ran in a forked worker (its own /allow) and its programs came back.
    assert startup["compiled_forward"] == "CompiledNetwork" and startup["compiled_programs"] == [1, 2]
    assert startup["compiled_in"] == startup["compile_allow_pids"] != [report["main_pid"]]
    # It booked what ZeroGPU allows at start-up, no more: 1500 s, asked as 1500 / the factor.
    factor = startup["factor"]
    assert factor == 1.5  # the RTX Pro 6000 node's, read from spaces' configs.json
    assert int(startup["compile_schedule"][0]["durationSeconds"]) == 1500


def test_a_run_books_its_estimate_runs_in_a_fork_reports_each_step_and_returns(report):
    run, factor = report["run"], report["startup"]["factor"]
    assert run["ok"], run["error"]
    assert run["size"] == [96, 64] and "UNTRAINED" in run["summary"]  # the result, unpickled from the worker
    # The duration callable: the app's request times spaces' factor is what /schedule was sent.
    (schedule,) = run["schedule"]
    assert int(schedule["durationSeconds"]) == round(run["gpu_duration"] * factor)
    assert run["gpu_duration"] < int(schedule["durationSeconds"])
    # A forked worker (not the app's process) allowed itself, and the GPU was released.
    assert run["allow_pids"][-1] != report["main_pid"]
    assert [r["fail"] for r in run["release"]] == ["false"]
    # Per-step progress reached the client, in order (the last may end the job first).
    steps = [done for done, total in run["progress"] if total == 4]
    assert len(steps) >= 2 and steps == sorted(steps) and set(steps) <= {1, 2, 3, 4}


def test_cancel_stops_the_worker_within_a_step_and_releases_the_gpu(report):
    cancel = report["cancel"]
    assert cancel["reply"] == 200 and "cancelled" in cancel["error"]
    assert cancel["done_at_cancel"] >= 3 and cancel["done_at_end"] <= cancel["done_at_cancel"] + 1
    assert cancel["done_at_end"] < 40
    assert [r["fail"] for r in cancel["release"]] == ["false"]


def test_a_run_above_the_cap_is_refused_before_anything_is_booked(report):
    too_long = report["too_long"]
    assert too_long["schedule"] == []
    message = too_long["error"]
    assert "900 s one run may book" in message and "at most" in message and "resize the image to" in message
    assert "signing in" in message


def test_a_run_above_the_visitors_quota_left_is_refused_with_what_fits(report):
    quota = report["quota"]
    (schedule,) = quota["schedule"]  # ZeroGPU was asked and refused (429: quota exceeded)
    assert int(schedule["durationSeconds"]) > quota["left"]
    message = quota["error"]
    assert f"{quota['left']} s of GPU quota you have left" in message and "at most" in message and "signing in" in message


def test_several_visitors_run_at_once(report):
    assert report["concurrency_limit"] == [8]
    concurrent = report["concurrent"]
    assert concurrent["ok"] == [True, True]
    assert concurrent["order"] == ["/schedule", "/schedule", "/release", "/release"]


def test_gradio_progress_called_in_the_worker_reaches_the_client(report):
    """spaces relays Gradio's progress calls from its worker to the app's queue."""
    relay = report["spaces_progress_relay"]
    assert relay["worker_pid"] != report["main_pid"]
    steps = [done for done, total in relay["progress"] if total == 5]
    assert len(steps) >= 2 and steps == sorted(steps)
