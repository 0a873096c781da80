"""Abuse and load check of the web app on loopback (not a test: it prints what it measured).

Starts ``python app.py --dev-random-weights`` on 127.0.0.1 with its own temporary folder, then:

- two waves of ``--clients`` concurrent visitors (upload, join, listen; 1 step each): every one
  must be served or told clearly (an HTTP error or a failed job with a message), and the
  server's RSS may grow by less than 100 MB from before the first wave to after the second;
- the abuse cases of the public-Space review, each with a small N (printed): oversized and
  aborted uploads, big JSON bodies, fire-and-forget joins, never-listened jobs, a client that
  leaves mid-run, direct REST calls, parallel ``describe_input`` on a 4096² image, malformed
  calls, a run far over the cost cap, and SIGTERM.

    python benchmarks/load_check.py [--clients 100] [--port 7990]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def png(w, h, seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def bilevel_png(w, h) -> bytes:
    """A black 1-bit PNG of any declared size, a few kB on disk."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    row = b"\x00" * (1 + (w + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def payload(path, session, steps=1, size=None):
    image = {"path": path, "meta": {"_type": "gradio.FileData"}, "orig_name": Path(path).name}
    return {"data": [image, steps, 0, False, 1.0, "", "", True, "auto", False, "ddpm"], "fn_index": 0, "session_hash": session}


class Server:
    def __init__(self, port: int, tmp: Path):
        self.port, self.tmp = port, tmp
        self.log = tmp / "server.log"
        env = dict(os.environ, TMPDIR=str(tmp), GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "app.py", "--dev-random-weights", "--no-examples", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env=env, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
        )
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.base + "/gradio_api/info", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise SystemExit(f"the app exited:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)
        self.ps = psutil.Process(self.proc.pid)
        self.folder = next(tmp.glob("deblurdiff-server-*"))

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / 1e6

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


async def raw_post(port: int, path: str, content_type: str, declared: int, body: bytes = b"") -> int:
    """POST with a declared Content-Length larger than what is sent; the status the server answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {declared}\r\n\r\n".encode() + body)
    await writer.drain()
    try:
        line = await asyncio.wait_for(reader.readline(), 30)
    finally:
        writer.close()
    return int(line.split()[1]) if line else 0


async def upload(client, data: bytes, name="p.png") -> str:
    r = await client.post("/upload", files={"files": (name, data, "image/png")})
    r.raise_for_status()
    return r.json()[0]


async def visit(client, path: str, session: str, steps=1, timeout=120) -> tuple[str, float]:
    """('served' | 'told' | 'unclear', seconds); no answer within ``timeout`` is unclear."""
    start = time.monotonic()
    try:
        return await asyncio.wait_for(_visit(client, path, session, steps, start), timeout)
    except asyncio.TimeoutError:
        return "unclear", time.monotonic() - start


async def _visit(client, path: str, session: str, steps, start) -> tuple[str, float]:
    try:
        r = await client.post("/queue/join", json=payload(path, session, steps))
        if r.status_code != 200:
            detail = r.json().get("detail") if r.headers.get("content-type", "").startswith("application/json") else r.text
            return ("told" if detail else "unclear"), time.monotonic() - start
        async with client.stream("GET", "/queue/data", params={"session_hash": session}, timeout=300) as stream:
            async for line in stream.aiter_lines():
                if '"process_completed"' in line:
                    msg = json.loads(line[5:])
                    if msg.get("success"):
                        return "served", time.monotonic() - start
                    return ("told" if (msg.get("output") or {}).get("error") else "unclear"), time.monotonic() - start
                if '"unexpected_error"' in line:
                    return ("told" if json.loads(line[5:]).get("message") else "unclear"), time.monotonic() - start
    except httpx.HTTPError:
        return "unclear", time.monotonic() - start
    return "unclear", time.monotonic() - start


async def wave(base: str, n: int, path: str, tag: str) -> dict:
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
    async with httpx.AsyncClient(base_url=base + "/gradio_api", timeout=300, limits=limits) as client:
        results = await asyncio.gather(*(visit(client, path, f"{tag}-{i}") for i in range(n)))
    counts = {k: sum(1 for r, _ in results if r == k) for k in ("served", "told", "unclear")}
    counts["slowest_s"] = round(max(t for _, t in results), 1)
    return counts


async def main_async(args, server: Server) -> list[tuple[str, str, str]]:
    rows = []
    api = server.base + "/gradio_api"
    async with httpx.AsyncClient(base_url=api, timeout=120) as client:
        path = await upload(client, png(64, 64))

        async def one_real_job(tag):
            return await visit(client, path, tag)

        # Waves of concurrent visitors.
        await one_real_job("warm")
        rss0 = server.rss_mb()
        w1 = await wave(server.base, args.clients, path, "w1")
        w2 = await wave(server.base, args.clients, path, "w2")
        await asyncio.sleep(3)
        rss1 = server.rss_mb()
        rows.append(("two waves of concurrent clients", f"N={args.clients} each", f"wave 1 {w1}, wave 2 {w2}; RSS {rss0:.0f} → {rss1:.0f} MB ({rss1 - rss0:+.0f} MB)"))

        # Uploads over the limit (streamed, no Content-Length; and a declared 2 GB).
        disk0 = disk_bytes(server.folder)

        async def stream_body(total):
            yield b'--b\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n\r\n'
            for _ in range(total // (1024 * 1024)):
                yield b"x" * (1024 * 1024)

        t = time.monotonic()
        try:
            r = await client.post("/upload", content=stream_body(200 * 1024**2), headers={"content-type": "multipart/form-data; boundary=b"})
            status = r.status_code
        except httpx.HTTPError as exc:  # answered 413 and closed while the client was still sending
            status = f"closed ({type(exc).__name__})"
        streamed = (status, round(time.monotonic() - t, 1))
        declared = await raw_post(server.port, "/gradio_api/upload", "multipart/form-data; boundary=b", 2 * 1024**3)
        rows.append(("upload 200 MB streamed / 2 GB declared", "N=1 each", f"HTTP {streamed[0]} after {streamed[1]} s / HTTP {declared}; disk {disk_bytes(server.folder) - disk0:+d} bytes"))

        # An upload aborted halfway.
        disk0 = disk_bytes(server.folder)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /gradio_api/upload HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 40000000\r\n\r\n")
        writer.write(b'--b\r\nContent-Disposition: form-data; name="files"; filename="cut.png"\r\n\r\n' + b"z" * 20_000_000)
        await writer.drain()
        await asyncio.sleep(1)
        writer.close()
        await asyncio.sleep(2)
        rows.append(("upload aborted halfway (20 of 40 MB)", "N=1", f"disk {disk_bytes(server.folder) - disk0:+d} bytes afterwards"))

        # Big JSON bodies.
        log0, rss0 = len(server.log_text()), server.rss_mb()
        big = b'{"data": ["' + b"A" * (20 * 1024**2) + b'"], "fn_index": 0, "session_hash": "big"}'
        codes = []
        for _ in range(3):
            codes.append(await raw_post(server.port, "/gradio_api/queue/join", "application/json", len(big), big[: 1024**2]))
        codes.append(await raw_post(server.port, "/gradio_api/queue/join", "application/json", 300 * 1024**2, b"{"))
        rows.append(("20 MB JSON bodies (1 MB sent) to /queue/join; a declared 300 MB one", "N=3 + 1", f"HTTP {codes}; RSS {server.rss_mb() - rss0:+.0f} MB; log {len(server.log_text()) - log0:+d} bytes"))

        # Fire-and-forget joins, each from a new session, then a real visitor.
        answers = [await client.post("/queue/join", json=payload(path, f"ff-{i}", steps=1)) for i in range(33)]
        t = time.monotonic()
        result, seconds = await one_real_job("after-ff")
        rows.append(("33 fire-and-forget joins (new sessions), then a real visitor", "N=33", f"joins HTTP {sorted({a.status_code for a in answers})}; the visitor: {result} in {seconds:.1f} s"))

        # Jobs joined and never listened to, then a real visitor.
        answers = [await client.post("/queue/join", json=payload(path, f"nl-{i}", steps=20)) for i in range(10)]
        await asyncio.sleep(0.2)
        result, seconds = await one_real_job("after-nl")
        rows.append(("10 jobs (20 steps) joined and never listened to, then a real visitor", "N=10", f"the visitor: {result} in {seconds:.1f} s"))

        # One session sending more than a few jobs.
        answers = [await client.post("/queue/join", json=payload(path, "greedy", steps=1)) for _ in range(5)]
        rows.append(("5 joins from one session", "N=5", f"HTTP {[a.status_code for a in answers]}"))

        # A client that leaves mid-run.
        big_path = await upload(client, png(512, 512))
        r = await client.post("/queue/join", json=payload(big_path, "leaver", steps=100))
        async with client.stream("GET", "/queue/data", params={"session_hash": "leaver"}) as stream:
            async for line in stream.aiter_lines():
                if "progress" in line:
                    break
        t = time.monotonic()
        result, seconds = await one_real_job("after-leaver")
        rows.append(("client disconnects mid-run (100 steps, 512²), then a real visitor", "N=1", f"the visitor: {result} in {seconds:.1f} s"))

        # Direct REST calls.
        codes = [(await client.post("/run/deblur", json={"data": payload(path, "rest")["data"]})).status_code for _ in range(20)]
        rows.append(("direct POST /gradio_api/run/deblur", "N=20", f"HTTP {sorted(set(codes))} ({codes.count(200)} served)"))

        # describe_input in parallel on a 4096² image (header only).
        config = (await client.get(server.base + "/config")).json()
        describe = next(i for i, d in enumerate(config["dependencies"]) if not d.get("queue", True) and len(d["inputs"]) == 4 and len(d["outputs"]) == 2)
        huge = await upload(client, bilevel_png(4096, 4096), name="huge.png")
        image = {"path": huge, "meta": {"_type": "gradio.FileData"}, "orig_name": "huge.png"}
        rss0 = server.rss_mb()
        calls = [client.post("/run/predict", json={"data": [image, 50, 1.0, "auto"], "fn_index": describe, "session_hash": f"d{i}"}) for i in range(40)]
        answers = await asyncio.gather(*calls)
        ok = sum(1 for a in answers if a.status_code == 200 and "4096×4096" in a.text)
        rows.append(("parallel describe_input, 4096² PNG", "N=40", f"{ok}/40 answered with the size; RSS {server.rss_mb() - rss0:+.0f} MB"))

        # Malformed calls.
        log0 = len(server.log_text())
        bad = {
            "unknown fn_index": {"data": [], "fn_index": 999, "session_hash": "m1"},
            "wrong argument count": {"data": [1], "fn_index": 0, "session_hash": "m2"},
            "broken image payload": payload("/etc/passwd", "m3"),
            "broken JSON": None,
        }
        out = []
        for name, body in bad.items():
            if body is None:
                r = await client.post("/queue/join", content=b'{"data": [', headers={"content-type": "application/json"})
            else:
                r = await client.post("/queue/join", json=body)
            detail = r.text[:70].replace("\n", " ")
            out.append(f"{name}: HTTP {r.status_code} {detail!r}")
        tracebacks = server.log_text()[log0:].count("Traceback")
        rows.append(("unknown fn_index / wrong argument count / broken payload / broken JSON", "N=1 each", "; ".join(out) + f"; tracebacks logged: {tracebacks}"))

        # Far over the cost cap on the CPU.
        r_path = await upload(client, bilevel_png(4096, 4096), name="cap.png")
        body = payload(r_path, "cap", steps=100)
        body["data"][4] = 10.0
        await client.post("/queue/join", json=body)
        async with client.stream("GET", "/queue/data", params={"session_hash": "cap"}) as stream:
            async for line in stream.aiter_lines():
                if '"process_completed"' in line:
                    message = (json.loads(line[5:]).get("output") or {}).get("error") or ""
                    break
        rows.append(("4096² PNG, 100 steps, guidance 10, on the CPU", "N=1", f"refused: {message[:160]!r}"))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--port", type=int, default=7990)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="deblurdiff-load-"))
    server = Server(args.port, tmp)
    try:
        rows = asyncio.run(main_async(args, server))
    finally:
        folder = server.folder
        left_before = disk_bytes(folder) if folder.exists() else 0
        t = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        try:
            code = server.proc.wait(30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            code = "killed after 30 s"
    leftovers = [p for p in tmp.rglob("*") if p.is_file() and p.name != "server.log"]
    rows.append(("SIGTERM", "N=1", f"exit {code} after {time.monotonic() - t:.1f} s; {left_before} bytes stored before, {len(leftovers)} files left after"))
    print("| test | N | result |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
