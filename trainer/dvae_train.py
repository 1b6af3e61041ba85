"""Training the dVAE (paper App. A.2): `train_dvae(...)` (`tessera train dvae`), the task
tessera.trainer.dvae_task.DVAETask run by the one loop, tessera.trainer.fit.

Exact resume: the loop's checkpoint holds model, optimizer, EMA, step, every rank's data position
and RNG state, and the k-means centroids while the warm start is unfinished.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from tessera.cluster.dist import DistState
from tessera.core.errors import ConfigError
from tessera.trainer.dvae_objective import code_diversity_gap, dvae_loss, kmeans_centroids
from tessera.trainer.dvae_task import DVAETask, schedules
from tessera.trainer.fit import fit
from tessera.trainer.rundir import RunDir


def train_dvae(
    cfg_root: Any, data: str | None = None, eval_data: str | None = None, output: str | Path = "runs/dvae", dist: DistState | None = None
) -> dict[str, Any]:
    """Train (or resume) a dVAE in `output` on image shards `data` (else dvae.train.train_data); returns the summary."""
    dist = dist or DistState()
    given = {k: v for k, v in (("train_data", data), ("eval_data", eval_data)) if v}
    tc = dataclasses.replace(cfg_root.dvae.train, **given)
    if not tc.train_data:
        raise ConfigError("config key 'dvae.train.train_data': no training shards given (use --data SHARDS)")
    if tc.batch_size % dist.world_size:
        raise ConfigError(
            f"config key 'dvae.train.batch_size': expected a multiple of the world size {dist.world_size}, got {tc.batch_size}"
        )
    root = dataclasses.replace(cfg_root, dvae=dataclasses.replace(cfg_root.dvae, train=tc))
    run = RunDir(output, root, rank=dist.rank)
    return fit(DVAETask(root, dist, run), tc, run, dist, root.cluster)


__all__ = ["train_dvae", "DVAETask", "schedules", "dvae_loss", "code_diversity_gap", "kmeans_centroids"]
