"""The dVAE as a task of tessera.trainer.fit (paper App. A.2): images from ImageStream, the gumbel-softmax
objective of tessera.trainer.dvae_objective, PSNR/SSIM and reconstruction grids.

Cosine schedules: beta 0 -> kl_weight over kl_warmup_steps, temperature temp_start -> temp_end over
temp_anneal_steps, learning rate lr -> lr_min over lr_decay_steps; with the k-means warm start
(`codebook_init = "kmeans"`) the KL and temperature schedules begin after `init_steps`.

Every rank trains on its slice of the same global batches at any world size (tessera.trainer.data), and the
gumbel noise of row i of the global batch of step s comes from a generator of its own seeded with (seed, s, i),
whichever rank holds the row, and the diversity term is the global batch's (code_diversity_gap's
mean_over_ranks): the update is the same at 1, 2 or 4 ranks (up to float reassociation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tessera.cluster.dist import DistState
from tessera.core import config as C
from tessera.core.errors import CheckpointError
from tessera.dataprep.imaging import save_image_grid
from tessera.trainer.codebook_init import patch_codes
from tessera.trainer.data import ImageStream, iter_image_batches, rank_slice, resume_state
from tessera.trainer.dvae import DVAE
from tessera.trainer.dvae_objective import dvae_loss, evaluate, grid_tensor, kmeans_centroids, reconstruct, soft_psnr, weights_digest
from tessera.trainer.precision import autocast_dtype
from tessera.trainer.rundir import RunDir
from tessera.trainer.schedules import cosine, warmup_cosine


def warm_steps(tc) -> int:
    """Updates of the k-means warm start (0 without one)."""
    return tc.init_steps if tc.codebook_init == "kmeans" else 0


def schedules(tc, step: int) -> dict[str, float]:
    """lr over the whole run; the KL weight and temperature schedules start after the warm start."""
    main = max(0, step - warm_steps(tc))
    lr = (
        warmup_cosine(step, tc.lr, tc.lr_min, tc.warmup_steps, tc.lr_decay_steps)
        if tc.warmup_steps
        else cosine(step, tc.lr, tc.lr_min, tc.lr_decay_steps)
    )
    return {
        "lr": lr,
        "kl_weight": cosine(main, 0.0, tc.kl_weight, tc.kl_warmup_steps),
        "temp": cosine(main, tc.temp_start, tc.temp_end, tc.temp_anneal_steps),
    }


class DVAETask:
    """The dVAE for tessera.trainer.fit: images from ImageStream, the gumbel-softmax objective, PSNR/SSIM and reconstruction grids."""

    kind, unit = "dvae", "images"

    def __init__(self, root: Any, dist: DistState, run: RunDir):
        self.root, self.mc, self.tc, self.dist, self.run = root, root.dvae.model, root.dvae.train, dist, run
        self.device = dist.device
        self.mem = torch.channels_last if self.tc.channels_last else torch.contiguous_format
        self.local_batch = self.tc.batch_size // dist.world_size
        self.items_per_step = self.tc.batch_size
        self.dtype = autocast_dtype(self.tc.precision, self.device)
        self.centroids: torch.Tensor | None = None
        self.grid: tuple[int, torch.Tensor] | None = None

    def make_model(self) -> DVAE:
        return DVAE(self.mc).to(self.device).to(memory_format=self.mem)

    def build_model(self) -> DVAE:
        torch.manual_seed(self.root.seed)  # identical initial weights on every rank
        self.model = self.make_model()
        if self.tc.compile:
            self.model.compile()
        return self.model

    def param_groups(self, model: DVAE) -> list[dict]:
        return [{"params": list(model.parameters())}]

    def start(self, step: int, states: list | None, log) -> None:
        tc, dist = self.tc, self.dist
        self.stream = ImageStream(
            tc.train_data,
            image_size=self.mc.image_size,
            batch_size=tc.batch_size,  # global: this rank decodes its slice of each global batch
            seed=self.root.seed,
            rank=dist.rank,
            world=dist.world_size,
            workers=tc.workers,
            shuffle_buffer=tc.shuffle_buffer,
            state=resume_state(states),  # the same global position on every rank, whatever the world size it was saved at
        )
        if tc.codebook_init == "kmeans" and step < warm_steps(tc) and self.centroids is None:
            self.centroids, seconds = kmeans_centroids(self.root, dist, self.device)
            log(0, kmeans_time_s=round(seconds, 2), kmeans_images=tc.init_images)
        if step >= warm_steps(tc):
            self.centroids = None
        elif self.centroids is not None:
            self.centroids = self.centroids.to(self.device)

    def next_batch(self) -> torch.Tensor:
        return next(self.stream).to(self.device, non_blocking=True).contiguous(memory_format=self.mem)

    def schedules(self, step: int, horizon: int) -> dict[str, float]:
        return schedules(self.tc, step)

    def noise(self, step: int) -> list[torch.Generator]:
        """One gumbel-noise generator per row of this rank's slice, seeded by (seed, step, row in the global batch)."""
        lo, hi = rank_slice(self.tc.batch_size, self.dist.rank, self.dist.world_size)
        base = (self.root.seed * 1_000_003 + step) * 1_000_033
        return [torch.Generator(self.device).manual_seed(base + i) for i in range(lo, hi)]

    def loss(self, forward, x: torch.Tensor, step: int, sch: dict) -> tuple[torch.Tensor, dict]:
        tc = self.tc
        gen = self.noise(step)
        codes = (
            patch_codes(x, self.centroids, 2 ** (self.mc.n_groups - 1)) if self.centroids is not None and step < warm_steps(tc) else None
        )
        loss, terms = dvae_loss(
            forward,
            x,
            sch["temp"],
            sch["kl_weight"],
            tc.logit_laplace_eps,
            gen,
            None,
            tc.diversity_weight,
            tc.mse_weight,
            codes,
            mean_over_ranks=self.dist.all_reduce_mean,  # the diversity term of the global batch
        )
        metrics = {k: terms[k] for k in ("rec_nll", "kl", "diversity_gap", "mse", "init_ce", "init_acc") if k in terms}
        metrics["soft_psnr"] = lambda: soft_psnr(terms["soft_recon"], x, self.mc.channels)
        return loss, metrics

    def observe(self, step: int, row: dict) -> None:
        pass

    def evaluate(self, model: DVAE, step: int) -> dict[str, Any]:
        spec = self.tc.eval_data or self.tc.train_data
        m, grid = evaluate(model, spec, self.tc.eval_samples, max(self.local_batch, 64), self.device, self.dtype)
        self.grid = (step, grid)
        return {**m, "eval_on": "eval" if self.tc.eval_data else "train"}

    def sample(self, model: DVAE, step: int) -> None:
        if self.grid is None or self.grid[0] != step:
            x, _ = next(iter(iter_image_batches(self.tc.eval_data or self.tc.train_data, self.mc.image_size, 8, limit=8)))
            rec, _ = reconstruct(model.eval(), x.to(self.device), self.dtype)
            self.grid = (step, torch.cat([x.cpu(), rec.cpu()]))
        grid = self.grid[1]
        save_image_grid(grid, self.run.sample_path(step), nrow=grid.shape[0] // 2)
        self.run.metrics.image("reconstructions", step, grid_tensor(grid))

    def data_state(self) -> Any:
        return self.stream.state()

    def state_dict(self, step: int) -> dict[str, Any]:
        out = {"model_cfg": C.to_dict(self.mc), "seed": self.root.seed}
        if self.centroids is not None and step < warm_steps(self.tc):
            out["kmeans_centroids"] = self.centroids.cpu()
        return out

    def load_state_dict(self, client: dict, where: Path) -> None:
        if client.get("model_cfg") != C.to_dict(self.mc):
            raise CheckpointError(f"checkpoint in '{where}' holds a dVAE with another dvae.model config; use a new --output")
        self.centroids = client.get("kmeans_centroids")

    def summary(self, summary: dict, last_eval: dict) -> dict[str, Any]:
        return {"weights_sha256": weights_digest(self.model)}
