"""Training the dVAE (paper App. A.2): `tessera train dvae` and `train_dvae(...)`.

Objective (per image, divided by the number of pixel dimensions): logit-Laplace NLL of the pixels
given gumbel-softmax relaxed codes + beta * KL(q(z|x) || uniform). Cosine schedules: beta 0 ->
kl_weight over kl_warmup_steps, temperature temp_start -> temp_end over temp_anneal_steps, learning
rate lr -> lr_min over lr_decay_steps; AdamW; parameter EMA for evaluation and export.

Beside the paper, all off by default and on in the demo preset: a diversity term
(`diversity_weight`), the squared error of the relaxed reconstruction (`mse_weight`), and a k-means
warm start of the codebook (`codebook_init = "kmeans"`, `init_steps`; trainer/codebook_init.py), after
which the KL and temperature schedules begin.

Exact resume: the checkpoint holds model, optimizer, EMA, step and every rank's data position; the
gumbel noise of step s on rank r comes from a generator seeded with (seed, s, r), so no RNG state
has to be carried.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tessera.cluster.dist import DistState
from tessera.core import config as C
from tessera.core.errors import ConfigError, InputError
from tessera.core.files import atomic_write_bytes, load_checkpoint
from tessera.core.root_config import load_root
from tessera.dataprep.imaging import save_image_grid
from tessera.trainer.codebook_init import patch_codes, sample_centroids
from tessera.trainer.data import ImageStream, iter_image_batches
from tessera.trainer.dvae import DVAE, kl_to_uniform, logit_laplace_nll, map_pixels, stats_to_image
from tessera.trainer.ema import EMA
from tessera.trainer.precision import autocast_dtype
from tessera.trainer.rundir import RunDir
from tessera.trainer.schedules import cosine


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def warm_steps(tc) -> int:
    """Updates of the k-means warm start (0 without one)."""
    return tc.init_steps if tc.codebook_init == "kmeans" else 0


def schedules(tc, step: int) -> dict[str, float]:
    """lr over the whole run; the KL weight and temperature schedules start after the warm start."""
    main = max(0, step - warm_steps(tc))
    return {
        "lr": cosine(step, tc.lr, tc.lr_min, tc.lr_decay_steps),
        "kl_weight": cosine(main, 0.0, tc.kl_weight, tc.kl_warmup_steps),
        "temp": cosine(main, tc.temp_start, tc.temp_end, tc.temp_anneal_steps),
    }


def code_diversity_gap(logits: torch.Tensor) -> torch.Tensor:
    """log V - I(x; z) estimated on the batch: (log V - H(mean q)) + mean H(q).

    Zero when every position is confident (H(q) = 0) and the batch uses every code equally;
    large for collapse onto few codes (first term) or for unconfident positions (second term).
    Not in the paper: a mutual-information term (cf. wav2vec 2.0's diversity loss) that keeps
    short CPU runs from collapsing onto a handful of codes; `dvae.train.diversity_weight`
    (0 = the paper's objective).
    """
    logq = F.log_softmax(logits.float(), dim=1)  # (B, V, G, G)
    q = logq.exp()
    mean_q = q.mean(dim=(0, 2, 3))
    aggregate_entropy = -(mean_q * torch.log(mean_q.clamp_min(1e-12))).sum()
    position_entropy = -(q * logq).sum(1).mean()
    return math.log(logits.shape[1]) - aggregate_entropy + position_entropy


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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss (per pixel dimension) and its terms: rec = NLL nats/image, kl = nats/image, div = nats.

    With `codes` (the k-means warm start) the decoder reconstructs from those one-hot codes and the
    encoder is trained to predict them (cross-entropy `init_ce`) instead of the KL and diversity terms.
    """
    with autocast(x.device, dtype):
        logits, stats = model(x, temp, generator, codes)
    rec = logit_laplace_nll(stats, x, eps).mean()
    dims = x[0].numel()
    terms = {"rec_nll": rec.detach(), "soft_recon": stats.detach()}
    if codes is not None:
        ce = F.cross_entropy(logits.float(), codes)
        loss = rec / dims + ce
        terms.update(init_ce=ce.detach(), init_acc=(logits.detach().argmax(1) == codes).float().mean(), kl=torch.zeros(()))
    else:
        kl = kl_to_uniform(logits).mean()
        loss = (rec + kl_weight * kl) / dims
        terms["kl"] = kl.detach()
        if diversity_weight > 0:
            div = code_diversity_gap(logits)
            loss = loss + diversity_weight * div
            terms["diversity_gap"] = div.detach()
    if mse_weight > 0:
        mse = (stats_to_image(stats, x.shape[1]) - x.float()).pow(2).mean()
        loss = loss + mse_weight * mse
        terms["mse"] = mse.detach()
    return loss, terms
    kl = kl_to_uniform(logits).mean()
    loss = (rec + kl_weight * kl) / dims
    terms["kl"] = kl.detach()
    if mse_weight > 0:
        loss = loss + mse_weight * mse
    if diversity_weight > 0:
        div = code_diversity_gap(logits)
        loss = loss + diversity_weight * div
        terms["diversity_gap"] = div.detach()
    return loss, terms


@torch.no_grad()
def evaluate(
    model: DVAE, spec: str | list[str], n: int, batch_size: int, device: torch.device, dtype=None
) -> tuple[dict[str, float], torch.Tensor]:
    """Held-out PSNR/SSIM of hard reconstructions (argmax codes -> decoder), codebook perplexity and unused codes."""
    from tessera.trainer.image_metrics import psnr, ssim

    model.eval()
    V = model.cfg.vocab_size
    counts = torch.zeros(V, dtype=torch.long)
    ps, ss = [], []
    grid = None
    for x, _ in iter_image_batches(spec, model.cfg.image_size, batch_size, limit=n):
        x = x.to(device)
        with autocast(device, dtype):
            codes = model.encoder(map_pixels(x)).argmax(1)
            stats = model.decode_stats(codes)
        rec = stats_to_image(stats, model.cfg.channels).float()
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


def _gather(dist: DistState, obj: Any) -> list[Any]:
    if dist.initialized and dist.world_size > 1:
        out: list[Any] = [None] * dist.world_size
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


def _stop_flag(dist: DistState, stop: bool, device: torch.device) -> bool:
    """Rank 0 decides (time budget) and every rank follows, so all take the same number of steps."""
    if dist.initialized and dist.world_size > 1:
        t = torch.tensor([1.0 if stop else 0.0], device=device)
        torch.distributed.broadcast(t, 0)
        return bool(t.item())
    return stop


def train_dvae(
    cfg_root: Any, data: str | None = None, eval_data: str | None = None, output: str | Path = "runs/dvae", dist: DistState | None = None
) -> dict[str, Any]:
    """Train (or resume) a dVAE in `output`; returns a summary dict (also written to summary.json)."""
    dist = dist or DistState()
    mc, tc = cfg_root.dvae.model, cfg_root.dvae.train
    if data:
        tc.train_data = data
    if eval_data:
        tc.eval_data = eval_data
    if not tc.train_data:
        raise ConfigError("config key 'dvae.train.train_data': no training shards given (use --data SHARDS)")
    if tc.batch_size % dist.world_size:
        raise ConfigError(
            f"config key 'dvae.train.batch_size': expected a multiple of the world size {dist.world_size}, got {tc.batch_size}"
        )
    device = dist.device
    dtype = autocast_dtype(tc.precision, device)
    per_rank = tc.batch_size // dist.world_size

    torch.manual_seed(cfg_root.seed)  # identical initial weights on every rank
    model = DVAE(mc).to(device)
    mem = torch.channels_last if tc.channels_last else torch.contiguous_format
    model = model.to(memory_format=mem)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay)
    ema = EMA(model, tc.ema_decay)
    run = RunDir(output, cfg_root, rank=dist.rank)

    step, data_state, ck = 0, None, None
    latest = run.checkpoint_dir / "latest.pt"
    if latest.exists():
        ck = load_checkpoint(latest, "dvae", map_location="cpu")
        if ck.get("model_cfg") != C.to_dict(mc):
            raise ConfigError(f"run directory '{output}' holds a dVAE with another model config; use a new --output")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        ema.load_state_dict(ck["ema"])
        step = int(ck["step"])
        states = ck.get("data") or []
        if len(states) == dist.world_size:
            data_state = states[dist.rank]
        elif states:  # another world size: start the next epoch afresh
            e = 1 + max(p[0] for s in states for p in s["positions"])
            data_state = {"positions": [[e, 0]] * max(tc.workers, 1)}

    stream = ImageStream(
        tc.train_data,
        image_size=mc.image_size,
        batch_size=per_rank,
        seed=cfg_root.seed,
        rank=dist.rank,
        world=dist.world_size,
        workers=tc.workers,
        shuffle_buffer=tc.shuffle_buffer,
        state=data_state,
    )

    centroids = None
    if tc.codebook_init == "kmeans" and step < warm_steps(tc):
        centroids = ck.get("kmeans_centroids") if ck is not None else None
        if centroids is None:
            centroids, seconds = kmeans_centroids(cfg_root, dist, device)
            run.metrics.log(0, kmeans_time_s=round(seconds, 2), kmeans_images=tc.init_images)
        centroids = centroids.to(device)
    patch = 2 ** (mc.n_groups - 1)

    fwd = model
    if tc.compile:
        fwd = torch.compile(model)
    if dist.initialized and dist.world_size > 1:
        fwd = torch.nn.parallel.DistributedDataParallel(fwd, device_ids=[device.index] if device.type == "cuda" else None)

    eval_model = DVAE(mc).to(device).to(memory_format=mem) if dist.is_main else None
    eval_spec = tc.eval_data or tc.train_data

    def do_eval(at: int) -> dict[str, float]:
        ema.copy_to(eval_model)
        m, grid = evaluate(eval_model, eval_spec, tc.eval_samples, max(per_rank, 64), device, dtype)
        m["eval_on"] = "eval" if tc.eval_data else "train"
        run.metrics.log(at, **m)
        save_image_grid(grid, run.sample_path(at), nrow=grid.shape[0] // 2)
        run.metrics.image("reconstructions", at, _grid_tensor(grid))
        return m

    def do_ckpt(at: int) -> None:
        states = _gather(dist, stream.state())
        if dist.is_main:
            run.save_checkpoint(
                "dvae",
                at,
                {
                    "step": at,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "ema": ema.state_dict(),
                    "model_cfg": C.to_dict(mc),
                    "data": states,
                    "seed": cfg_root.seed,
                    **({"kmeans_centroids": centroids.cpu()} if centroids is not None and at < warm_steps(tc) else {}),
                },
            )

    from tessera.core.progress import bar

    start_step, t0 = step, time.time()
    pbar = bar(tc.steps, "dvae", "step") if dist.is_main else None
    if pbar is not None:
        pbar.update(step)
    last_log_t, last_log_step = t0, step
    last_eval: dict[str, float] = {}
    last_eval_step = -1
    model.train()
    while step < tc.steps:
        stop = tc.time_budget_s > 0 and time.time() - t0 >= tc.time_budget_s
        if _stop_flag(dist, stop, device):
            break
        sch = schedules(tc, step)
        for g in opt.param_groups:
            g["lr"] = sch["lr"]
        x = next(stream).to(device, non_blocking=True).contiguous(memory_format=mem)
        gen = torch.Generator(device).manual_seed((cfg_root.seed * 1_000_003 + step) * 4099 + dist.rank)
        codes = patch_codes(x, centroids, patch) if centroids is not None and step < warm_steps(tc) else None
        loss, terms = dvae_loss(
            fwd, x, sch["temp"], sch["kl_weight"], tc.logit_laplace_eps, gen, dtype, tc.diversity_weight, tc.mse_weight, codes
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        opt.step()
        ema.update(model)
        step += 1
        if pbar is not None:
            pbar.update(1)
        if not math.isfinite(loss.item()):
            raise ConfigError(f"dVAE training diverged at step {step} (loss {loss.item()}); lower dvae.train.lr")
        if step % tc.log_every == 0 or step == tc.steps:
            now = time.time()
            ips = (step - last_log_step) * tc.batch_size / max(now - last_log_t, 1e-9)
            last_log_t, last_log_step = now, step
            soft = stats_to_image(terms["soft_recon"], mc.channels)
            mse = (soft - x.float()).pow(2).mean().clamp_min(1e-10)
            extra = {k: terms[k].item() for k in ("diversity_gap", "mse", "init_ce", "init_acc") if k in terms}
            run.metrics.log(
                step,
                loss=loss.item(),
                rec_nll=terms["rec_nll"].item(),
                kl=terms["kl"].item(),
                grad_norm=float(gnorm),
                **extra,
                soft_psnr=(10 * torch.log10(1 / mse)).item(),
                images_per_s=ips,
                **sch,
            )
            if pbar is not None:
                pbar.set_postfix(loss=f"{loss.item():.4f}", kl=f"{terms['kl'].item():.1f}", ips=f"{ips:.0f}")
        if dist.is_main and (step % tc.eval_every == 0 or step % tc.sample_every == 0):
            last_eval, last_eval_step = do_eval(step), step
            model.train()
        if step % tc.ckpt_every == 0:
            do_ckpt(step)
    if pbar is not None:
        pbar.close()
    train_time = time.time() - t0
    if step % tc.ckpt_every != 0 or step == start_step:
        do_ckpt(step)
    summary: dict[str, Any] = {
        "run_dir": str(output),
        "steps": step,
        "resumed_from": start_step,
        "train_time_s": round(train_time, 2),
        "images_per_s": round((step - start_step) * tc.batch_size / max(train_time, 1e-9), 2),
        "precision": str(dtype or "fp32").replace("torch.", ""),
        "world_size": dist.world_size,
        "weights_sha256": weights_digest(model),
    }
    if dist.is_main:
        if last_eval_step != step:
            last_eval = do_eval(step)
        summary.update({k: v for k, v in last_eval.items()})
        summary["checkpoint"] = str(run.checkpoint_dir / "latest.pt")
        atomic_write_bytes(Path(output) / "summary.json", json.dumps(summary, indent=2).encode())
    run.close()
    dist.barrier()
    return summary


def kmeans_centroids(cfg_root: Any, dist: DistState, device: torch.device) -> tuple[torch.Tensor, float]:
    """(centroids, seconds): rank 0 clusters the patches of a shuffled training sample, every rank gets its centroids."""
    mc, tc = cfg_root.dvae.model, cfg_root.dvae.train
    patch = 2 ** (mc.n_groups - 1)
    t0 = time.time()
    if dist.is_main:
        c = sample_centroids(
            tc.train_data, mc.image_size, patch, mc.vocab_size, tc.init_images, tc.init_iters, cfg_root.seed, device
        ).float()
    else:
        c = torch.zeros((mc.vocab_size, mc.channels * patch * patch), device=device)
    if dist.initialized and dist.world_size > 1:
        torch.distributed.broadcast(c, 0)
    return c, time.time() - t0


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of the parameters' bytes: equal across ranks when data parallelism kept them in sync."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _grid_tensor(grid: torch.Tensor) -> torch.Tensor:
    """Two rows (originals over reconstructions) as one CHW image for TensorBoard."""
    n = grid.shape[0] // 2
    top = torch.cat(list(grid[:n]), dim=2)
    bottom = torch.cat(list(grid[n:]), dim=2)
    return torch.cat([top, bottom], dim=1)


# --------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tessera.cli import add_config_arguments

    parser.add_argument(
        "--data", default=None, help="training image shards: folder, brace pattern or s3://bucket/prefix (else dvae.train.train_data)"
    )
    parser.add_argument("--eval-data", default=None, help="held-out image shards for PSNR/SSIM (else dvae.train.eval_data)")
    parser.add_argument("--output", required=True, help="run directory (resumed when it holds a checkpoint)")
    add_config_arguments(parser, default="demo")


def run(args: argparse.Namespace) -> int:
    from tessera.cluster import dist as D

    cfg = load_root(args.config, args.overrides)
    state = D.init(D.discover())
    try:
        summary = train_dvae(cfg, args.data, args.eval_data, args.output, state)
    finally:
        D.shutdown(state)
    if state.is_main:
        print(json.dumps(summary, indent=2))
    return 0
