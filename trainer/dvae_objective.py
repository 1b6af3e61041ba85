"""The dVAE's objective (paper App. A.2), its held-out metrics and the k-means warm start's centroids.

Objective (per image, divided by the number of pixel dimensions): logit-Laplace NLL of the pixels
given gumbel-softmax relaxed codes + beta * KL(q(z|x) || uniform). Beside the paper, all off by
default and on in the demo preset: a diversity term (`diversity_weight`), the squared error of the
relaxed reconstruction (`mse_weight`), and a k-means warm start of the codebook
(`codebook_init = "kmeans"`, `init_steps`; trainer/codebook_init.py).
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from tessera.cluster.dist import DistState
from tessera.core.errors import InputError
from tessera.trainer.codebook_init import sample_centroids
from tessera.trainer.data import iter_image_batches
from tessera.trainer.dvae import DVAE, code_log_probs, kl_to_uniform, logit_laplace_nll, map_pixels, stats_to_image
from tessera.trainer.image_metrics import psnr, ssim
from tessera.trainer.precision import autocast


def code_diversity_gap(
    logits: torch.Tensor, mean_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None, logq: torch.Tensor | None = None
) -> torch.Tensor:
    """log V - I(x; z) estimated on the batch: (log V - H(mean q)) + mean H(q).

    Zero when every position is confident (H(q) = 0) and the batch uses every code equally;
    large for collapse onto few codes (first term) or for unconfident positions (second term).
    Not in the paper: a mutual-information term (cf. wav2vec 2.0's diversity loss) that keeps
    short CPU runs from collapsing onto a handful of codes; `dvae.train.diversity_weight`
    (0 = the paper's objective).

    `mean_over_ranks` (data parallelism: each rank holds an equal slice of the global batch): mean q is the global
    batch's (averaged over ranks, one all-reduce of V numbers in the forward pass) and H(mean q) enters each rank's
    loss as its value plus its first-order term in this rank's mean q, so that the gradients averaged over ranks are
    exactly those of the global batch's term (nothing is communicated in the backward pass).
    `logq`: the logits' code_log_probs (B, G, G, V) when the caller has them already.
    """
    logq = code_log_probs(logits) if logq is None else logq
    q = logq.exp()
    mean_q = q.mean(dim=(0, 1, 2))
    position_entropy = -(q * logq).sum(-1).mean()
    if mean_over_ranks is None:
        aggregate_entropy = -(mean_q * torch.log(mean_q.clamp_min(1e-12))).sum()
    else:
        m = mean_over_ranks(mean_q.detach().clone())
        log_m = torch.log(m.clamp_min(1e-12))
        aggregate_entropy = -(m * log_m).sum() - ((log_m + 1) * (mean_q - mean_q.detach())).sum()
    return math.log(logq.shape[-1]) - aggregate_entropy + position_entropy


def dvae_loss(
    model,
    x: torch.Tensor,
    temp: float,
    kl_weight: float,
    eps: float,
    generator=None,
    dtype=None,
    diversity_weight: float = 0.0,
    mse_weight: float = 0.0,
    codes: torch.Tensor | None = None,
    mean_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss (per pixel dimension) and its terms: rec = NLL nats/image, kl = nats/image, div = nats.

    With `codes` (the k-means warm start) the decoder reconstructs from those one-hot codes and the
    encoder is trained to predict them (cross-entropy `init_ce`) instead of the KL and diversity terms.
    `mean_over_ranks`: the diversity term's mean q over the global batch (see code_diversity_gap).
    """
    with autocast(dtype, x.device):
        logits, stats = model(x, temp, generator, codes)
    rec = logit_laplace_nll(stats, x, eps).mean()
    dims = x[0].numel()
    terms = {"rec_nll": rec.detach(), "soft_recon": stats.detach()}
    if codes is not None:
        v = logits.shape[1]
        ce = F.cross_entropy(logits.float().permute(0, 2, 3, 1).reshape(-1, v), codes.reshape(-1))  # codes last (code_log_probs)
        loss = rec / dims + ce
        terms.update(init_ce=ce.detach(), init_acc=(logits.detach().argmax(1) == codes).float().mean(), kl=torch.zeros(()))
    else:
        logq = code_log_probs(logits)  # shared by the KL and diversity terms
        kl = kl_to_uniform(logits, logq).mean()
        loss = (rec + kl_weight * kl) / dims
        terms["kl"] = kl.detach()
        if diversity_weight > 0:
            div = code_diversity_gap(logits, mean_over_ranks, logq)
            loss = loss + diversity_weight * div
            terms["diversity_gap"] = div.detach()
    if mse_weight > 0:
        mse = (stats_to_image(stats, x.shape[1]) - x.float()).pow(2).mean()
        loss = loss + mse_weight * mse
        terms["mse"] = mse.detach()
    return loss, terms


def soft_psnr(stats: torch.Tensor, x: torch.Tensor, channels: int) -> float:
    """PSNR (dB) of the relaxed reconstruction of batch `x` (pixels in [0, 1])."""
    mse = (stats_to_image(stats, channels) - x.float()).pow(2).mean().clamp_min(1e-10)
    return (10 * torch.log10(1 / mse)).item()


@torch.no_grad()
def reconstruct(model: DVAE, x: torch.Tensor, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(hard reconstructions in [0, 1], argmax codes) of images `x`."""
    with autocast(dtype, x.device):
        codes = model.encoder(map_pixels(x)).argmax(1)
        stats = model.decode_stats(codes)
    return stats_to_image(stats, model.cfg.channels).float(), codes


@torch.no_grad()
def evaluate(
    model: DVAE, spec: str | list[str], n: int, batch_size: int, device: torch.device, dtype=None
) -> tuple[dict[str, float], torch.Tensor]:
    """Held-out PSNR/SSIM of hard reconstructions (argmax codes -> decoder), codebook perplexity and unused codes;
    with the grid of the first (up to 8) images over their reconstructions."""
    model.eval()
    V = model.cfg.vocab_size
    counts = torch.zeros(V, dtype=torch.long)
    ps, ss = [], []
    grid = None
    for x, _ in iter_image_batches(spec, model.cfg.image_size, batch_size, limit=n):
        x = x.to(device)
        rec, codes = reconstruct(model, x, dtype)
        counts += torch.bincount(codes.flatten().cpu(), minlength=V)
        ps.append(psnr(rec.cpu(), x.cpu()))
        ss.append(ssim(rec.cpu(), x.cpu()))
        if grid is None:
            k = min(8, x.shape[0])
            grid = torch.cat([x[:k].cpu(), rec[:k].cpu()])
    if not ps:
        raise InputError(f"eval data '{spec}': no samples")
    p = counts.double() / counts.sum()
    ent = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {
        "eval_psnr": torch.cat(ps).mean().item(),
        "eval_ssim": torch.cat(ss).mean().item(),
        "perplexity": math.exp(ent),
        "unused_codes": int((counts == 0).sum().item()),
        "eval_images": int(counts.sum().item() // (model.cfg.grid_size**2)),
    }, grid


def kmeans_centroids(cfg_root: Any, dist: DistState, device: torch.device, data: str | None = None) -> tuple[torch.Tensor, float]:
    """(centroids, seconds): rank 0 clusters the patches of a shuffled training sample (`data`, else
    dvae.train.train_data), every rank gets its centroids."""
    mc, tc = cfg_root.dvae.model, cfg_root.dvae.train
    patch = 2 ** (mc.n_groups - 1)
    t0 = time.time()
    if dist.is_main:
        c = sample_centroids(
            data or tc.train_data, mc.image_size, patch, mc.vocab_size, tc.init_images, tc.init_iters, cfg_root.seed, device
        ).float()
    else:
        c = torch.zeros((mc.vocab_size, mc.channels * patch * patch), device=device)
    if dist.initialized and dist.world_size > 1:
        torch.distributed.broadcast(c, 0)
    return c, time.time() - t0


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of the parameters' bytes: equal across ranks when data parallelism kept them in sync."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def grid_tensor(grid: torch.Tensor) -> torch.Tensor:
    """Two rows (originals over reconstructions) as one CHW image for TensorBoard."""
    n = grid.shape[0] // 2
    top = torch.cat(list(grid[:n]), dim=2)
    bottom = torch.cat(list(grid[n:]), dim=2)
    return torch.cat([top, bottom], dim=1)
