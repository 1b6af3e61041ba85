"""Where shards go: a local folder or an S3 prefix, with the same small set of atomic operations.

- `LocalStorage`: every file is written to a hidden temporary name in the same folder, fsynced and
  renamed, so nothing half-written carries a final name.
- `S3Storage` (boto3): a PUT is atomic per object (an object appears whole or not at all); the
  crawler uploads a shard's files and then its `_stats.json` last, which marks the shard complete.
  The endpoint comes from `endpoint_url`, else from boto3's own settings (`AWS_ENDPOINT_URL_S3`,
  `AWS_ENDPOINT_URL`, profiles), so S3-compatible stores and moto's server work alike.

Names are flat file names inside the output; a name with a separator or `..` is refused.

`s3_client(endpoint_url)` is the one place S3 clients are made (the shard reader in
tessera.dataprep.shards uses it too): one client per process and settings.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tessera.core.errors import InputError

# the settings a client depends on besides an explicit endpoint: a change (another test server) makes a new client
_S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_PROFILE")
_CLIENTS: dict[tuple, Any] = {}
_CLIENTS_LOCK = threading.Lock()


def s3_client(endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client: `endpoint_url` when given, else boto3's own settings (AWS_ENDPOINT_URL_S3,
    AWS_ENDPOINT_URL, profiles). Cached per process (data-loader workers are forked) and settings."""
    import boto3

    key = (os.getpid(), endpoint_url or None, *(os.environ.get(k) for k in _S3_ENV))
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            # a session of its own: boto3's default session is not safe to share between threads
            _CLIENTS[key] = boto3.session.Session().client("s3", endpoint_url=endpoint_url or None)
        return _CLIENTS[key]


_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def check_name(name: str) -> str:
    """A flat, safe file name (no folders, no `..`, no leading dot); else InputError naming it."""
    if not _SAFE_NAME.match(name) or ".." in name:
        raise InputError(f"refusing unsafe output file name '{name}'")
    return name


def is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


class LocalStorage:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise InputError(f"output '{self.root}' exists and is not a folder")

    def __str__(self) -> str:
        return str(self.root)

    def prepare(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"output folder '{self.root}' cannot be created: {e.strerror}") from None

    def list(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir())

    def exists(self, name: str) -> bool:
        return (self.root / check_name(name)).exists()

    def read_bytes(self, name: str) -> bytes:
        return (self.root / check_name(name)).read_bytes()

    def write_bytes(self, name: str, data: bytes) -> None:
        final = self.root / check_name(name)
        tmp = self.root / f".{name}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)

    def delete(self, name: str) -> None:
        try:
            (self.root / check_name(name)).unlink()
        except FileNotFoundError:
            pass

    def clean_temporaries(self, names: set[str]) -> int:
        """Remove leftover temporary files (`.NAME.tmpPID`) of the given final names."""
        n = 0
        if not self.root.is_dir():
            return 0
        for p in self.root.iterdir():
            if p.name.startswith(".") and ".tmp" in p.name:
                base = p.name[1:].rsplit(".tmp", 1)[0]
                if base in names:
                    p.unlink(missing_ok=True)
                    n += 1
        return n


class S3Storage:
    def __init__(self, url: str, endpoint_url: str | None = None):
        parts = urlsplit(url)
        self.bucket = parts.netloc
        prefix = parts.path.strip("/")
        if not self.bucket:
            raise InputError(f"output '{url}' names no bucket; expected s3://bucket/prefix")
        if any(seg in ("..", ".") for seg in prefix.split("/")):
            raise InputError(f"output '{url}' has '.' or '..' in its prefix")
        self.prefix = prefix + "/" if prefix else ""
        self.url = url
        self.client = s3_client(endpoint_url)

    def __str__(self) -> str:
        return self.url

    def _key(self, name: str) -> str:
        return self.prefix + check_name(name)

    def prepare(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as e:
            raise InputError(f"output bucket '{self.bucket}' is not reachable: {str(e).splitlines()[0]}") from None

    def list(self) -> list[str]:
        names = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
            for obj in page.get("Contents", []):
                rest = obj["Key"][len(self.prefix) :]
                if rest and "/" not in rest:
                    names.append(rest)
        return sorted(names)

    def exists(self, name: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(name))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def read_bytes(self, name: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()

    def write_bytes(self, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)

    def delete(self, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(name))

    def clean_temporaries(self, names: set[str]) -> int:
        return 0  # S3 objects appear whole; there is nothing temporary to clean


def open_storage(output: str | Path, endpoint_url: str | None = None) -> LocalStorage | S3Storage:
    if is_s3(str(output)):
        return S3Storage(str(output), endpoint_url)
    return LocalStorage(output)
