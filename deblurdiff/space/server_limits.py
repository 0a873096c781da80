"""What strangers can send the public server, enforced around Gradio's own server: body sizes
and security headers (:class:`ServerGuard`, an ASGI middleware), the queue's discipline
(:func:`guard_queue`), image URLs with a size and a time limit, and one temporary folder
that goes with the server (:func:`claim_temp_dir`). :func:`protect` applies them all.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urljoin

import httpx
import safehttpx
from gradio import processing_utils, route_utils
from gradio.context import LocalContext
from gradio.server_messages import ProcessCompletedMessage
from gradio_client import utils as client_utils
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect

logger = logging.getLogger(__name__)

#: Largest file a visitor may upload (bytes; "50MB" style values are accepted).
MAX_FILE_SIZE_ENV = "DEBLURDIFF_MAX_FILE_SIZE"
DEFAULT_MAX_FILE_SIZE = 50 * 1024**2
#: Largest body of a JSON API call (queue join, cancel, …): they carry file references, not files.
MAX_JSON_BODY = 1024**2
#: Room for multipart headers around an uploaded file.
MULTIPART_OVERHEAD = 1024**2
#: Jobs one session may have waiting or running at once.
MAX_JOBS_PER_SESSION = 2
#: A job whose session has had no open event stream for this long is dropped (seconds).
LISTEN_GRACE_SECONDS = 3.0
#: When the queue is full, jobs whose session opened no stream this long after joining make room
#: (a real client opens its stream within milliseconds of joining).
EVICT_AFTER_SECONDS = 0.1
#: Image URLs: longest download (seconds).
URL_TIMEOUT_SECONDS = 20.0
#: Redirects an image URL may take (each hop's host is checked again).
MAX_REDIRECTS = 5
#: Who may show the app in a frame: the Space page on huggingface.co and its *.hf.space host.
FRAME_ANCESTORS = "'self' https://huggingface.co https://*.huggingface.co https://*.hf.space"
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy", f"frame-ancestors {FRAME_ANCESTORS}".encode()),
    (b"referrer-policy", b"strict-origin-when-cross-origin"),
]

API_PREFIX = "/gradio_api"
_UNITS = {"": 1, "b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}


def parse_size(value) -> int:
    """Bytes from ``50MB``, ``512kb``, ``1048576`` …; raises ValueError with a readable message."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?b?)\s*", str(value).lower())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"not a file size: {value!r} (use e.g. 50MB, 512KB or a number of bytes)")
    return int(float(match.group(1)) * _UNITS[match.group(2) if match.group(2) != "k" else "kb"])


def max_file_size(value=None) -> int:
    """``value``, else ``$DEBLURDIFF_MAX_FILE_SIZE``, else 50 MB."""
    value = value if value is not None else os.environ.get(MAX_FILE_SIZE_ENV)
    return DEFAULT_MAX_FILE_SIZE if value in (None, "") else parse_size(value)


def format_size(n: int) -> str:
    return f"{n / 1024**2:.0f} MB" if n >= 1024**2 else f"{n / 1024:.0f} KB"


class ClientTracker:
    """Open event streams per session, as :class:`ServerGuard` sees them: a job's client is *gone*
    after :data:`LISTEN_GRACE_SECONDS` without a stream. Until the middleware is installed, none is."""

    def __init__(self):
        self.active = False
        self.queue = None  # set by guard_queue: resolves /call/ event ids to sessions
        self._open: dict[str, int] = {}
        self._since: dict[str, float] = {}
        self._lock = threading.Lock()

    def joined(self, session: str) -> None:
        with self._lock:
            self._since.setdefault(session, time.monotonic())

    def opened(self, session: str) -> None:
        with self._lock:
            self._open[session] = self._open.get(session, 0) + 1

    def closed(self, session: str) -> None:
        with self._lock:
            left = self._open.get(session, 1) - 1
            if left > 0:
                self._open[session] = left
            else:
                self._open.pop(session, None)
                self._since[session] = time.monotonic()
            if len(self._since) > 10000:  # forget the oldest sessions
                for key in sorted(self._since, key=self._since.get)[:5000]:
                    if key not in self._open:
                        del self._since[key]

    def gone(self, session: str | None, grace: float = LISTEN_GRACE_SECONDS) -> bool:
        if not self.active or not session:
            return False
        with self._lock:
            if self._open.get(session):
                return False
            since = self._since.setdefault(session, time.monotonic())
        return time.monotonic() - since > grace


class BodyTooLarge(Exception):
    pass


async def _plain(send, status: int, text: str) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"), *SECURITY_HEADERS,
    ]})
    await send({"type": "http.response.body", "body": body})


class ServerGuard:
    """ASGI middleware: body limits, security headers, stream tracking, terse errors."""

    def __init__(self, app, *, file_limit: int, tracker: ClientTracker):
        self.app = app
        self.file_limit = file_limit
        self.tracker = tracker
        tracker.active = True

    def body_limit(self, path: str) -> int:
        if path.startswith(f"{API_PREFIX}/upload"):
            return self.file_limit + MULTIPART_OVERHEAD
        if path.startswith(f"{API_PREFIX}/mcp"):  # a tool call may carry a base64 image
            return self.file_limit * 4 // 3 + MULTIPART_OVERHEAD
        return MAX_JSON_BODY

    def stream_session(self, scope) -> str | None:
        """The session an event stream is for; None for other requests."""
        path = scope["path"]
        if path.startswith(f"{API_PREFIX}/queue/data"):
            return (parse_qs(scope.get("query_string", b"").decode("latin-1")).get("session_hash") or [None])[0]
        if re.match(rf"{API_PREFIX}/call/(v2/)?[^/]+/[^/]+$", path):
            key = path.rstrip("/").rsplit("/", 1)[-1]  # an event id: its session, once queued
            event = getattr(self.tracker.queue, "event_ids_to_events", {}).get(key)
            return event.session_hash if event is not None else key
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        limit = self.body_limit(path)
        too_large = f"Request too large: at most {format_size(limit if limit != self.file_limit + MULTIPART_OVERHEAD else self.file_limit)} is accepted here."
        declared = dict(scope.get("headers", [])).get(b"content-length", b"0")
        if not declared.isdigit():
            return await _plain(send, 400, "Bad Content-Length header.")
        if int(declared) > limit:
            return await _plain(send, 413, too_large)

        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge()
            return message

        async def guarded_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = dict(message)
                names = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [h for h in SECURITY_HEADERS if h[0] not in names]
            await send(message)

        session = self.stream_session(scope)
        if session:
            self.tracker.opened(session)
        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            if not started:
                await _plain(send, 413, too_large)
        except Exception as exc:
            if isinstance(exc, ClientDisconnect) or started:
                return  # the client left: nothing to answer, nothing to log
            if isinstance(exc, (ValueError, TypeError, KeyError, IndexError)):
                # Gradio's route helpers raise these on malformed calls (unknown fn_index,
                # wrong argument count): say so briefly, without the payload or a traceback.
                logger.warning("refused a malformed request to %s (%s)", path, type(exc).__name__)
                return await _plain(send, 400, f"Malformed request: {type(exc).__name__}: {str(exc)[:200]}")
            raise
        finally:
            if session:
                self.tracker.closed(session)


async def drop_abandoned(queue, tracker: ClientTracker, grace: float = LISTEN_GRACE_SECONDS) -> None:
    """Remove the queued jobs of sessions whose client is gone; the app stops their running ones."""
    dropped = [
        event
        for event_queue in list(queue.event_queue_per_concurrency_id.values())
        for event in list(event_queue.queue)
        if tracker.gone(event.session_hash, grace)
    ]
    sessions = {event.session_hash for event in dropped}
    for session in sessions:
        await queue.clean_events(session_hash=session)
    for event in dropped:  # a client that starts listening late is told, not left waiting
        messages = queue.pending_messages_per_session.get(event.session_hash)
        if messages is not None:
            queue.pending_event_ids_session.setdefault(event.session_hash, set())  # read when the message is sent
            messages.put_nowait(ProcessCompletedMessage(
                event_id=event._id, success=False, title="Dropped",
                output={"error": "This request was dropped: its client was not listening for the result. Please send it again."},
            ))
    if sessions:
        logger.info("dropped the queued jobs of %d session(s) whose client is gone", len(sessions))


def check_call(blocks, body) -> str | None:
    """What is wrong with a queued call, checked before it is queued (Gradio would otherwise
    log a traceback with the payload, and answer with an empty message); None when fine."""
    fns = blocks.fns
    fn = fns.get(body.fn_index) if isinstance(body.fn_index, int) else None
    if fn is None:
        return f"Unknown function index {str(body.fn_index)[:20]}: this app has {len(fns)} (0 to {len(fns) - 1})."
    data = body.data if isinstance(body.data, list) else []
    if len(data) != len(fn.inputs):
        name = fn.api_name or fn.name
        return f"The function '{name}' takes {len(fn.inputs)} input values; got {len(data)}."
    for component, value in zip(fn.inputs, data):
        model = getattr(component, "data_model", None)
        takes_file = "path" in getattr(model, "model_fields", {})
        if value is None or not (takes_file or isinstance(value, dict) and "path" in value):
            continue
        label = getattr(component, "label", None) or type(component).__name__
        if not isinstance(value, dict) or not isinstance(value.get("path"), str) or not value["path"]:
            return f"The input '{label}' must be a file (an uploaded file's path or a URL)."
        if not client_utils.is_http_url_like(value["path"]):
            token = LocalContext.blocks.set(blocks)  # the rule Gradio applies when the job runs
            try:
                processing_utils._check_allowed(value["path"], True)
            except Exception:
                return f"The input '{label}' names a file that was not uploaded to this server; upload it first."
            finally:
                LocalContext.blocks.reset(token)
    return None


def guard_queue(queue, tracker: ClientTracker):
    """At most :data:`MAX_JOBS_PER_SESSION` jobs per session; jobs of gone clients swept every second."""
    original_push = queue.push
    tracker.queue = queue
    sweeper = None

    async def sweep():
        while not queue.stopped:
            await asyncio.sleep(1.0)
            try:
                await drop_abandoned(queue, tracker)
            except Exception:  # never let the sweeper die silently
                logger.exception("could not sweep abandoned jobs")

    async def push(body, request, username):
        nonlocal sweeper
        if sweeper is None or sweeper.done():
            sweeper = asyncio.get_running_loop().create_task(sweep())
        problem = check_call(queue.blocks, body)
        if problem:
            logger.warning("refused a call: %s", problem[:200])
            return False, problem, "error"
        session = body.session_hash
        waiting = [e for e in queue.pending_event_ids_session.get(session, ()) if e in queue.event_ids_to_events]
        if session and len(waiting) >= MAX_JOBS_PER_SESSION:
            return False, (
                f"This session already has {MAX_JOBS_PER_SESSION} requests waiting or running; "
                "wait for one to finish (or cancel it) before sending another."
            ), "error"
        if session:
            tracker.joined(session)
        if queue.max_size is not None and len(queue) >= queue.max_size:
            await drop_abandoned(queue, tracker, EVICT_AFTER_SECONDS)
        return await original_push(body, request, username)

    queue.push = push


class DownloadRefused(ValueError):
    pass


async def bounded_download(url: str, cache_dir: str, *, max_bytes: int, timeout: float = URL_TIMEOUT_SECONDS) -> str:
    """Gradio's SSRF-protected download with a size and a time limit; a partial file is removed."""
    try:
        return await asyncio.wait_for(_download(url, cache_dir, max_bytes), timeout)
    except asyncio.TimeoutError:
        raise DownloadRefused(f"The image at {url[:200]} took longer than {timeout:.0f} s to download.") from None


async def _download(url: str, cache_dir: str, max_bytes: int) -> str:
    for _ in range(MAX_REDIRECTS + 1):
        host = httpx.URL(url).host
        if httpx.URL(url).scheme not in ("http", "https") or not host:
            raise DownloadRefused(f"Only http(s) image URLs are accepted; got {url[:200]}.")
        if safehttpx.matches_domain_whitelist(host, processing_utils.PUBLIC_HOSTNAME_WHITELIST):
            transport = None
        else:
            try:
                transport = safehttpx.AsyncSecureTransport(await validate_host(host))
            except ValueError:
                raise DownloadRefused(f"The image URL's host {host} is not a public address.") from None
        async with httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(10.0)) as client:
            async with client.stream("GET", url, follow_redirects=False) as response:
                if response.has_redirect_location:
                    url = urljoin(str(response.url), response.headers["Location"])
                    continue
                if response.status_code != 200:
                    raise DownloadRefused(f"The image URL answered HTTP {response.status_code}.")
                declared = response.headers.get("content-length")
                too_big = f"The image at the URL is larger than {format_size(max_bytes)}, the most accepted."
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    raise DownloadRefused(too_big)
                folder = Path(cache_dir) / processing_utils.hash_url(url)
                folder.mkdir(parents=True, exist_ok=True)
                name = client_utils.strip_invalid_filename_characters(Path(httpx.URL(url).path.rstrip("/")).name) or "image"
                target = folder / name
                size = 0
                try:
                    with open(target, "wb") as fh:
                        async for chunk in response.aiter_bytes():
                            size += len(chunk)
                            if size > max_bytes:
                                raise DownloadRefused(too_big)
                            fh.write(chunk)
                except BaseException:
                    target.unlink(missing_ok=True)
                    raise
                return str(target)
    raise DownloadRefused(f"The image URL redirected more than {MAX_REDIRECTS} times.")


async def validate_host(host: str) -> str:
    """A public IP address of ``host`` (Gradio's rule); tests may allow loopback here."""
    return await safehttpx.async_validate_url(host)


def install_upload_cleanup() -> None:
    """An upload that ends early (client gone, body too large) leaves no partial file."""
    parser = route_utils.GradioMultiPartParser
    if getattr(parser, "_deblurdiff_cleans_up", False):
        return

    class CleaningParser(parser):
        _deblurdiff_cleans_up = True

        async def parse(self):
            try:
                return await super().parse()
            except BaseException:
                for handle in self._files_to_close_on_error:
                    with contextlib.suppress(OSError):
                        handle.close()
                        Path(handle.name).unlink(missing_ok=True)
                raise

    route_utils.GradioMultiPartParser = CleaningParser


TEMP_PREFIX = "deblurdiff-server-"
_PID_FILE = "owner.pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_leftovers(parent: Path) -> list[Path]:
    """Remove the temporary folders of earlier servers that are no longer running."""
    removed = []
    for folder in parent.glob(TEMP_PREFIX + "*"):
        try:
            pid = int((folder / _PID_FILE).read_text())
        except (OSError, ValueError):
            pid = None
        if pid is None and time.time() - folder.stat().st_mtime < 60:
            continue  # being created right now
        if pid is None or (pid != os.getpid() and not _alive(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def claim_temp_dir(parent: str | None = None) -> Path:
    """This server's temporary folder, made Gradio's (``GRADIO_TEMP_DIR``): uploads, downloads
    and results. Earlier leftovers are swept; the folder goes on exit, Ctrl-C or SIGTERM."""
    base = Path(parent or tempfile.gettempdir())
    removed = sweep_leftovers(base)
    if removed:
        logger.info("removed %d temporary folder(s) left by earlier runs", len(removed))
    folder = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=base))
    (folder / _PID_FILE).write_text(str(os.getpid()))
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    atexit.register(shutil.rmtree, folder, True)

    def on_sigterm(signum, frame):  # how containers stop: like Ctrl-C, Gradio closes and atexit runs
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends at once
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)
    return folder


def protect(demo, tracker: ClientTracker, file_limit: int, launch_kwargs: dict) -> dict:
    """Apply the limits to a queued ``demo``; returns ``launch_kwargs`` with the file limit and middleware."""
    guard_queue(demo._queue, tracker)
    install_upload_cleanup()
    # Gradio fetches image URLs through this one function
    processing_utils.async_ssrf_protected_download = functools.partial(bounded_download, max_bytes=file_limit)
    middleware = Middleware(ServerGuard, file_limit=file_limit, tracker=tracker)
    return {"max_file_size": file_limit, **launch_kwargs, "app_kwargs": {"middleware": [middleware]}}

