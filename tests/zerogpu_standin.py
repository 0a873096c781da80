"""A stand-in for ZeroGPU's device API, for rehearsing the app on the CPU with the real
``spaces`` package (``SPACES_ZERO_DEVICE_API_URL`` points here).

It answers the four calls the ``spaces`` 0.51.3 client makes (``spaces/zero/api.py``):

- ``POST /startup-report``: 200;
- ``POST /schedule?cgroupPath&taskId&enableQueue&tokenVersion&durationSeconds[&token]``:
  200 with ``{idle, nvidiaIndex, nvidiaUUID, allowToken}``, or, when the booked
  ``durationSeconds`` is above what the visitor has left, 429 with ``{left, wait}`` and
  ``X-Approve-Result: quota-exceeded`` (what ZeroGPU answers then);
- ``POST /allow?allowToken&pid``: 200 (the forked worker calls it);
- ``POST /release?allowToken&fail``: 200.

It listens on 127.0.0.1 only, serves at most ``max_requests`` requests and stops by
itself after ``lifetime`` seconds. Every call is recorded (path and query) in ``calls``.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit


class StandIn:
    def __init__(self, *, quota_left: int = 10_000, lifetime: float = 300.0, max_requests: int = 500):
        self.calls: list[tuple[str, dict]] = []
        self.quota_left = quota_left  # seconds the visitor has left (booked durations are charged)
        self.max_requests = max_requests
        self._lock = threading.Lock()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                standin._handle(self)

            do_GET = do_POST

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="zerogpu-standin", daemon=True)
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True

    def start(self) -> "StandIn":
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        self._timer.cancel()
        threading.Thread(target=self.server.shutdown, daemon=True).start()

    def named(self, path: str) -> list[dict]:
        with self._lock:
            return [query for p, query in self.calls if p == path]

    def _reply(self, handler, status: int, body: dict | None = None, headers: dict | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        handler.wfile.write(data)

    def _handle(self, handler) -> None:
        parts = urlsplit(handler.path)
        query = dict(parse_qsl(parts.query))
        with self._lock:
            self.calls.append((parts.path, query))
            over = len(self.calls) > self.max_requests
        if over:
            self._reply(handler, 503)
            self.stop()
            return
        if parts.path in ("/startup-report", "/allow", "/release"):
            self._reply(handler, 200)
        elif parts.path == "/schedule":
            booked = int(query.get("durationSeconds", 60))
            with self._lock:
                left = self.quota_left
                if booked <= left:
                    self.quota_left -= booked
            if booked > left:
                self._reply(handler, 429, {"left": left, "wait": 3600}, {"X-Approve-Result": "quota-exceeded"})
            else:
                token = uuid.uuid4().hex
                self._reply(handler, 200, {"idle": False, "nvidiaIndex": 0, "nvidiaUUID": "GPU-standin", "allowToken": token})
        else:
            self._reply(handler, 404)


def wait_for(predicate, timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())
