"""Run directories: config.toml, metrics.jsonl, TensorBoard events, checkpoints, sample grids.

Layout of a run directory:
    config.toml            the resolved config (root sections), written at start
    metrics.jsonl          one JSON object per logged step ({"step", "time", ...})
    layout.json            the discovered ranks and groups (launcher, world, each rank's group and ordinal), by fit
    tb/                    TensorBoard event files
    checkpoints/step_XXXXXXXX.pt, checkpoints/latest.pt, checkpoints/manifest.json (sha256 and size of each kept
                           checkpoint's files, tessera.core.files; corrupt.* = a checkpoint found bad on resume, moved aside)
    samples/step_XXXXXXXX.png

Checkpoint files themselves (kind, format, atomic write, `weights_only` load) are tessera.core.files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from tessera.core import config as C
from tessera.core.files import atomic_write_bytes, checkpoint_bytes, digest, record_checkpoint


def _drop_partial_line(path: Path) -> None:
    """A run killed while appending a row can leave a last line without its newline: cut it off before appending again."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, 2)
        if f.read(1) == b"\n":
            return
        data = f.seek(0) or f.read()
        f.truncate(data.rfind(b"\n") + 1)


class MetricsLogger:
    """Appends metric dicts to metrics.jsonl and mirrors scalars to TensorBoard (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._tb = None
        if enabled:
            _drop_partial_line(self.path)
            # imported here: ~0.5 s per process on machine A, which ranks other than 0 and most CLI commands never need
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
        d = self.checkpoint_dir
        path = d / f"step_{step:08d}.pt"
        data = checkpoint_bytes(kind, state)
        atomic_write_bytes(path, data)
        # the manifest (checksums of the kept ones), then latest.pt (a copy, written atomically too), then pruning
        kept = sorted(d.glob("step_*.pt"))
        kept = kept[-keep_last:] if keep_last > 0 else kept
        record_checkpoint(d, path.name, step, [p.name for p in kept], {path.name: digest(data)})
        atomic_write_bytes(d / "latest.pt", data)
        for old in sorted(set(d.glob("step_*.pt")) - set(kept)):
            old.unlink(missing_ok=True)
        return path

    def sample_path(self, step: int, prefix: str = "step") -> Path:
        return self.path / "samples" / f"{prefix}_{step:08d}.png"

    def close(self) -> None:
        self.metrics.close()
