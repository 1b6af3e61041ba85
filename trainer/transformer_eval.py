"""The transformer task's evaluation and periodic samples: held-out loss, and grids of fixed captions decoded by the manifest's dVAE."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tessera.dataprep.imaging import save_image_grid
from tessera.trainer.config import TransformerModelConfig
from tessera.trainer.dvae import load_dvae
from tessera.trainer.precision import autocast, autocast_dtype
from tessera.trainer.rundir import RunDir
from tessera.trainer.sample import sample_codes
from tessera.trainer.token_data import TokenManifest, load_token_set
from tessera.trainer.transformer import DALLE


def fixed_sample_captions(data: str, mcfg: TransformerModelConfig, n: int) -> tuple[torch.Tensor, list[str]]:
    """The first n distinct captions of the shards: the prompts of the periodic sample grids."""
    text, _, caps = load_token_set(data, mcfg.text_len, mcfg.text_vocab, mcfg.image_grid, limit=max(4 * n, n))
    seen, rows, out = set(), [], []
    for i, c in enumerate(caps):
        if c not in seen:
            seen.add(c)
            rows.append(i)
            out.append(c)
        if len(rows) == n:
            break
    return text[rows], out


@torch.no_grad()
def eval_loss(model: DALLE, text: torch.Tensor, image: torch.Tensor, tcfg: Any, device: torch.device, batch: int = 64) -> dict[str, float]:
    was = model.training
    model.eval()
    sums = {"loss": 0.0, "text_ce": 0.0, "image_ce": 0.0}
    n = 0
    for i in range(0, text.shape[0], batch):
        t, im = text[i : i + batch].to(device), image[i : i + batch].to(device)
        with autocast(autocast_dtype(tcfg.precision, device), device):
            out = model.loss(t, im, tcfg.image_loss_weight)
        for k in sums:
            sums[k] += float(out[k]) * t.shape[0]
        n += t.shape[0]
    model.train(was)
    return {f"eval_{k}": v / n for k, v in sums.items()}


class Sampler:
    """Periodic sample grids decoded with the manifest's dVAE (skipped when it names none)."""

    def __init__(self, manifest: TokenManifest, data: str, mcfg: TransformerModelConfig, sample_cfg: Any, device: torch.device, n: int = 8):
        self.dvae = None
        path = manifest.resolve(manifest.dvae)
        if path and Path(path).exists():
            self.dvae, _ = load_dvae(path)
            self.dvae.to(device)
        self.text, self.captions = fixed_sample_captions(data, mcfg, n)
        self.cfg, self.device = sample_cfg, device

    def __call__(self, model: DALLE, run: RunDir, step: int) -> Path | None:
        if self.dvae is None:
            return None
        g = torch.Generator(device=self.device).manual_seed(step)
        codes = sample_codes(model, self.text.to(self.device), self.cfg, generator=g)
        grid = model.cfg.image_grid
        images = self.dvae.decode_codes(codes.view(-1, grid, grid))
        path = run.sample_path(step)
        save_image_grid(images, path, nrow=len(self.captions))
        run.metrics.image("samples", step, torch.cat(list(images), dim=2))
        return path
