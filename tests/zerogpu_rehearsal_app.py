"""The app on "ZeroGPU", on the CPU: run as a script (``python tests/zerogpu_rehearsal_app.py``)
by tests/test_zerogpu_rehearsal.py; it prints one JSON report as its last line.

Everything is the real code path of ``spaces`` 0.51.3, Gradio and the app, with:

- ``SPACES_ZERO_GPU=true`` and the device API served by :mod:`zerogpu_standin` on loopback;
- the node's GPU read as an RTX Pro 6000 (``spaces.zero.config._read_gpu_information``),
  so that ``spaces`` applies that node's ``duration_factor``;
- in the forked worker only, ``spaces``' CUDA initialisation (``spaces.zero.torch.init``
  and ``.move``: the weights' copy to the GPU) run with "cuda" meaning the CPU; the task
  itself then runs on the CPU copies of the weights;
- on a CPU-only torch build, ``torch.version.cuda`` and ``torch._C._cuda_init`` (which
  raises, as it does without a GPU) defined and ``torch.cuda._is_in_bad_fork`` picklable, since ``spaces`` reads them at import;
- the start-up ahead-of-time step (``deblurdiff.space.aoti.export_networks`` and
  ``spaces.aoti_compile``) replaced by stand-ins that keep the networks eager
  (Inductor needs a GPU; exporting takes a minute here and is tested in test_aoti.py);
- each denoising step slowed down to ``STEP_SECONDS`` so that Cancel can arrive mid-run.
"""

from __future__ import annotations

import base64
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from zerogpu_standin import StandIn, wait_for  # noqa: E402  (stdlib only)

STEP_SECONDS = 0.25
CAP_SECONDS = 900  # the app's configurable cap on one run's booked GPU time
QUOTA_LEFT = 100  # what the visitor of the quota check has left today
RTX_PRO = "NVIDIA RTX PRO 6000 Blackwell Server Edition"

LIFETIME = float(os.environ.get("REHEARSAL_LIFETIME", "240"))


def finish(code: int) -> None:
    """End now, with spaces' forked workers (they would outlive this process and keep
    its output pipes open)."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.kill()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _on_error(kind, value, tb):
    sys.__excepthook__(kind, value, tb)
    finish(1)


sys.excepthook = _on_error
_watchdog = threading.Timer(LIFETIME, finish, (3,))
_watchdog.daemon = True
_watchdog.start()
standin = StandIn(lifetime=LIFETIME).start()
scratch = Path(tempfile.mkdtemp(prefix="zerogpu-rehearsal-"))
os.environ.update(
    SPACES_ZERO_GPU="true",
    SPACES_ZERO_DEVICE_API_URL=standin.url,
    ZEROGPU_OFFLOAD_DIR=str(scratch / "tensors"),
    DEBLURDIFF_AOTI="1",  # the start-up compile, with the development weights too
    DEBLURDIFF_ZEROGPU_MAX_SECONDS=str(CAP_SECONDS),
    GRADIO_ANALYTICS_ENABLED="False",
)

import torch  # noqa: E402

if torch.version.cuda is None:  # a CPU-only build: what spaces' CUDA emulation reads at import
    torch.version.cuda = "12.8"

    def _no_cuda():
        raise AssertionError("Torch not compiled with CUDA enabled")

    def _is_in_bad_fork():  # a named function: spaces sends it to a forked process
        return False

    torch._C._cuda_init = _no_cuda
    torch.cuda._is_in_bad_fork = _is_in_bad_fork

import spaces  # noqa: E402  (before anything initialises CUDA, as on a Space)
import spaces.zero.config as zero_config  # noqa: E402
import spaces.zero.torch as zero_torch  # noqa: E402
from spaces.zero.torch import patching  # noqa: E402
from spaces.zero.torch.utils import empty_like_raw_alloc  # noqa: E402

zero_config._read_gpu_information = lambda: f"Model: {RTX_PRO}\n"
zero_config.get_config.cache_clear()


class _CudaIsCpu:
    """While active, "cuda" means the CPU for the calls ``spaces``' worker start-up makes."""

    def __enter__(self):
        self.saved = (torch.Tensor.cuda, torch.Tensor.pin_memory, torch.cuda.synchronize, torch.tensor, torch.empty)
        tensor, empty = torch.tensor, torch.empty

        def on_cpu(factory):
            def make(*args, device=None, **kwargs):
                return factory(*args, device="cpu" if device is not None and torch.device(device).type == "cuda" else device, **kwargs)

            return make

        torch.Tensor.cuda = lambda self, *a, **k: self.clone()
        # Pinned memory is page-aligned (spaces reads its packed weights with O_DIRECT into it).
        torch.Tensor.pin_memory = lambda self, *a, **k: empty_like_raw_alloc(self).copy_(self)
        torch.cuda.synchronize = lambda *a, **k: None
        torch.tensor, torch.empty = on_cpu(tensor), on_cpu(empty)
        return self

    def __exit__(self, *exc):
        torch.Tensor.cuda, torch.Tensor.pin_memory, torch.cuda.synchronize, torch.tensor, torch.empty = self.saved


_init, _move = zero_torch.init, zero_torch.move


def _init_on_cpu(nvidia_uuid):
    with _CudaIsCpu():
        _init(nvidia_uuid)


def _move_on_cpu(callback=None):
    with _CudaIsCpu():
        _move(callback=callback)


zero_torch.init, zero_torch.move = _init_on_cpu, _move_on_cpu


# The start-up compile, stood in for -------------------------------------------------------
from deblurdiff.space import aoti  # noqa: E402



class EagerProgram:
    """Stands in for ``spaces.aoti_compile``'s result: runs the network eagerly with its
    own copy of the weights, made in the worker and pickled back to the app's process
    (as the real result is; ``spaces.aoti_apply`` then empties the module's own)."""

    def __init__(self, name, module):
        self.name = name
        self.weights = {key: value.detach().clone() for key, value in module.state_dict().items()}
        self.made_in = os.getpid()

    def __call__(self, *args):
        network = getattr(PIPE, self.name)
        compiled = network.__dict__.pop("forward")  # the network's own forward, for this call
        try:
            with torch.no_grad():
                return torch.func.functional_call(aoti._modules(PIPE)[self.name], self.weights, args)
        finally:
            network.forward = compiled


def _export_networks(pipe, batch_sizes=aoti.BATCH_SIZES, max_side=aoti.MAX_LATENT_SIDE):
    modules = aoti._modules(pipe)
    return {(name, batch): (name, modules[name]) for batch in batch_sizes for name in aoti.NETWORKS}


def _aoti_compile(program):
    return EagerProgram(*program)


aoti.export_networks = _export_networks
spaces.aoti_compile = _aoti_compile

# The app ------------------------------------------------------------------------------------
import gradio as gr  # noqa: E402
import httpx  # noqa: E402
import numpy as np  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from PIL import Image  # noqa: E402

from deblurdiff.space import app as app_module  # noqa: E402

from deblurdiff.space import zerogpu  # noqa: E402

report: dict = {"url": standin.url, "main_pid": os.getpid()}
t0 = time.monotonic()
pipe, error, reference = app_module.load_app_model(dev_random_weights=True)
assert error is None, error
PIPE = pipe
compiled = pipe.unet.forward
report["startup"] = {
    "factor": zerogpu.duration_factor(),
    "compiled_programs": sorted(compiled.programs) if hasattr(compiled, "programs") else None,
    "compiled_in": sorted({p.made_in for p in getattr(compiled, "programs", {}).values()}),
    "device": pipe.device.type,
    "dtype": str(pipe.unet.dtype),
    "emulated_cuda_tensors": len(patching.cuda_aliases),
    "compiled_forward": type(pipe.unet.forward).__name__,
    "compile_schedule": standin.named("/schedule")[:1],
    "compile_allow_pids": [int(q["pid"]) for q in standin.named("/allow")][:1],
    "load_seconds": round(time.monotonic() - t0, 1),
}
# Slow steps, so that Cancel comes mid-run; counted in shared memory, made before the run's
# worker is forked, so that the steps the worker ran are seen here.
unet_steps = multiprocessing.RawValue("i", 0)
unet_forward = pipe.unet.forward


def slow_step(*args, **kwargs):
    time.sleep(STEP_SECONDS)
    unet_steps.value += 1
    return unet_forward(*args, **kwargs)


pipe.unet.forward = slow_step


@spaces.GPU(duration=10)
def progress_probe(steps, progress=gr.Progress()):
    """Reports its steps with Gradio's own progress, from the forked worker."""
    for i in range(int(steps)):
        time.sleep(STEP_SECONDS)
        progress((i + 1, int(steps)), desc="probe", unit="steps")
    return os.getpid()


with gr.Blocks() as probe_demo:
    probe_in, probe_out = gr.Number(), gr.Number()
    gr.Button().click(progress_probe, probe_in, probe_out, api_name="probe")

demo = app_module.build_demo(pipe, model_error=error, model_ref=reference, examples_dir=None)
app = demo.deblurdiff_app
from conftest import free_port  # noqa: E402

port = free_port()
app_module.launch(demo, prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
url = f"http://127.0.0.1:{port}/"
report["startup"]["startup_report"] = len(standin.named("/startup-report"))
report["startup"]["packed_bytes"] = sum(p.total_size for p in patching.tensor_packs)
report["concurrency_limit"] = [
    fn.concurrency_limit for fn in demo.fns.values() if getattr(fn, "api_name", None) == "deblur"
]

image_path = scratch / "blurry.png"
Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(image_path)
client = Client(url, verbose=False)


def deblur_args(steps, guidance=1.0, path=image_path):
    return dict(
        image=handle_file(str(path)), steps=steps, seed=1, randomize_seed=False, guidance_scale=guidance,
        prompt="", negative_prompt="", color_fix=True, tiling="auto", show_lkpn=False, sampler="ddpm",
    )


def watch(job, timeout=120):
    """Progress updates (index, length) seen by the client until the job ends."""
    seen = []
    deadline = time.monotonic() + timeout
    while not job.done() and time.monotonic() < deadline:
        for unit in job.status().progress_data or []:
            if unit.index is not None and (not seen or seen[-1] != (unit.index, unit.length)):
                seen.append((unit.index, unit.length))
        time.sleep(0.02)
    return seen


def outcome(job):
    try:
        return {"ok": True, "value": job.result(timeout=5)}
    except Exception as exc:  # gradio_client raises AppError with the message
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


# 1. A run: its duration, the fork, per-step progress, the result back through pickling.
schedules_before, releases_before = len(standin.named("/schedule")), len(standin.named("/release"))
job = client.submit(**deblur_args(4), api_name="/deblur")
progress_seen = watch(job)
result = outcome(job)
run = {"progress": progress_seen, "ok": result["ok"], "error": result.get("error")}
if result["ok"]:
    (before, after), download, lkpn, summary, seed = result["value"]
    run.update(size=Image.open(after).size, summary=summary, seed=seed)
run["schedule"] = standin.named("/schedule")[schedules_before:]
run["allow_pids"] = [int(q["pid"]) for q in standin.named("/allow")]
run["release"] = standin.named("/release")[releases_before:]


def in_thread(fn, *args):
    """Call ``fn`` in a new thread, as Gradio calls handlers (spaces' CUDA emulation is
    active in the main thread only, where the packed weights cannot be read)."""
    out = []
    thread = threading.Thread(target=lambda: out.append(fn(*args)))
    thread.start()
    thread.join()
    return out[0]


options = app_module.service.make_options(steps=4, seed=1)
run["gpu_duration"] = in_thread(app_module._gpu_duration, id(app), Image.open(image_path).convert("RGB"), options, 0)
report["run"] = run

# 2. Cancel: the Cancel button's handler, as the page calls it (same session), mid-run.
cancel_index = next(i for i, fn in demo.fns.items() if getattr(fn.fn, "__func__", None) is type(app).cancel)
releases_before = len(standin.named("/release"))
unet_steps.value = 0
job = client.submit(**deblur_args(40), api_name="/deblur")


def client_saw_steps(n):
    """True once the client has seen step ``n`` in Gradio's progress, relayed from the worker."""
    return any(unit.index is not None and unit.index >= n for unit in job.status().progress_data or [])


wait_for(lambda: client_saw_steps(3), 60)
done_at_cancel = unet_steps.value
reply = httpx.post(
    f"{url}gradio_api/run/predict", json={"fn_index": cancel_index, "data": [], "session_hash": client.session_hash}, timeout=30
)
cancelled_at = time.monotonic()
wait_for(job.done, 60)
stopped_after = time.monotonic() - cancelled_at
job_result = outcome(job)
report["cancel"] = {
    "reply": reply.status_code,
    "done_at_cancel": done_at_cancel,
    "done_at_end": unet_steps.value,
    "stopped_after_s": round(stopped_after, 2),
    "error": job_result.get("error"),
    "release": standin.named("/release")[releases_before:],
    "step_seconds": STEP_SECONDS,
}

# 3. Too long: refused by the app before anything is booked.
schedules_before = len(standin.named("/schedule"))
big = scratch / "big.png"
Image.fromarray(np.zeros((4096, 4096, 3), dtype=np.uint8)).save(big)
job = client.submit(**deblur_args(100, guidance=5.0, path=big), api_name="/deblur")
wait_for(job.done, 120)
report["too_long"] = {"error": outcome(job).get("error"), "schedule": standin.named("/schedule")[schedules_before:]}

# 4. Two visitors at once: both hold a GPU slot at the same time.
first_call = len(standin.calls)
jobs = [Client(url, verbose=False).submit(**deblur_args(4), api_name="/deblur") for _ in range(2)]
wait_for(lambda: all(j.done() for j in jobs), 120)
order = [path for path, _ in standin.calls[first_call:] if path in ("/schedule", "/release")]
report["concurrent"] = {"order": order, "ok": [outcome(j)["ok"] for j in jobs]}

# 5. ZeroGPU's own refusal: more booked than the visitor has left today.
standin.quota_left = QUOTA_LEFT
payload = base64.urlsafe_b64encode(json.dumps({"user": "visitor"}).encode()).decode().rstrip("=")
visitor = Client(url, verbose=False, headers={"X-IP-Token": f"x.{payload}.y"})
large = scratch / "large.png"
Image.fromarray(np.zeros((2048, 2048, 3), dtype=np.uint8)).save(large)
schedules_before = len(standin.named("/schedule"))
job = visitor.submit(**deblur_args(50, path=large), api_name="/deblur")
wait_for(job.done, 120)
report["quota"] = {"error": outcome(job).get("error"), "schedule": standin.named("/schedule")[schedules_before:], "left": QUOTA_LEFT}
# 6. Does Gradio's progress, called in spaces' worker, reach the client (spaces' own relay)?
probe_port = free_port()
probe_demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=probe_port, quiet=True)
job = Client(f"http://127.0.0.1:{probe_port}/", verbose=False).submit(5, api_name="/probe")
report["spaces_progress_relay"] = {"progress": watch(job), "worker_pid": outcome(job).get("value")}

report["seconds"] = round(time.monotonic() - t0, 1)
standin.stop()
print(json.dumps(report, default=str))
finish(0)  # the Gradio server threads end with the process
