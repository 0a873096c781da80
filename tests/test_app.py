"""The web app, served in-process and called through its API with gradio_client.

Tiny random weights ("random-tiny") and 2 sampling steps keep every call well under a
second; the app must label such results UNTRAINED.
"""

import io
import os
import socket
import struct
import threading
import zlib

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from PIL import Image  # noqa: E402

from deblurdiff import app as app_module  # noqa: E402
from deblurdiff.app import DeblurApp, SpeedModel, build_demo, launch, tile_megapixels  # noqa: E402
from deblurdiff.loading import MODEL_ENV, load_pipeline  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(demo):
    port = free_port()
    launch(demo, prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    return f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Server, client and model share this process: torch's worker threads would spin
    against the server's threads (calls take seconds instead of a fraction of one)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("random-tiny", device="cpu")


@pytest.fixture(scope="module")
def demo(pipe):
    demo = build_demo(pipe, model_ref="random-tiny", measure_speed=False)
    demo.server_url = serve(demo)
    yield demo
    demo.close()


@pytest.fixture(scope="module")
def client(demo):
    return Client(demo.server_url, verbose=False)


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
        ("text", ["notes.png", "not an image", "text file"]),
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

    monkeypatch.setattr(app_module, "deblur", broken)
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
    assert "Model folder not found" in app.banner()


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
    app.deblur(str(path), 3, 1, False, 1.0, "", None, True, "auto", False, "ddpm", FakeRequest(), progress)
    assert [c for c in progress.calls if isinstance(c, tuple)] == [(1, 3), (2, 3), (3, 3)]


def test_cancel_interrupts_the_pipeline(pipe, tmp_path):
    app = DeblurApp(pipe, model_ref="random-tiny", examples_dir=None, measure_speed=False)
    progress = RecordingProgress()
    path = write(tmp_path, "p.png", gradient(64, 64))
    outcome = {}

    def run():
        try:
            outcome["result"] = app.deblur(str(path), 100, 1, False, 1.0, "", None, True, "auto", False, "ddpm", FakeRequest(), progress)
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
    result = app.deblur(str(path), 2, 1, False, 1.0, "", None, True, "auto", False, "ddpm", FakeRequest(), RecordingProgress())
    assert Image.open(result[1]).size == (64, 64)


def test_time_estimate_is_measured_and_shown(pipe, tmp_path):
    app = DeblurApp(pipe, model_ref="random-tiny", examples_dir=None, measure_speed=True)
    assert app.speed_ready.wait(60)
    assert app.runtime.speed.measured and app.runtime.speed.device == "cpu"
    path = write(tmp_path, "p.png", gradient(200, 100))
    text, size = app.describe_input(str(path), 50, 1.0, "auto")
    assert size == [200, 100] and "200×100" in text and "Estimated time" in text and "estimate" in text
    bad, size = app.describe_input(str(bad_file(tmp_path, "text")), 50, 1.0, "auto")
    assert size is None and "not an image" in bad
    updated = app.estimate_update([200, 100], 10, 1.0, "auto", text)
    assert updated.count("Estimated time") == 1 and "10 steps" in updated


def test_speed_model_and_gpu_duration():
    speed = SpeedModel.default("cpu")
    small = speed.seconds(512, 512, 10)
    assert speed.seconds(512, 512, 50) > small and speed.seconds(1024, 1024, 10) > 3 * small
    assert speed.seconds(512, 512, 10, guidance_scale=2.0) > small
    assert tile_megapixels(2048, 2048, True) > tile_megapixels(2048, 2048, False)
    small_request = app_module._gpu_duration(0, gradient(512, 512), 10, 0, 1.0, "", None, True, None, "ddpm", False, "s")
    big_request = app_module._gpu_duration(0, gradient(2048, 2048), 100, 0, 5.0, "", None, True, None, "ddpm", False, "s")
    assert app_module.MIN_GPU_SECONDS <= small_request < big_request <= app_module.MAX_GPU_SECONDS


def test_examples_gallery_comes_from_examples_folder(demo):
    app = demo.deblurdiff_app
    files, labels = app_module._load_examples(app.examples_dir)
    assert len(files) >= 1 and len(labels) == len(files) and all(os.path.isfile(f) for f in files)
    datasets = [b for b in demo.blocks.values() if isinstance(b, gr.Dataset)]
    assert datasets and len(datasets[0].samples) == len(files)
