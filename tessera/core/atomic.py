"""Files written atomically: to a temporary name in the same folder, flushed to disk, then renamed, so that a crash
never leaves a half-written file under its final name. Without torch, so that the crawler's worker processes
(tessera.dataprep.crawl_worker) start without importing it; checkpoints live in tessera.core.files."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
