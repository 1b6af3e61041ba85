"""Files written atomically, and checkpoint files.

Everything the pipeline writes goes to a temporary name in the same folder, is flushed to disk and
then renamed, so a crash never leaves a half-written file under a final name. Checkpoints are state
dicts plus their kind and format, never pickled modules; they are loaded with `weights_only=True`.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from tessera.core.errors import CheckpointError, InputError

CHECKPOINT_FORMAT = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def save_checkpoint(path: str | Path, kind: str, state: dict[str, Any]) -> None:
    """Save `state` (tensors, numbers, strings, dicts, lists) with its kind, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"kind": kind, "format": CHECKPOINT_FORMAT, **state}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path, kind: str | tuple[str, ...], map_location: str = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`, checking its kind.

    A run directory is accepted too (its checkpoints/latest.pt). Raises CheckpointError with one
    line naming the file for a missing, truncated, corrupt, or other-kind checkpoint.
    """
    path = Path(path)
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    if path.is_dir():
        cand = path / "checkpoints" / "latest.pt"
        if not cand.exists():
            raise CheckpointError(f"run directory '{path}' holds no checkpoint (expected {cand})")
        path = cand
    if not path.exists():
        raise InputError(f"checkpoint '{path}' does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, wrong format, pickled modules refused by weights_only
        raise CheckpointError(f"checkpoint '{path}' is truncated or corrupt ({type(e).__name__})") from None
    if not isinstance(obj, dict) or "kind" not in obj:
        raise CheckpointError(f"checkpoint '{path}' is not a Tessera checkpoint (no 'kind' entry)")
    if obj["kind"] not in kinds:
        raise CheckpointError(f"checkpoint '{path}' is a '{obj['kind']}' checkpoint, expected {' or '.join(repr(k) for k in kinds)}")
    return obj
