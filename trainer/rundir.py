"""Run directories: config.toml, metrics.jsonl, TensorBoard events, checkpoints, sample grids.

Layout of a run directory:
    config.toml            the resolved config (root sections), written at start
    metrics.jsonl          one JSON object per logged step ({"step", "time", ...})
    layout.json            the discovered ranks and groups (launcher, world, each rank's group and ordinal), by fit
    tb/                    TensorBoard event files
    checkpoints/step_XXXXXXXX.pt, checkpoints/latest.pt
    samples/step_XXXXXXXX.png

Checkpoint files themselves (kind, format, atomic write, `weights_only` load) are tessera.core.files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

from tessera.core import config as C
from tessera.core.files import save_checkpoint


class MetricsLogger:
    """Appends metric dicts to metrics.jsonl and mirrors scalars to TensorBoard (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._tb = None
        if enabled:
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
