"""Run directories: config.toml, metrics.jsonl, TensorBoard events, checkpoints, sample grids.

Layout of a run directory:
    config.toml            the resolved config (root sections), written at start
    metrics.jsonl          one JSON object per logged step ({"step", "time", ...})
    tb/                    TensorBoard event files
    checkpoints/step_XXXXXXXX.pt, checkpoints/latest.pt
    samples/step_XXXXXXXX.png

Checkpoints are state dicts plus config and kind, never pickled modules; they are written to a
temporary name and renamed, and loaded with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from tessera import config as C
from tessera.errors import CheckpointError, InputError

CHECKPOINT_FORMAT = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


class MetricsLogger:
    """Appends metric dicts to metrics.jsonl and mirrors scalars to TensorBoard (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tb"))

    def log(self, step: int, **metrics: Any) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "time": round(time.time(), 3)}
        for k, v in metrics.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            row[k] = v
            if isinstance(v, (int, float)) and self._tb is not None:
                self._tb.add_scalar(k, v, step)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def image(self, tag: str, step: int, grid_chw: torch.Tensor) -> None:
        if self._tb is not None:
            self._tb.add_image(tag, grid_chw.clamp(0, 1), step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


class RunDir:
    """A training run's directory. `resume=True` accepts an existing directory with checkpoints."""

    def __init__(self, path: str | Path, cfg: Any, *, rank: int = 0, resume: bool = True):
        self.path = Path(path)
        self.rank = rank
        self.is_main = rank == 0
        if self.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "checkpoints").mkdir(exist_ok=True)
            (self.path / "samples").mkdir(exist_ok=True)
            C.write_toml(cfg, self.path / "config.toml")
        self.metrics = MetricsLogger(self.path, enabled=self.is_main)

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        p = self.checkpoint_dir / "latest.pt"
        return p if p.exists() else None

    def save_checkpoint(self, kind: str, step: int, state: dict[str, Any], keep_last: int = 2) -> Path | None:
        if not self.is_main:
            return None
        path = self.checkpoint_dir / f"step_{step:08d}.pt"
        save_checkpoint(path, kind, state)
        # latest.pt: a copy, written atomically too, so that a crash never leaves it truncated
        save_checkpoint(self.checkpoint_dir / "latest.pt", kind, state)
        olds = sorted(self.checkpoint_dir.glob("step_*.pt"))
        for old in olds[:-keep_last] if keep_last > 0 else []:
            old.unlink(missing_ok=True)
        return path

    def sample_path(self, step: int, prefix: str = "step") -> Path:
        return self.path / "samples" / f"{prefix}_{step:08d}.png"

    def close(self) -> None:
        self.metrics.close()


def save_checkpoint(path: str | Path, kind: str, state: dict[str, Any]) -> None:
    """Save `state` (tensors, numbers, strings, dicts, lists) with its kind, atomically."""
    import io

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


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, pad: int = 2) -> None:
    """Write a (N, 3, H, W) batch in [0, 1] as one PNG grid (atomically)."""
    import io

    import numpy as np
    from PIL import Image

    images = images.detach().float().clamp(0, 1).cpu()
    n, c, h, w = images.shape
    ncol = min(nrow, n)
    nrows = (n + ncol - 1) // ncol
    grid = torch.ones(c, nrows * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(n):
        r, q = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[:, y : y + h, x : x + w] = images[i]
    arr = (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
