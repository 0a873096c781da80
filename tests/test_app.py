"""The web app, served in-process and called through its API with gradio_client.

Tiny random weights ("random-tiny") and 2 sampling steps keep every call well under a
second; the app must label such results UNTRAINED.
"""

import io
import json
import multiprocessing
import os
import struct
import time
import threading
import zlib
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from PIL import Image  # noqa: E402

from deblurdiff.space import app as app_module  # noqa: E402
from deblurdiff.pipeline import estimates  # noqa: E402
from deblurdiff.space.app import DeblurApp, build_demo  # noqa: E402
from deblurdiff.pipeline.estimates import SpeedModel  # noqa: E402
from deblurdiff.pipeline.loading import MODEL_ENV  # noqa: E402
from deblurdiff.service import RestoreOptions  # noqa: E402

from conftest import serve  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def pipe(random_tiny_pipe):
    return random_tiny_pipe


@pytest.fixture(scope="module")
def demo(pipe):
    demo = build_demo(pipe, model_ref="random-tiny", measure_speed=False)
    demo.server_url = serve(demo)
    yield demo
    demo.close()


@pytest.fixture(scope="module")
def client(demo):
    return Client(demo.server_url, verbose=False)


def fits_gpu_limit(estimate: float, limit: float) -> bool:
    """Whether the GPU time booked for a run of ``estimate`` seconds is within ``limit``."""
    return estimates.gpu_booking_seconds(estimate) <= limit


def deblur(client, path, **overrides):
    kwargs = dict(steps=2, seed=3, randomize_seed=False, guidance_scale=1.0, tiling="auto", show_lkpn=False)
    kwargs.update(overrides)
    return client.predict(handle_file(str(path)), api_name="/deblur", **kwargs)


def error_of(client, path, **overrides) -> str:
    with pytest.raises(AppError) as err:
        deblur(client, path, **overrides)
    return str(err.value)


def write(tmp_path, name, image, **save):
    path = tmp_path / name
    image.save(path, **save)
    return path


def gradient(width, height, mode="RGB"):
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    rgb = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb).convert(mode)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def bilevel_png(width, height, idat=None) -> bytes:
    """A black 1-bit PNG of any declared size, a few bytes to a few kB on disk."""
    if idat is None:
        row = b"\x00" * (1 + (width + 7) // 8)
        comp = zlib.compressobj(9)
        idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


# ---------------------------------------------------------------- results


def test_result_has_input_size_and_is_labelled_untrained(client, tmp_path):
    path = write(tmp_path, "photo.png", gradient(96, 72))
    (before, after), download, lkpn, summary, seed = deblur(client, path)
    assert Image.open(after).size == (96, 72) and Image.open(before).size == (96, 72)
    assert Image.open(download).size == (96, 72)
    assert os.path.basename(download) == "photo_deblurred_UNTRAINED.png"
    assert Image.open(download).text["deblurdiff:seed"] == "3"
    assert lkpn is None
    assert seed == 3 and "seed **3**" in summary and "UNTRAINED" in summary


def test_same_seed_same_result_and_randomize_reports_the_seed(client, tmp_path):
    path = write(tmp_path, "photo.png", gradient(64, 64))
    first = np.asarray(Image.open(deblur(client, path, seed=11)[1]))
    second = np.asarray(Image.open(deblur(client, path, seed=11)[1]))
    np.testing.assert_array_equal(first, second)
    *_, summary, seed = deblur(client, path, seed=11, randomize_seed=True)
    assert 0 <= seed <= 2**32 - 1 and f"seed **{seed}**" in summary


def test_lkpn_view_guidance_prompts_and_options(client, tmp_path):
    path = write(tmp_path, "photo.png", gradient(64, 80))
    _, download, lkpn, summary, _ = deblur(
        client, path, show_lkpn=True, guidance_scale=2.5, prompt="a cat", negative_prompt="blur", color_fix=False, tiling="off"
    )
    assert Image.open(lkpn).size == (64, 80) and "UNTRAINED" in os.path.basename(lkpn)
    assert "guidance 2.5" in summary and "colour fix off" in summary


def test_results_are_files_gradio_delete_cache_removes(pipe, tmp_path):
    """The app keeps no sweep of its own: what it writes, Gradio tracks once returned and
    its ``delete_cache`` removes (here the shutdown pass, which removes every tracked file)."""
    from gradio.route_utils import delete_files_created_by_app

    demo = build_demo(pipe, model_ref="random-tiny", measure_speed=False, examples_dir=None)
    try:
        demo.server_url = serve(demo)
        path = write(tmp_path, "cleanup_probe.png", gradient(64, 64))
        deblur(Client(demo.server_url, verbose=False), path, show_lkpn=True)
        written = sorted(Path(gr.utils.get_upload_folder()).glob("deblurdiff-*/cleanup_probe_*.png"))
        assert {p.name for p in written} == {"cleanup_probe_input.png", "cleanup_probe_deblurred_UNTRAINED.png", "cleanup_probe_lkpn_UNTRAINED.png"}
        tracked = set().union(*demo.temp_file_sets)
        assert {str(p) for p in written} <= tracked
        delete_files_created_by_app(demo, age=None)
        assert not any(p.exists() for p in written)
    finally:
        demo.close()


def test_api_description_and_banner_say_untrained(client):
    info = client.view_api(return_format="dict", print_info=False)
    endpoint = info["named_endpoints"]["/deblur"]
    assert "UNTRAINED" in endpoint.get("description", "")
    assert [p["parameter_name"] for p in endpoint["parameters"]][:3] == ["image", "steps", "seed"]
    banner = [c for c in client.config["components"] if c.get("props", {}).get("elem_id") == "model-status"]
    assert "UNTRAINED" in banner[0]["props"]["value"]


# ---------------------------------------------------------------- inputs that work after conversion


def test_animated_gif_uses_first_frame(client, tmp_path):
    frames = [Image.new("RGB", (70, 64), c) for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    (before, after), *_, summary, _ = deblur(client, path)
    assert Image.open(after).size == (70, 64)
    assert "first frame" in summary
    r, g, b = Image.open(before).convert("RGB").getpixel((10, 10))
    assert r > g and r > b


@pytest.mark.parametrize(
    "name, make, note",
    [
        ("rgba.png", lambda: Image.merge("RGBA", (*gradient(64, 64).split(), Image.new("L", (64, 64), 100))), "white"),
        ("grey.png", lambda: gradient(80, 64, "L"), "Greyscale"),
        ("deep.png", lambda: Image.fromarray((np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)), "16-bit"),
        ("print.jpg", lambda: gradient(64, 72).convert("CMYK"), "CMYK"),
    ],
)
def test_unusual_modes_work(client, tmp_path, name, make, note):
    image = make()
    path = write(tmp_path, name, image)
    _, download, _, summary, _ = deblur(client, path)
    assert Image.open(download).size == image.size and Image.open(download).mode == "RGB"
    assert note in summary


def test_exif_rotation_is_applied(client, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    path = write(tmp_path, "camera.jpg", gradient(96, 64), exif=exif.tobytes())
    _, download, *_ = deblur(client, path)
    assert Image.open(download).size == (64, 96)


def test_tiny_image_is_upscaled_with_a_note(client, tmp_path):
    path = write(tmp_path, "tiny.png", gradient(20, 10))
    _, download, _, summary, _ = deblur(client, path)
    assert Image.open(download).size == (128, 64)
    assert "upscaled" in summary


# ---------------------------------------------------------------- bad inputs: a message, and the app keeps serving


def bad_file(tmp_path, kind):
    path = tmp_path / {"text": "notes.png", "corrupt": "broken.png", "empty": "empty.jpg", "huge": "huge.png", "bomb": "bomb.png"}[kind]
    if kind == "text":
        path.write_text("this is not an image, just some words\n" * 5)
    elif kind == "corrupt":
        buf = io.BytesIO()
        gradient(64, 64).save(buf, "PNG")
        data = bytearray(buf.getvalue())
        data[60:] = b"\x00" * (len(data) - 60)
        path.write_bytes(bytes(data))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "huge":
        path.write_bytes(bilevel_png(6000, 6000))  # 36 megapixels, a few kB
    elif kind == "bomb":
        path.write_bytes(bilevel_png(100_000, 100_000, idat=zlib.compress(b"\x00" * 100)))
    return path


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("text", ["notes.png", "not an image", "PNG, JPEG"]),
        ("corrupt", ["broken.png", "damaged"]),
        ("empty", ["empty.jpg", "empty (0 bytes)"]),
        ("huge", ["6000×6000", "16,777,216 pixels", "downscale"]),
        ("bomb", ["bomb.png", "decompression bomb"]),
    ],
)
def test_bad_files_get_their_message(client, tmp_path, kind, expected):
    message = error_of(client, bad_file(tmp_path, kind))
    for part in expected:
        assert part in message
    assert "Traceback" not in message


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (dict(steps=0), "steps must be between 1 and 100; got 0"),
        (dict(steps=101), "steps must be between 1 and 100; got 101"),
        (dict(steps=2.5), "whole number"),
        (dict(seed=-7), "seed must be"),
        (dict(seed=2**32), "seed must be"),
        (dict(guidance_scale=0.5), "guidance scale must be between 1 and 10; got 0.5"),
        (dict(guidance_scale=10.5), "guidance scale must be between 1 and 10; got 10.5"),
        (dict(tiling="sometimes"), "Tiling must be one of auto, on, off"),
        (dict(sampler="euler-magic"), "sampler must be one of"),
        (dict(prompt="x" * 5000), "prompt is too long"),
        (dict(color_fix="maybe"), "Colour fix must be true or false"),
    ],
)
def test_bad_parameters_get_their_message(client, tmp_path, overrides, expected):
    path = write(tmp_path, "photo.png", gradient(64, 64))
    assert expected in error_of(client, path, **overrides)


def test_still_serving_after_errors(client, tmp_path):
    for kind in ("text", "bomb", "empty"):
        error_of(client, bad_file(tmp_path, kind))
    error_of(client, write(tmp_path, "p.png", gradient(64, 64)), steps=1000)
    _, download, *_ = deblur(client, write(tmp_path, "ok.png", gradient(64, 64)))
    assert Image.open(download).size == (64, 64)


def test_unexpected_errors_are_logged_not_shown(client, tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("internal detail /secret/path")

    monkeypatch.setattr(app_module, "restore", broken)
    message = error_of(client, write(tmp_path, "p.png", gradient(64, 64)))
    assert "Something went wrong" in message and "RuntimeError" in message
    assert "secret" not in message and "Traceback" not in message
    assert "internal detail" in caplog.text
    monkeypatch.undo()
    deblur(client, write(tmp_path, "ok.png", gradient(64, 64)))


# ---------------------------------------------------------------- without weights


def test_without_weights_the_app_starts_says_what_is_missing_and_refuses_to_run(tmp_path, monkeypatch):
    monkeypatch.delenv(MODEL_ENV, raising=False)
    pipe, error, reference = app_module.load_app_model(None)
    assert pipe is None and reference is None and MODEL_ENV in error
    demo = build_demo(None, model_error=error)
    url = serve(demo)
    try:
        client = Client(url, verbose=False)
        banner = [c for c in client.config["components"] if c.get("props", {}).get("elem_id") == "model-status"][0]
        text = banner["props"]["value"]
        assert "No model weights are loaded" in text and MODEL_ENV in text and "--model" in text
        assert "--dev-random-weights" in text
        message = error_of(client, write(tmp_path, "photo.png", gradient(64, 64)))
        assert "No DeblurDiff weights are configured" in message and MODEL_ENV in message
    finally:
        demo.close()


def test_unreachable_weights_are_reported(tmp_path):
    pipe, error, reference = app_module.load_app_model(str(tmp_path / "missing-folder"))
    assert pipe is None and "Model folder not found" in error and reference.endswith("missing-folder")
    app = DeblurApp(None, model_error=error, model_ref=reference, examples_dir=None)
    assert "Model folder not found" in app_module.banner_text(app)


def test_model_choice_order(monkeypatch):
    monkeypatch.setattr(app_module, "DEFAULT_SPACE_MODEL", "owner/space-default")
    monkeypatch.delenv(MODEL_ENV, raising=False)
    assert app_module.resolve_model(None) == "owner/space-default"
    monkeypatch.setenv(MODEL_ENV, "owner/from-env")
    assert app_module.resolve_model(None) == "owner/from-env"
    assert app_module.resolve_model("weights/folder") == "weights/folder"


# ---------------------------------------------------------------- progress, cancel, estimates


class FakeRequest:
    session_hash = "session-under-test"


class RecordingProgress:
    def __init__(self):
        self.calls = []
        self.first_step = threading.Event()

    def __call__(self, value, desc=None, total=None, unit="steps"):
        self.calls.append(value)
        if isinstance(value, tuple):
            self.first_step.set()


def test_progress_reports_each_step(pipe, tmp_path):
    app = DeblurApp(pipe, model_ref="random-tiny", examples_dir=None, measure_speed=False)
    progress = RecordingProgress()
    path = write(tmp_path, "p.png", gradient(64, 64))
    app.deblur(str(path), steps=3, seed=1, randomize_seed=False, request=FakeRequest(), progress=progress)
    steps = [c for c in progress.calls if isinstance(c, tuple)]
    assert steps[-1] == (3, 3) and steps == sorted(set(steps))  # each shown once, in order, ending at the last


def test_cancel_interrupts_the_pipeline(pipe, tmp_path):
    app = DeblurApp(pipe, model_ref="random-tiny", examples_dir=None, measure_speed=False)
    progress = RecordingProgress()
    path = write(tmp_path, "p.png", gradient(64, 64))
    outcome = {}

    def run():
        try:
            outcome["result"] = app.deblur(str(path), steps=100, seed=1, randomize_seed=False, request=FakeRequest(), progress=progress)
        except gr.Error as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    assert progress.first_step.wait(30)
    assert app.cancel(FakeRequest()) == "Cancelled."
    thread.join(30)
    assert "cancelled" in str(outcome.get("error", "")).lower()
    steps = [c for c in progress.calls if isinstance(c, tuple)]
    assert len(steps) < 100
    # The next run of the same session is not affected.
    result = app.deblur(str(path), steps=2, seed=1, randomize_seed=False, request=FakeRequest(), progress=RecordingProgress())
    assert Image.open(result[1]).size == (64, 64)
    assert app.free_slots.qsize() == app_module.RUN_SLOTS  # every run gave its cancel flag back


def test_a_run_ending_leaves_cancel_to_a_newer_run_of_the_same_session(pipe, tmp_path, monkeypatch):
    app = DeblurApp(pipe, model_ref="random-tiny", examples_dir=None, measure_speed=False)
    run_on_device = app_module.run_on_device
    newer = []

    def with_a_second_run(app_key, image, options, slot, progress):
        newer.append(app.free_slots.get_nowait())  # the same tab starts another run meanwhile
        app.active_runs[FakeRequest.session_hash] = newer[0]
        return run_on_device(app_key, image, options, slot, progress)

    monkeypatch.setattr(app_module, "run_on_device", with_a_second_run)
    path = write(tmp_path, "p.png", gradient(64, 64))
    app.deblur(str(path), steps=1, request=FakeRequest(), progress=RecordingProgress())
    assert app.active_runs[FakeRequest.session_hash] == newer[0]  # Cancel still reaches the newer run
    app.cancel(FakeRequest())
    assert app.cancelled[newer[0]]


def test_a_run_without_a_free_cancel_flag_is_turned_away(pipe, tmp_path):
    app = DeblurApp(pipe, model_ref="random-tiny", examples_dir=None, measure_speed=False)
    taken = [app.free_slots.get_nowait() for _ in range(app_module.RUN_SLOTS)]  # as if 64 runs were going on
    path = write(tmp_path, "p.png", gradient(64, 64))
    with pytest.raises(gr.Error, match="as many images as it can"):
        app.deblur(str(path), steps=1, request=FakeRequest(), progress=RecordingProgress())
    app.free_slots.put(taken[0])  # one run ends: its flag goes to the next run, reset
    app.cancelled[taken[0]] = True
    result = app.deblur(str(path), steps=1, request=FakeRequest(), progress=RecordingProgress())
    assert Image.open(result[1]).size == (64, 64)


def test_time_estimate_is_measured_and_shown(pipe, tmp_path):
    app = DeblurApp(pipe, model_ref="random-tiny", examples_dir=None, measure_speed=True)
    assert app.speed_ready.wait(60)
    assert app.speed.measured and app.speed.device == "cpu"
    path = write(tmp_path, "p.png", gradient(200, 100))
    text = app.describe_input(str(path), 50, 1.0, "auto")
    assert "200×100" in text and "Estimated time" in text and "estimate" in text and "50 steps" in text
    bad = app.describe_input(str(bad_file(tmp_path, "text")), 50, 1.0, "auto")
    assert "not an image" in bad and "Estimated" not in bad
    # A change of settings gives the image's description with the new estimate.
    updated = app.describe_input(str(path), 10, 1.0, "auto")
    assert updated.count("Estimated time") == 1 and "10 steps" in updated and "200×100" in updated


def test_speed_model_and_gpu_duration():
    speed = SpeedModel.default("cpu")
    small = speed.seconds(512, 512, 10)
    assert speed.seconds(512, 512, 50) > small and speed.seconds(1024, 1024, 10) > 3 * small
    assert speed.seconds(512, 512, 10, guidance_scale=2.0) > small
    assert estimates.processed_megapixels(2048, 2048, True) > estimates.processed_megapixels(2048, 2048, False)
    key = id(DeblurApp(None, examples_dir=None, measure_speed=False))  # no model: the GPU's default speed
    small_request = app_module._gpu_duration(key, gradient(512, 512), RestoreOptions(steps=10), 0)
    big_request = app_module._gpu_duration(key, gradient(2048, 2048), RestoreOptions(steps=100, guidance_scale=5.0), 0)
    # Off ZeroGPU spaces' factor is 1 (H200): the request is the booking itself.
    assert estimates.MIN_GPU_SECONDS <= small_request < big_request
    assert big_request == estimates.gpu_booking_seconds(SpeedModel.default("cuda").seconds(2048, 2048, 100, 5.0))


def test_gpu_limit_advice_says_what_fits():
    speed = SpeedModel.default("cuda")
    limit = 300
    assert estimates.gpu_limit_advice(speed, 512, 512, 50, limit=limit) is None
    advice = estimates.gpu_limit_advice(speed, 4096, 4096, 50, limit=limit)
    assert "300 s one run may book" in advice
    most = int(advice.split("at most ")[1].split(" step")[0])
    assert 1 <= most < 50
    assert fits_gpu_limit(speed.seconds(4096, 4096, most), limit)
    assert not fits_gpu_limit(speed.seconds(4096, 4096, most + 1), limit)
    w, h = (int(v) for v in advice.split("resize the image to ")[1].split(" pixels")[0].split("×"))
    assert w == h and fits_gpu_limit(speed.seconds(w, h, 50), limit) and w < 4096
    # Where not even one step fits, only the resize is offered.
    slow = SpeedModel(step_s_per_mpx=100.0, fixed_s_per_mpx=1.0, device="cuda")
    only_resize = estimates.gpu_limit_advice(slow, 4096, 2048, 10, limit=limit)
    assert "at most" not in only_resize and "To run 10 steps, resize the image to" in only_resize


def test_on_zero_gpu_a_run_that_cannot_fit_is_refused_before_it_starts(pipe, tmp_path, monkeypatch):
    app = DeblurApp(pipe, model_ref="random-tiny", examples_dir=None, measure_speed=False)
    monkeypatch.setattr(app_module, "on_zero_gpu", lambda: True)
    monkeypatch.setattr(app, "_gpu_speed", lambda: SpeedModel(step_s_per_mpx=400.0, fixed_s_per_mpx=1.0, device="cuda"))
    monkeypatch.setenv(estimates.GPU_CAP_ENV, "300")
    started = []
    monkeypatch.setattr(app_module, "restore", lambda *a, **k: started.append(1))
    path = write(tmp_path, "p.png", gradient(256, 256))
    with pytest.raises(gr.Error) as err:
        app.deblur(str(path), steps=50, seed=1, randomize_seed=False, request=FakeRequest(), progress=RecordingProgress())
    assert "at most" in err.value.message and "300 s one run may book" in err.value.message and not started
    assert "signing in" in err.value.message
    text = app.describe_input(str(path), 50, 1.0, "auto")
    assert "Estimated GPU time" in text and "at most" in text


def test_on_zero_gpu_start_up_sets_the_memory_budget_and_survives_a_failed_compilation(monkeypatch, caplog):
    """The real start-up path on the CPU: the weights load, the tiling decision gets a budget
    without asking a GPU, and a compilation that fails leaves working eager networks."""
    monkeypatch.setattr(app_module, "on_zero_gpu", lambda: True)
    monkeypatch.setenv(app_module.AOTI_ENV, "1")  # compile even untrained weights

    def no_gpu(pipe):
        raise RuntimeError("no GPU to compile on")

    monkeypatch.setattr(app_module, "compile_for_zerogpu", no_gpu)
    with caplog.at_level("ERROR", logger=app_module.logger.name):
        pipe, error, _ = app_module.load_app_model(dev_random_weights=True, device="cpu", dtype="fp32")
    assert error is None and "ahead-of-time compilation failed" in caplog.text
    weights = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    assert 0 < pipe.memory_budget < app_module.ZERO_GPU_MEMORY_BYTES - weights
    assert pipe.should_tile(1024, 1024) is False
    pipe.set_progress_bar_config(disable=True)
    out = pipe(gradient(64, 64), num_inference_steps=1, output_type="pt").images
    assert out.shape == (1, 3, 64, 64) and bool(out.isfinite().all())


def test_empty_negative_prompt_is_kept(pipe, tmp_path, monkeypatch):
    app = DeblurApp(pipe, model_ref="random-tiny", examples_dir=None, measure_speed=False)
    seen = []
    real = app_module.restore
    monkeypatch.setattr(app_module, "restore", lambda p, image, options, **kw: seen.append(options) or real(p, image, options, **kw))
    path = write(tmp_path, "p.png", gradient(64, 64))
    app.deblur(str(path), steps=1, seed=1, randomize_seed=False, guidance_scale=2.0, negative_prompt="", request=FakeRequest(), progress=RecordingProgress())
    assert seen[0].negative_prompt == "" and seen[0].pipeline_kwargs()["negative_prompt"] == ""


# ---------------------------------------------------------------- the GPU function in a forked worker, as on ZeroGPU


def _slow_steps(pipe, seconds):
    """Make each denoising step of ``pipe`` take at least ``seconds`` (wraps the UNet)."""
    unet_forward = pipe.unet.forward

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return unet_forward(*args, **kwargs)

    pipe.unet.forward = slow
    return lambda: setattr(pipe.unet, "forward", unet_forward)


@pytest.mark.slow
def test_cancel_reaches_a_forked_worker_within_a_step(tmp_path):
    """``run_on_device`` in a forked process, as ZeroGPU's worker runs it: the flag the app
    sets stops it after the current step (its steps come back through shared memory here)."""
    pipe = app_module.load_pipeline("random-tiny", device="cpu")
    app = DeblurApp(pipe, model_ref="random-tiny", examples_dir=None, measure_speed=False)
    ctx = multiprocessing.get_context("fork")
    steps = ctx.RawArray("i", 2)  # done, total as the worker's progress reports them
    receiver, sender = ctx.Pipe(duplex=False)
    slot = app.free_slots.get_nowait()
    app.cancelled[slot] = False
    app.active_runs[FakeRequest.session_hash] = slot  # what Cancel looks up, as during a run

    def progress(value, **kwargs):
        steps[0], steps[1] = value

    def worker():
        result = app_module.run_on_device(id(app), gradient(64, 64), RestoreOptions(steps=60), slot, progress)
        sender.send(result.interrupted)

    undo = _slow_steps(pipe, 0.2)
    try:
        process = ctx.Process(target=worker, daemon=True)
        process.start()
    finally:
        undo()
    deadline = time.monotonic() + 60
    while steps[0] < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    done_at_cancel = steps[0]
    assert done_at_cancel >= 3, "the worker's steps were not seen by the parent"
    assert app.cancel(FakeRequest()) == "Cancelled."
    assert receiver.poll(30), "the worker did not stop"
    interrupted = receiver.recv()
    process.join(10)
    assert interrupted and steps[1] == 60
    assert steps[0] <= done_at_cancel + 1  # the step under way when Cancel came, and no more


# ---------------------------------------------------------------- examples


def _gallery(demo):
    return [b for b in demo.blocks.values() if isinstance(b, gr.Dataset)]


def test_examples_gallery_lists_the_examples_folder(demo):
    folder = demo.deblurdiff_app.examples_dir
    listed = json.loads((folder / "examples.json").read_text())
    gallery = _gallery(demo)[0]
    shown = [os.path.basename(sample[0]["path"] if isinstance(sample[0], dict) else sample[0]) for sample in gallery.samples]
    assert sorted(shown) == sorted(entry["file"] for entry in listed)
    assert all(entry["title"] in gallery.label for entry in listed)


def test_examples_are_cached_lazily_only_for_trained_weights(pipe, monkeypatch):
    untrained = build_demo(pipe, model_ref="random-tiny", measure_speed=False)
    # Cached examples serve their outputs through gradio's ``load_example_output`` event.
    untrained_events = {fn.name for fn in untrained.fns.values()}
    assert "load_example" in untrained_events and "load_example_output" not in untrained_events
    assert "computed once" not in _gallery(untrained)[0].label

    monkeypatch.setattr(pipe, "untrained", False, raising=False)
    cached = []
    real_examples = gr.Examples

    def recording_examples(*args, **kwargs):
        cached.append((kwargs.get("cache_examples"), kwargs.get("cache_mode")))
        return real_examples(*args, **kwargs)

    monkeypatch.setattr(gr, "Examples", recording_examples)
    trained = build_demo(pipe, model_ref="owner/weights", measure_speed=False)
    assert cached == [(True, "lazy")] and "computed once" in _gallery(trained)[0].label
    assert "load_example_output" in {fn.name for fn in trained.fns.values()}
