"""Helpers of the crawler tests: a fault-injecting HTTP server (a real ThreadingHTTPServer on
127.0.0.1, ephemeral port) and small deterministic test images. Fixtures are in conftest.py."""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image


def noisy_jpeg(seed: int, size: tuple[int, int] = (96, 72), quality: int = 90) -> bytes:
    """A deterministic JPEG: a colour gradient plus noise, distinct per seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 256, 3)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(base[c] + xx * (c + 1) * 2 + yy * (3 - c)) % 256 for c in range(3)], axis=-1).astype(np.float32)
    img += rng.normal(0, 12, img.shape)
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_header_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit greyscale PNG of width x height (all black), small on the wire (~50 KB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    comp = zlib.compressobj(9)
    parts = [comp.compress(row * 1000) for _ in range(height // 1000)]
    parts.append(comp.compress(row * (height % 1000)))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


class FaultServer:
    """Routes:
    /img/N.jpg        a distinct noisy JPEG per N (GET count recorded)
    /alias/N.jpg      the same bytes as /img/N.jpg (a duplicate under another URL)
    /delay/N.jpg      the same bytes as /img/N.jpg after `delay_s` seconds
    /404              404
    /flaky/N.jpg      500 on the first request for N, then the image
    /slow             sleeps `slow_s` before answering
    /truncated.jpg    the first half of a JPEG
    /html.jpg         HTML served as image/jpeg
    /bomb.png         a 20000x20000 PNG
    /loop/a, /loop/b  redirect to each other forever
    /redirect/N.jpg   302 to /img/N.jpg
    /big.jpg          a body of `big_bytes` bytes
    /noai/N.jpg       the image with X-Robots-Tag: noai
    /nolength.jpg     `big_bytes` bytes without Content-Length
    /gone             closes the connection without answering
    """

    def __init__(self, slow_s: float = 3.0, big_bytes: int = 3_000_000):
        self.slow_s = slow_s
        self.big_bytes = big_bytes
        self.delay_s = 0.03
        self.hits: dict[str, int] = {}
        self.lock = threading.Lock()
        self._images: dict[int, bytes] = {}
        self._bomb = png_header_bomb()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _send(self, code: int, body: bytes, ctype: str = "image/jpeg", headers: dict | None = None):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self):  # noqa: N802
                path = self.path.split("?", 1)[0]
                with server.lock:
                    server.hits[path] = server.hits.get(path, 0) + 1
                    count = server.hits[path]
                parts = path.strip("/").split("/")
                num = None
                if parts and parts[-1].endswith((".jpg", ".png")):
                    stem = parts[-1].rsplit(".", 1)[0]
                    num = int(stem) if stem.isdigit() else None
                if parts[0] == "delay" and num is not None:
                    time.sleep(server.delay_s)
                    return self._send(200, server.image(num))
                if parts[0] in ("img", "alias") and num is not None:
                    return self._send(200, server.image(num))
                if parts[0] == "404":
                    return self._send(404, b"not found", "text/plain")
                if parts[0] == "flaky" and num is not None:
                    if count == 1:
                        return self._send(500, b"try again", "text/plain")
                    return self._send(200, server.image(num))
                if parts[0] == "slow":
                    time.sleep(server.slow_s)
                    return self._send(200, server.image(0))
                if parts[0] == "truncated.jpg":
                    data = server.image(1)
                    return self._send(200, data[: len(data) // 2])
                if parts[0] == "html.jpg":
                    return self._send(200, b"<html><body>not an image</body></html>")
                if parts[0] == "bomb.png":
                    return self._send(200, server._bomb, "image/png")
                if parts[0] == "loop":
                    other = "b" if parts[-1] == "a" else "a"
                    return self._send(302, b"", "text/plain", {"Location": f"/loop/{other}"})
                if parts[0] == "redirect" and num is not None:
                    return self._send(302, b"", "text/plain", {"Location": f"/img/{num}.jpg"})
                if parts[0] == "big.jpg":
                    return self._send(200, b"\xff" * server.big_bytes)
                if parts[0] == "noai" and num is not None:
                    return self._send(200, server.image(num), headers={"X-Robots-Tag": "noai"})
                if parts[0] == "nolength.jpg":  # body delimited by closing the connection
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(b"\xff" * server.big_bytes)
                    self.close_connection = True
                    return
                if parts[0] == "gone":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                return self._send(404, b"no route", "text/plain")

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # clients that hang up are part of the tests
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def image(self, n: int) -> bytes:
        with self.lock:
            if n not in self._images:
                self._images[n] = noisy_jpeg(n)
            return self._images[n]

    def url(self, path: str) -> str:
        return self.base + path

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
