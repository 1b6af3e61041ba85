"""The downloader against the fault-injecting server: retries, redirects, limits, timeouts, robots."""

from __future__ import annotations

import time

import pytest

from tessera.dataprep.download import Downloader, DownloadError, robots_denies


def dl(**kw):
    base = dict(timeout=1.0, retries=2, max_bytes=1_000_000, max_redirects=3, backoff=0.05, user_agent="Tessera/0.1")
    base.update(kw)
    return Downloader(**base)


def test_success_and_keepalive(fault_server):
    d = dl()
    a = d.fetch(fault_server.url("/img/1.jpg"))
    b = d.fetch(fault_server.url("/redirect/1.jpg"))
    assert a.body == b.body == fault_server.image(1)
    assert b.url.endswith("/img/1.jpg")


def test_retry_after_500(fault_server):
    d = dl()
    assert d.fetch(fault_server.url("/flaky/7001.jpg")).body == fault_server.image(7001)
    assert fault_server.hits["/flaky/7001.jpg"] == 2
    with pytest.raises(DownloadError) as e:
        dl(retries=0).fetch(fault_server.url("/flaky/7002.jpg"))
    assert e.value.reason == "http_error" and "500" in e.value.message


@pytest.mark.parametrize(
    "path, reason",
    [
        ("/404", "http_error"),
        ("/loop/a", "too_many_redirects"),
        ("/big.jpg", "too_large"),
        ("/noai/1.jpg", "robots_noai"),
        ("/gone", "connection_error"),
    ],
)
def test_failures(fault_server, path, reason):
    with pytest.raises(DownloadError) as e:
        dl().fetch(fault_server.url(path))
    assert e.value.reason == reason


def test_timeout_bounds_the_request(fault_server):
    t = time.monotonic()
    with pytest.raises(DownloadError) as e:
        dl(timeout=0.5, retries=2).fetch(fault_server.url("/slow"))
    assert e.value.reason == "timeout" and time.monotonic() - t < 2.0


def test_schemes_and_size_limit_without_content_length(fault_server):
    with pytest.raises(DownloadError) as e:
        dl().fetch("file:///etc/passwd")
    assert e.value.reason == "scheme_not_allowed"
    with pytest.raises(DownloadError) as e:
        dl(max_bytes=1000).fetch(fault_server.url("/img/1.jpg"))  # refused from Content-Length
    assert e.value.reason == "too_large"
    with pytest.raises(DownloadError) as e:
        dl(max_bytes=100_000).fetch(fault_server.url("/nolength.jpg"))  # cut off while reading
    assert e.value.reason == "too_large" and "body exceeds" in e.value.message
    assert len(dl(max_bytes=10_000_000).fetch(fault_server.url("/nolength.jpg")).body) == fault_server.big_bytes


def test_robots_header_parsing():
    assert robots_denies(["noai"], "tessera")
    assert robots_denies(["noindex, noimageai"], "tessera")
    assert robots_denies(["tessera: noai"], "tessera")
    assert not robots_denies(["otherbot: noai"], "tessera")
    assert not robots_denies(["noindex"], "tessera")
    assert robots_denies(["otherbot: noindex", "noai"], "tessera")


def test_robots_can_be_ignored(fault_server):
    assert dl(respect_robots_header=False).fetch(fault_server.url("/noai/2.jpg")).body == fault_server.image(2)


@pytest.mark.parametrize(
    "url", ["http://exa mple.com/x.jpg", "http://127.0.0.1:99999/x.jpg", "http://[::1/x.jpg", "http:///x.jpg", "not a url"]
)
def test_malformed_urls_are_one_failure_each(url):
    with pytest.raises(DownloadError) as e:
        dl().fetch(url)
    assert e.value.reason in ("invalid_url", "scheme_not_allowed")


@pytest.fixture(scope="module")
def https_server(tmp_path_factory):
    """The image server behind TLS with a self-signed certificate for 127.0.0.1."""
    import shutil
    import ssl
    import subprocess
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(d / "key.pem"),
            "-out",
            str(d / "cert.pem"),
        ],
        check=True,
        capture_output=True,
    )
    body = b"\xff\xd8tls-body"

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    srv.handle_error = lambda *a: None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "cert.pem", d / "key.pem")
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{srv.server_address[1]}", d / "cert.pem", body
    srv.shutdown()


def test_https_verifies_certificates(https_server, monkeypatch):
    url, cert, body = https_server
    with pytest.raises(DownloadError) as e:
        dl().fetch(url + "/x.jpg")  # self-signed: refused, not retried
    assert e.value.reason == "connection_error" and "TLS" in e.value.message
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trusted through the standard variable
    assert dl().fetch(url + "/x.jpg").body == body
