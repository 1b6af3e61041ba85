"""Fixtures for the crawler tests: the fault-injecting HTTP server and moto's S3 server, both real
servers on 127.0.0.1 with ephemeral ports."""

from __future__ import annotations

import os

import pytest
from crawl_helpers import FaultServer


@pytest.fixture(scope="session")
def fault_server():
    s = FaultServer(slow_s=3.0)
    yield s
    s.close()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3-protocol server on 127.0.0.1 (a real HTTP server, not in-process patching)."""
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
