"""HTTP downloading for the crawler: one pooled keep-alive client per worker process, shared by its threads.

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

import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.exceptions import HTTPError, LocationParseError, ProtocolError, ReadTimeoutError

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


class Downloader:
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
        self.pool = urllib3.PoolManager(
            num_pools=max(16, pool_size),
            maxsize=pool_size,
            block=False,
            retries=False,
            headers={"User-Agent": user_agent, "Accept": "image/*,*/*;q=0.8"},
        )

    def _check_scheme(self, url: str) -> None:
        try:
            parts = urlsplit(url)
        except ValueError as e:
            raise DownloadError("invalid_url", f"invalid URL: {e}") from None
        if parts.scheme.lower() not in self.allowed:
            raise DownloadError("scheme_not_allowed", f"URL scheme '{parts.scheme}' not allowed (allowed: {', '.join(self.allowed)})")
        if not parts.netloc:
            raise DownloadError("invalid_url", "invalid URL: no host")

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

    def _fetch_once(self, url: str) -> Fetched:
        deadline = time.monotonic() + self.timeout
        current = url
        for _hop in range(self.max_redirects + 1):
            self._check_scheme(current)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DownloadError("timeout", f"timed out after {self.timeout:g}s")
            try:
                resp = self.pool.urlopen(
                    "GET",
                    current,
                    redirect=False,
                    retries=False,
                    preload_content=False,
                    timeout=urllib3.Timeout(connect=remaining, read=remaining),
                )
            except LocationParseError as e:
                raise DownloadError("invalid_url", f"invalid URL: {e}") from None
            except urllib3.exceptions.ReadTimeoutError:
                raise DownloadError("timeout", f"timed out after {self.timeout:g}s") from None
            except (urllib3.exceptions.ConnectTimeoutError, urllib3.exceptions.NewConnectionError, ProtocolError, urllib3.exceptions.SSLError) as e:
                raise _Transient("connection_error", f"connection error: {_short(e)}") from None
            except HTTPError as e:
                raise _Transient("connection_error", f"connection error: {_short(e)}") from None
            except (ValueError, UnicodeError) as e:
                raise DownloadError("invalid_url", f"invalid URL: {_short(e)}") from None
            done = False
            try:
                status = resp.status
                if status in REDIRECT_CODES:
                    loc = resp.headers.get("Location")
                    if not loc:
                        raise DownloadError("http_error", f"HTTP {status} without Location")
                    current = urljoin(current, loc)
                    continue
                if status == 429 or 500 <= status < 600:
                    ra = resp.headers.get("Retry-After")
                    raise _Transient("http_error", f"HTTP {status}", _retry_after(ra))
                if status != 200:
                    raise DownloadError("http_error", f"HTTP {status}")
                if self.respect_robots:
                    tags = resp.headers.getlist("X-Robots-Tag")
                    if tags and robots_denies(tags, self.agent_token):
                        raise DownloadError("robots_noai", "X-Robots-Tag forbids AI use")
                length = resp.headers.get("Content-Length")
                if length is not None and length.isdigit() and int(length) > self.max_bytes:
                    raise DownloadError("too_large", f"Content-Length {length} exceeds max_bytes {self.max_bytes}")
                body = self._read_body(resp, deadline)
                done = True
                return Fetched(body=body, url=current, content_type=resp.headers.get("Content-Type", ""))
            finally:
                self._finish(resp, done)
        raise DownloadError("too_many_redirects", f"more than {self.max_redirects} redirects")

    @staticmethod
    def _finish(resp: urllib3.BaseHTTPResponse, body_read: bool) -> None:
        """Give the connection back to the pool when its response is fully consumed, else drop it."""
        try:
            if not body_read:
                length = resp.headers.get("Content-Length")
                if length is not None and length.isdigit() and int(length) <= 65536 and not resp.closed:
                    resp.drain_conn()  # a small redirect/error body: read it so the socket stays usable
                else:
                    resp.close()
        except Exception:
            resp.close()
        resp.release_conn()

    def _read_body(self, resp: urllib3.BaseHTTPResponse, deadline: float) -> bytes:
        chunks = []
        total = 0
        try:
            while True:
                if time.monotonic() > deadline:
                    resp.close()
                    raise DownloadError("timeout", f"timed out after {self.timeout:g}s")
                chunk = resp.read(1 << 18)
                if not chunk:
                    break
                total += len(chunk)
                if total > self.max_bytes:
                    resp.close()
                    raise DownloadError("too_large", f"body exceeds max_bytes {self.max_bytes}")
                chunks.append(chunk)
        except ReadTimeoutError:
            resp.close()
            raise DownloadError("timeout", f"timed out after {self.timeout:g}s") from None
        except (ProtocolError, HTTPError, OSError) as e:
            resp.close()
            raise _Transient("connection_error", f"connection error while reading: {_short(e)}") from None
        return b"".join(chunks)

    def close(self) -> None:
        self.pool.clear()


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
