"""The public server's limits (deblurdiff/space/server_limits.py), exercised on loopback with the
tiny random model: sizes, the queue, malformed calls, headers, clean-up, the cost cap,
header-only input description and the MCP tool."""

import asyncio
import http.server as http_server
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import httpx  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from deblurdiff.space import app as app_module  # noqa: E402
from deblurdiff import image_io
from deblurdiff.space import server_limits  # noqa: E402
from deblurdiff.space.app import DeblurApp, build_demo, launch  # noqa: E402

from conftest import free_port  # noqa: E402

LIMIT = 300 * 1024  # a small upload limit keeps every body here small


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def temp_root():
    """Gradio's folder for this module's server (read when components are made)."""
    folder = Path(tempfile.mkdtemp(prefix="deblurdiff-test-limits-"))
    before = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("GRADIO_TEMP_DIR", None)
    else:
        os.environ["GRADIO_TEMP_DIR"] = before


@pytest.fixture(scope="module")
def served(random_tiny_pipe, temp_root):
    demo = build_demo(random_tiny_pipe, model_ref="random-tiny", measure_speed=False, examples_dir=None)
    port = free_port()
    launch(demo, prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, max_file_size=LIMIT)
    demo.base = f"http://127.0.0.1:{port}"
    yield demo
    demo.close()


@pytest.fixture()
def http(served):
    with httpx.Client(base_url=served.base + "/gradio_api", timeout=20) as client:
        yield client


def png_bytes(w=64, h=48) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (120, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


def stored_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def wait_until(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def upload(http, data: bytes, name="a.png") -> str:
    response = http.post("/upload", files={"files": (name, data, "image/png")})
    assert response.status_code == 200, response.text
    return response.json()[0]


def deblur_payload(path: str, session: str, steps=2) -> dict:
    image = {"path": path, "meta": {"_type": "gradio.FileData"}, "orig_name": Path(path).name}
    return {"data": [image, steps, 0, False, 1.0, "", "", True, "auto", False, "ddpm"], "fn_index": 0, "session_hash": session}


# ---------------------------------------------------------------- 1. sizes


def test_parse_size_and_configured_limit(monkeypatch):
    assert server_limits.parse_size("50MB") == 50 * 1024**2 and server_limits.parse_size("512kb") == 512 * 1024
    assert server_limits.parse_size(1000) == 1000
    with pytest.raises(ValueError, match="not a file size"):
        server_limits.parse_size("lots")
    monkeypatch.setenv(server_limits.MAX_FILE_SIZE_ENV, "7MB")
    assert server_limits.max_file_size() == 7 * 1024**2
    monkeypatch.delenv(server_limits.MAX_FILE_SIZE_ENV)
    assert server_limits.max_file_size() == 50 * 1024**2


def test_oversized_upload_is_refused_before_anything_is_stored(served, http, temp_root):
    before = stored_files(temp_root)
    response = http.post("/upload", files={"files": ("big.png", b"x" * (LIMIT * 5))})
    assert response.status_code == 413 and "at most 300 KB" in response.text
    # A streamed body (no Content-Length) is cut off as soon as it passes the limit.
    boundary = b"bnd"
    head = b"--bnd\r\nContent-Disposition: form-data; name=\"files\"; filename=\"s.png\"\r\n\r\n"

    def body():
        yield head
        for _ in range(40):
            yield b"y" * 64 * 1024

    response = http.post("/upload", content=body(), headers={"content-type": "multipart/form-data; boundary=" + boundary.decode()})
    assert response.status_code == 413
    assert wait_until(lambda: stored_files(temp_root) == before, 5)
    # Under the limit, an upload still works.
    assert Path(upload(http, png_bytes())).is_file()


def test_an_aborted_upload_leaves_nothing_behind(served, temp_root):
    before = set(stored_files(temp_root))
    port = int(served.base.rsplit(":", 1)[1])
    head = b"--bnd\r\nContent-Disposition: form-data; name=\"files\"; filename=\"cut.png\"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            b"POST /gradio_api/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=bnd\r\n"
            + f"Content-Length: {LIMIT}\r\n\r\n".encode() + head + b"z" * (LIMIT // 2)
        )
        time.sleep(0.5)  # the server is writing the partial file now
    assert wait_until(lambda: set(stored_files(temp_root)) <= before, 5), set(stored_files(temp_root)) - before


def test_big_json_bodies_are_refused_and_payloads_never_logged(served, http, capfd):
    marker = "PAYLOADMARKER"
    response = http.post("/queue/join", content=b'{"data": ["' + marker.encode() * 200_000 + b'"]}', headers={"content-type": "application/json"})
    assert response.status_code == 413
    bad = [
        {"data": [marker] * 3, "fn_index": 0, "session_hash": "s-args"},  # wrong argument count
        {"data": [marker], "fn_index": 999, "session_hash": "s-fn"},  # unknown fn_index
        deblur_payload("/etc/" + marker, "s-path"),  # a file that was never uploaded
    ]
    messages = []
    for body in bad:
        response = http.post("/queue/join", json=body)
        assert response.status_code == 400, response.text
        messages.append(response.json()["detail"])
    assert "takes 11 input values; got 3" in messages[0]
    assert "Unknown function index 999" in messages[1]
    assert "was not uploaded to this server" in messages[2]
    response = http.post("/queue/join", content=b'{"data": [' + marker.encode(), headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500
    out, err = capfd.readouterr()
    assert marker not in out + err and "Traceback" not in out + err


# ---------------------------------------------------------------- 2. the queue


def test_the_rest_route_cannot_bypass_the_queue(served, http):
    path = upload(http, png_bytes())
    response = http.post("/run/deblur", json={"data": deblur_payload(path, "x")["data"]})
    assert response.status_code == 404 and "join the queue" in response.text


def test_few_jobs_per_session_and_never_listened_jobs_are_dropped(served, http, monkeypatch):
    steps = []
    real_restore = app_module.restore

    def counting_restore(pipe, image, options, on_step=None, should_stop=None):
        return real_restore(pipe, image, options, on_step=lambda d, t: (steps.append(d), on_step(d, t)), should_stop=should_stop)

    monkeypatch.setattr(app_module, "restore", counting_restore)
    app = served.deblurdiff_app
    path = upload(http, png_bytes())
    with app.lock:  # the model is busy: the first job starts and waits for it, the second queues
        answers = [http.post("/queue/join", json=deblur_payload(path, "quiet", steps=20)) for _ in range(3)]
        assert [a.status_code for a in answers[:2]] == [200, 200]
        assert answers[2].status_code == 400 and "already has 2 requests" in answers[2].json()["detail"]
        assert wait_until(lambda: "quiet" in app.active_runs, 5)
        # Nobody listens for "quiet": the queued job leaves the queue after the grace period.
        assert wait_until(lambda: len(served._queue) == 0, 3 + server_limits.LISTEN_GRACE_SECONDS)
        assert wait_until(lambda: app.cancelled[app.active_runs["quiet"]], 2)
    # The started one stops after its first step.
    assert wait_until(lambda: "quiet" not in app.active_runs, 10)
    assert len(steps) <= 1, steps


def test_fire_and_forget_joins_do_not_lock_visitors_out(served, http):
    app = served.deblurdiff_app
    path = upload(http, png_bytes())
    with app.lock:  # nothing finishes meanwhile: the queue fills up
        answers = [http.post("/queue/join", json=deblur_payload(path, f"ff-{i}")) for i in range(app_module.QUEUE_SIZE + 1)]
        assert all(a.status_code == 200 for a in answers)
        assert len(served._queue) >= app_module.QUEUE_SIZE
        time.sleep(server_limits.EVICT_AFTER_SECONDS * 2)
        # A real visitor still gets in: joins nobody listens to make room.
        visitor = http.post("/queue/join", json=deblur_payload(path, "visitor"))
        assert visitor.status_code == 200, visitor.text
    with http.stream("GET", "/queue/data", params={"session_hash": "visitor"}) as stream:
        lines = [line for line in stream.iter_lines() if line]
    assert any('"process_completed"' in line and '"success":true' in line for line in lines)
    # A dropped job's client that comes back late is told, not left waiting.
    with http.stream("GET", "/queue/data", params={"session_hash": "ff-5"}) as stream:
        lines = [line for line in stream.iter_lines() if line]
    assert any('"process_completed"' in line and "was dropped" in line for line in lines), lines


def test_a_listening_client_is_served_and_a_gone_client_stops_its_run(served, http, monkeypatch):
    path = upload(http, png_bytes())
    # Listened to: served.
    session = "listener"
    assert http.post("/queue/join", json=deblur_payload(path, session)).status_code == 200
    with http.stream("GET", "/queue/data", params={"session_hash": session}) as stream:
        lines = [line for line in stream.iter_lines() if line]
    assert any('"process_completed"' in line and '"success":true' in line for line in lines)

    # Disconnected mid-run: the run stops after its current step.
    steps_done = []
    started = threading.Event()
    real_restore = app_module.restore

    def slow_restore(pipe, image, options, on_step=None, should_stop=None):
        def step(done, total):
            steps_done.append(done)
            started.set()
            time.sleep(0.2)
            on_step(done, total)
        return real_restore(pipe, image, options, on_step=step, should_stop=should_stop)

    monkeypatch.setattr(app_module, "restore", slow_restore)
    session = "leaver"
    assert http.post("/queue/join", json=deblur_payload(path, session, steps=100)).status_code == 200
    with http.stream("GET", "/queue/data", params={"session_hash": session}):
        assert started.wait(20)
    # Gone after the grace period; cancelled within a step after that.
    budget = server_limits.LISTEN_GRACE_SECONDS + 3
    assert wait_until(lambda: served.deblurdiff_app.active_runs.get(session) is None, budget + 5)
    assert len(steps_done) < 100 * 0.6, len(steps_done)


# ---------------------------------------------------------------- 3. cost cap


def test_a_run_over_the_cost_limit_is_refused_with_what_fits(random_tiny_pipe, tmp_path, monkeypatch):
    app = DeblurApp(random_tiny_pipe, model_ref="random-tiny", measure_speed=False, examples_dir=None, max_run_seconds=1e-6)
    path = tmp_path / "p.png"
    Image.new("RGB", (96, 64)).save(path)
    with pytest.raises(gr.Error) as err:
        app.deblur(str(path), steps=100, seed=0, randomize_seed=False)
    message = str(err.value)
    assert "more than the" in message and "this server allows" in message
    assert "resize the image to" in message or "at most" in message
    # The estimate shown when the image is chosen says so already.
    text = app.describe_input(str(path), 100, 1.0, "auto")
    assert "this server allows" in text
    # With the default limit the same small run is accepted.
    monkeypatch.delenv("DEBLURDIFF_MAX_RUN_SECONDS", raising=False)
    ok = DeblurApp(random_tiny_pipe, model_ref="random-tiny", measure_speed=False, examples_dir=None)
    assert ok.deblur(str(path), steps=1, seed=0, randomize_seed=False)[4] == 0


def test_cost_advice_names_the_steps_and_size_that_fit():
    from deblurdiff.pipeline.estimates import SpeedModel, max_run_seconds, run_cost_advice

    speed = SpeedModel.default("cpu")
    assert run_cost_advice(speed, 512, 512, 10, 1.0, None, limit=3600) is None
    advice = run_cost_advice(speed, 4096, 4096, 100, 10.0, None, limit=max_run_seconds("cpu"))
    assert "at most" in advice and "resize the image to" in advice
    n = int(advice.split("at most ")[1].split(" step")[0])
    assert speed.seconds(4096, 4096, n, 10.0) <= 3600 < speed.seconds(4096, 4096, n + 1, 10.0)
    assert max_run_seconds("cuda") < max_run_seconds("cpu")


# ---------------------------------------------------------------- 4. describe_input


def test_describe_input_reads_only_the_header(random_tiny_pipe, tmp_path, monkeypatch):
    from PIL import ImageFile

    path = tmp_path / "big.png"
    Image.new("RGB", (2000, 1500)).save(path)
    app = DeblurApp(random_tiny_pipe, model_ref="random-tiny", measure_speed=False, examples_dir=None)

    decoded = []
    real_load = ImageFile.ImageFile.load

    def recording_load(self, *a, **k):
        decoded.append(self.size)
        return real_load(self, *a, **k)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    monkeypatch.setattr(image_io, "load_image_with_notes", lambda *a, **k: decoded.append("full load"))
    text = app.describe_input(str(path), 2, 1.0, "auto")
    assert "2000×1500" in text and "Estimated" in text
    # A rotated JPEG: its orientation comes from the header too.
    jpeg = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (300, 200)).save(jpeg, exif=exif)
    text = app.describe_input(str(jpeg), 2, 1.0, "auto")
    assert "200×300" in text and "EXIF orientation" in text
    assert decoded == []
    (tmp_path / "note.txt").write_text("hello")
    text = app.describe_input(str(tmp_path / "note.txt"), 2, 1.0, "auto")
    assert "not an image" in text and "Estimated" not in text


# ---------------------------------------------------------------- 5. clean-up


def test_each_result_is_stored_once(served, http, temp_root):
    path = upload(http, png_bytes(80, 64), name="once.png")
    session = "once"
    assert http.post("/queue/join", json=deblur_payload(path, session)).status_code == 200
    with http.stream("GET", "/queue/data", params={"session_hash": session}) as stream:
        lines = [line for line in stream.iter_lines() if line]
    assert any('"success":true' in line for line in lines)
    copies = [p for p in stored_files(temp_root) if p.name == "once_deblurred_UNTRAINED.png"]
    assert len(copies) == 1, copies


def test_leftovers_of_dead_servers_are_swept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    old = tmp_path / (server_limits.TEMP_PREFIX + "old")
    (old / "uploads").mkdir(parents=True)
    (old / "owner.pid").write_text(dead.stdout.strip())
    alive = tmp_path / (server_limits.TEMP_PREFIX + "alive")
    alive.mkdir()
    (alive / "owner.pid").write_text(str(os.getpid()))
    assert server_limits.sweep_leftovers(tmp_path) == [old]
    assert not old.exists() and alive.exists()


def test_sigterm_removes_the_temporary_folder(tmp_path):
    script = (
        "import sys, time; from deblurdiff.space import server_limits\n"
        f"folder = server_limits.claim_temp_dir({str(tmp_path)!r})\n"
        "(folder / 'upload.png').write_bytes(b'x')\n"
        "try:\n    print(folder, flush=True)\n    time.sleep(30)\nexcept KeyboardInterrupt:\n    print('closing', flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    folder = Path(proc.stdout.readline().strip())
    assert (folder / "upload.png").is_file()
    proc.terminate()
    out, _ = proc.communicate(timeout=20)
    assert "closing" in out and proc.returncode == 0
    assert not folder.exists()


# ---------------------------------------------------------------- 10. headers


def test_security_headers_allow_embedding_on_huggingface(served):
    for path in ("/", "/gradio_api/info", "/config"):
        response = httpx.get(served.base + path, timeout=10)
        assert response.headers["x-content-type-options"] == "nosniff"
        policy = response.headers["content-security-policy"]
        assert "frame-ancestors" in policy and "https://huggingface.co" in policy and "https://*.hf.space" in policy
        assert "x-frame-options" not in response.headers


# ---------------------------------------------------------------- 8. MCP


class _Files(http_server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.startswith("/hop/"):  # /hop/N redirects N more times, then to the photo
            left = int(self.path.rsplit("/", 1)[1])
            self.send_response(302)
            self.send_header("Location", f"/hop/{left - 1}" if left > 1 else "/photo.png")
            self.end_headers()
            return
        if self.path.startswith("/slow"):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            for _ in range(100):
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.1)
            return
        super().do_GET()


@pytest.fixture()
def file_server(tmp_path, monkeypatch):
    (tmp_path / "photo.png").write_bytes(png_bytes())
    (tmp_path / "huge.png").write_bytes(b"x" * (LIMIT * 2))
    handler = lambda *a, **k: _Files(*a, directory=str(tmp_path), **k)  # noqa: E731
    server = http_server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    async def loopback(host):  # the tests' files are on loopback, which the server normally refuses
        return "127.0.0.1"

    monkeypatch.setattr(server_limits, "validate_host", loopback)
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_image_urls_may_redirect_a_few_times(file_server, tmp_path):
    hops = server_limits.MAX_REDIRECTS
    fetched = asyncio.run(server_limits.bounded_download(f"{file_server}/hop/{hops}", str(tmp_path / "c"), max_bytes=LIMIT))
    assert Path(fetched).read_bytes() == png_bytes()
    with pytest.raises(server_limits.DownloadRefused, match=f"redirected more than {hops} times"):
        asyncio.run(server_limits.bounded_download(f"{file_server}/hop/{hops + 1}", str(tmp_path / "c"), max_bytes=LIMIT))


def test_image_urls_are_fetched_with_size_and_time_limits(file_server, tmp_path):
    fetched = asyncio.run(server_limits.bounded_download(file_server + "/photo.png", str(tmp_path / "c"), max_bytes=LIMIT))
    assert Path(fetched).read_bytes() == png_bytes()
    with pytest.raises(server_limits.DownloadRefused, match="larger than 300 KB"):
        asyncio.run(server_limits.bounded_download(file_server + "/huge.png", str(tmp_path / "c"), max_bytes=LIMIT))
    with pytest.raises(server_limits.DownloadRefused, match="longer than 1 s"):
        asyncio.run(server_limits.bounded_download(file_server + "/slow.png", str(tmp_path / "c"), max_bytes=LIMIT, timeout=1))
    assert not any(p.name in ("huge.png", "slow.png") for p in (tmp_path / "c").rglob("*"))


def test_mcp_tool_is_listed_described_and_returns_an_image(served, file_server):
    from mcp import ClientSession
    from mcp.client.streamable_http import streamablehttp_client

    async def main():
        async with streamablehttp_client(served.base + "/gradio_api/mcp/") as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                tools = {tool.name: tool for tool in (await session.list_tools()).tools}
                tool = next(t for name, t in tools.items() if name.endswith("deblur"))
                result = await session.call_tool(tool.name, {
                    "image": file_server + "/photo.png", "steps": 1, "seed": 0, "randomize_seed": False,
                })
                return tool, result

    tool, result = asyncio.run(asyncio.wait_for(main(), 120))
    assert "motion" in tool.description and "defocus" in tool.description
    assert "image" in tool.inputSchema["properties"]
    assert "1 to 100" in tool.inputSchema["properties"]["steps"]["description"]
    assert not result.isError, result.content
    kinds = [c.type for c in result.content]
    assert "image" in kinds or any("png" in (getattr(c, "text", "") or "") for c in result.content), kinds


def test_scope_is_said_in_the_ui_and_the_model_card(served):
    from deblurdiff.convert import model_card

    page = httpx.get(served.base + "/config", timeout=10).text
    card = model_card("me/deblurdiff", "fp16", "model.pth")
    for text in (page, card):
        assert "camera shake" in text and "defocus" in text and "noise alone" in text and "low resolution" in text


def test_command_line_switches_for_mcp_and_limits(monkeypatch, capsys):
    args = app_module.build_parser().parse_args(["--no-mcp", "--max-file-size", "20MB", "--max-run-seconds", "90"])
    assert args.no_mcp and args.max_file_size == "20MB" and args.max_run_seconds == 90
    with pytest.raises(SystemExit) as exit_info:
        app_module.main(["--max-file-size", "lots"])
    assert exit_info.value.code == 2 and "not a file size" in capsys.readouterr().err


def test_no_mcp_turns_the_mcp_server_off(temp_root):
    demo = build_demo(None, examples_dir=None)
    port = free_port()
    launch(demo, mcp=False, prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/gradio_api/mcp/schema", timeout=10).status_code == 404
        assert httpx.get(f"http://127.0.0.1:{port}/gradio_api/info", timeout=10).status_code == 200
    finally:
        demo.close()
