"""HTTP downloading for the crawler: one keep-alive client per worker process, a connection per thread and host.

`Downloader.fetch(url)` returns the body bytes or raises `DownloadError(reason, message)`:
- only the configured schemes (http/https by default) are fetched, on the first URL and after every redirect;
- redirects are followed by hand, at most `max_redirects` of them (a loop ends as `too_many_redirects`);
- a body larger than `max_bytes` is refused from its Content-Length, or cut off while reading (after
  content decoding, so a gzip bomb is caught too);
- `timeout` bounds the whole request (connect, headers and body), not only each socket read;
- connection errors, 429 and 5xx are retried `retries` times with exponential backoff (Retry-After is
  honoured up to a cap); a response that is merely slow is not retried: it already cost a full timeout;
- `X-Robots-Tag: noai` / `noimageai` (bare or addressed to our user agent or to all) refuses the
  image, as img2dataset does.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
import zlib
from dataclasses import dataclass
from urllib.parse import quote, urljoin, urlsplit

REDIRECT_CODES = (301, 302, 303, 307, 308)
ROBOTS_DENY = ("noai", "noimageai")
MAX_RETRY_AFTER = 10.0


class DownloadError(Exception):
    """A row that could not be downloaded: `reason` is a short code counted in the stats."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class Fetched:
    body: bytes
    url: str  # the final URL after redirects
    content_type: str


def robots_denies(header_values: list[str], agent_token: str) -> bool:
    """True when an X-Robots-Tag value forbids AI use for everyone or for `agent_token`.

    A value is a comma-separated list of directives, optionally prefixed by `agent:`
    (e.g. `otherbot: noai, noindex`); directives addressed to another agent are ignored.
    """
    agent_token = agent_token.lower()
    for value in header_values:
        target = None
        for part in value.split(","):
            part = part.strip().lower()
            if ":" in part:
                name, _, rest = part.partition(":")
                name = name.strip()
                if name and " " not in name and name not in ROBOTS_DENY:
                    target = name
                    part = rest.strip()
            if part in ROBOTS_DENY and (target is None or target in ("*", agent_token)):
                return True
    return False


class _Connections(threading.local):
    """Each thread's keep-alive connections, one per (scheme, host, port)."""

    def __init__(self) -> None:
        self.conns: dict[tuple[str, str, int], http.client.HTTPConnection] = {}


class Downloader:
    """A lean HTTP/1.1 client on `http.client`: per-thread keep-alive connections, no per-request
    pool bookkeeping (about a quarter of urllib3's CPU per request on loopback, see bench_crawl)."""

    def __init__(
        self,
        *,
        timeout: float = 10.0,
        retries: int = 2,
        max_bytes: int = 20_000_000,
        max_redirects: int = 5,
        allowed_schemes: tuple[str, ...] | list[str] = ("http", "https"),
        user_agent: str = "Tessera",
        respect_robots_header: bool = True,
        backoff: float = 0.5,
        pool_size: int = 32,
    ):
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.max_bytes = int(max_bytes)
        self.max_redirects = int(max_redirects)
        self.allowed = tuple(s.lower() for s in allowed_schemes)
        self.user_agent = user_agent
        self.agent_token = user_agent.split("/", 1)[0].strip().lower()
        self.respect_robots = respect_robots_header
        self.backoff = float(backoff)
        self._local = _Connections()
        self._all: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._ssl = None
        self.headers = {"User-Agent": user_agent, "Accept": "image/*,*/*;q=0.8", "Accept-Encoding": "identity"}

    def _split(self, url: str) -> tuple[str, str, int, str]:
        try:
            parts = urlsplit(url)
            scheme = parts.scheme.lower()
            host = parts.hostname
            port = parts.port
        except ValueError as e:
            raise DownloadError("invalid_url", f"invalid URL: {e}") from None
        if scheme not in self.allowed:
            raise DownloadError("scheme_not_allowed", f"URL scheme '{parts.scheme}' not allowed (allowed: {', '.join(self.allowed)})")
        if scheme not in ("http", "https"):
            raise DownloadError("scheme_not_allowed", f"URL scheme '{scheme}' is not supported by the HTTP client")
        if not host:
            raise DownloadError("invalid_url", "invalid URL: no host")
        if not host.isascii():
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError as e:
                raise DownloadError("invalid_url", f"invalid host name: {e}") from None
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        path = quote(path, safe="/?&=%:@!$'()*+,;~-._")
        return scheme, host, port or (443 if scheme == "https" else 80), path

    def _conn(self, scheme: str, host: str, port: int, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        key = (scheme, host, port)
        c = self._local.conns.get(key)
        if c is not None:
            return c, True
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            c = http.client.HTTPSConnection(host, port, timeout=timeout, context=self._ssl)
        else:
            c = http.client.HTTPConnection(host, port, timeout=timeout)
        self._local.conns[key] = c
        with self._lock:
            self._all.append(c)
        return c, False

    def _drop(self, scheme: str, host: str, port: int) -> None:
        c = self._local.conns.pop((scheme, host, port), None)
        if c is not None:
            c.close()

    def fetch(self, url: str) -> Fetched:
        """Download `url`, following redirects and retrying transient failures."""
        if not url:
            raise DownloadError("invalid_url", "empty URL")
        attempt = 0
        while True:
            try:
                return self._fetch_once(url)
            except _Transient as t:
                if attempt >= self.retries:
                    raise DownloadError(t.reason, t.message) from None
                delay = self.backoff * (2**attempt)
                if t.retry_after is not None:
                    delay = max(delay, min(t.retry_after, MAX_RETRY_AFTER))
                time.sleep(delay)
                attempt += 1

    def _request(self, scheme: str, host: str, port: int, path: str, deadline: float) -> http.client.HTTPResponse:
        """Send a GET and read the headers; a kept-alive socket the server closed meanwhile is
        replaced once without counting as a retry."""
        for fresh_try in (False, True):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DownloadError("timeout", f"timed out after {self.timeout:g}s")
            try:
                conn, reused = self._conn(scheme, host, port, remaining)
            except (ValueError, http.client.HTTPException) as e:  # InvalidURL: spaces or control characters in the host
                raise DownloadError("invalid_url", f"invalid URL: {_short(e)}") from None
            try:
                if conn.sock is not None:
                    conn.sock.settimeout(remaining)
                else:
                    conn.timeout = remaining
                conn.request("GET", path, headers=self.headers)
                return conn.getresponse()
            except (socket.timeout, TimeoutError):
                connecting = conn.sock is None
                self._drop(scheme, host, port)
                if connecting:  # the host did not accept a connection in time: transient, retried
                    raise _Transient("connection_error", f"connect timed out after {self.timeout:g}s") from None
                raise DownloadError("timeout", f"timed out after {self.timeout:g}s") from None
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, http.client.BadStatusLine) as e:
                self._drop(scheme, host, port)
                if reused and not fresh_try:
                    continue
                raise _Transient("connection_error", f"connection error: {_short(e)}") from None
            except (OSError, http.client.HTTPException) as e:
                self._drop(scheme, host, port)
                if isinstance(e, ssl.SSLError):
                    raise DownloadError("connection_error", f"TLS error: {_short(e)}") from None
                raise _Transient("connection_error", f"connection error: {_short(e)}") from None
            except (ValueError, UnicodeError) as e:
                self._drop(scheme, host, port)
                raise DownloadError("invalid_url", f"invalid URL: {_short(e)}") from None
        raise AssertionError("unreachable")

    def _fetch_once(self, url: str) -> Fetched:
        deadline = time.monotonic() + self.timeout
        current = url
        for _hop in range(self.max_redirects + 1):
            scheme, host, port, path = self._split(current)
            resp = self._request(scheme, host, port, path, deadline)
            done = False
            try:
                status = resp.status
                if status in REDIRECT_CODES:
                    loc = resp.getheader("Location")
                    if not loc:
                        raise DownloadError("http_error", f"HTTP {status} without Location")
                    current = urljoin(current, loc.strip())
                    continue
                if status == 429 or 500 <= status < 600:
                    raise _Transient("http_error", f"HTTP {status}", _retry_after(resp.getheader("Retry-After")))
                if status != 200:
                    raise DownloadError("http_error", f"HTTP {status}")
                if self.respect_robots:
                    tags = resp.headers.get_all("X-Robots-Tag") or []
                    if tags and robots_denies(tags, self.agent_token):
                        raise DownloadError("robots_noai", "X-Robots-Tag forbids AI use")
                length = resp.getheader("Content-Length")
                if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
                    raise DownloadError("too_large", f"Content-Length {length.strip()} exceeds max_bytes {self.max_bytes}")
                body = self._read_body(resp, deadline)
                enc = (resp.getheader("Content-Encoding") or "identity").strip().lower()
                if enc in ("gzip", "x-gzip", "deflate"):
                    body = self._decompress(body, enc)
                done = True
                return Fetched(body=body, url=current, content_type=resp.getheader("Content-Type") or "")
            finally:
                self._finish(resp, done, scheme, host, port, deadline)
        raise DownloadError("too_many_redirects", f"more than {self.max_redirects} redirects")

    def _finish(self, resp: http.client.HTTPResponse, body_read: bool, scheme: str, host: str, port: int, deadline: float) -> None:
        """Keep the connection when its response was consumed (or is a small redirect/error body we can read), else drop it."""
        try:
            if not body_read and not resp.isclosed():
                length = resp.getheader("Content-Length")
                if length is not None and length.strip().isdigit() and int(length) <= 65536 and time.monotonic() < deadline:
                    resp.read()
                else:
                    resp.close()
                    self._drop(scheme, host, port)
                    return
            if resp.will_close:
                self._drop(scheme, host, port)
        except Exception:
            self._drop(scheme, host, port)

    def _read_body(self, resp: http.client.HTTPResponse, deadline: float) -> bytes:
        chunks = []
        total = 0
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DownloadError("timeout", f"timed out after {self.timeout:g}s")
                if resp.fp is not None and hasattr(resp.fp, "raw"):
                    try:
                        resp.fp.raw._sock.settimeout(remaining)  # type: ignore[union-attr]
                    except AttributeError:
                        pass
                chunk = resp.read1(1 << 18)
                if not chunk:
                    break
                total += len(chunk)
                if total > self.max_bytes:
                    raise DownloadError("too_large", f"body exceeds max_bytes {self.max_bytes}")
                chunks.append(chunk)
            # read1 never closes a Content-Length response it consumed exactly; read() does, which
            # frees the connection for its next request.
            if not resp.isclosed():
                rest = resp.read()
                if rest:
                    chunks.append(rest)
        except (socket.timeout, TimeoutError):
            raise DownloadError("timeout", f"timed out after {self.timeout:g}s") from None
        except (http.client.IncompleteRead, OSError, http.client.HTTPException) as e:
            raise _Transient("connection_error", f"connection error while reading: {_short(e)}") from None
        return b"".join(chunks)

    def _decompress(self, body: bytes, enc: str) -> bytes:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS if "gzip" in enc else zlib.MAX_WBITS)
        try:
            out = d.decompress(body, self.max_bytes + 1)
        except zlib.error as e:
            raise DownloadError("connection_error", f"bad {enc} body: {e}") from None
        if len(out) > self.max_bytes:
            raise DownloadError("too_large", f"decoded body exceeds max_bytes {self.max_bytes}")
        return out

    def close(self) -> None:
        with self._lock:
            for c in self._all:
                c.close()
            self._all.clear()


class _Transient(Exception):
    def __init__(self, reason: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


def _retry_after(value: str | None) -> float | None:
    if value and value.strip().isdigit():
        return float(value.strip())
    return None


def _short(e: BaseException) -> str:
    s = str(e).splitlines()[0] if str(e) else type(e).__name__
    return s[:200]
