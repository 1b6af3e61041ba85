"""Training the DALL-E transformer on token shards (`tessera train transformer`).

    tessera train transformer --config demo --data TOKEN_SHARDS --output RUN_DIR [key=value ...]

The loop (paper App. B.2, scaled down): AdamW with decoupled weight decay on matrices only,
linear warm-up then cosine (or plateau) decay, gradient-norm clipping, parameter EMA, caption
dropout (empty captions teach the unconditional model used by classifier-free guidance),
BPE-dropout when the tokenizer is available. Checkpoints hold model, optimizer, EMA, schedule,
data position and RNG states, so a resumed run continues exactly (tests check bit equality).

Time budget: with `time_budget_s > 0` the cosine horizon is min(steps, updates that fit in the
budget at the speed measured since update 5), re-estimated every `_HORIZON_PROBE` updates (a
machine shared with other jobs changes speed), and saved in the checkpoint; the decay then ends
when the budget does instead of being cut midway or finishing early.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch

from tessera.core import config as C
from tessera.core.errors import CheckpointError, ConfigError
from tessera.core.files import load_checkpoint
from tessera.core.progress import bar
from tessera.core.root_config import load_root
from tessera.dataprep.imaging import save_image_grid
from tessera.trainer.config import TransformerModelConfig
from tessera.trainer.ema import EMA
from tessera.trainer.precision import autocast_dtype, resolve_precision
from tessera.trainer.rundir import RunDir
from tessera.trainer.schedules import Plateau, warmup_cosine
from tessera.trainer.token_data import TokenBatches, TokenManifest, load_token_set, read_manifest
from tessera.trainer.transformer import DALLE

KIND = "transformer"
ZERO_DIR = "zero"  # checkpoints/zero/: DeepSpeed ZeRO checkpoints (cluster.zero_stage > 0)
_HORIZON_PROBE = 20


def model_config_from_dict(d: dict) -> TransformerModelConfig:
    return C.from_dict(TransformerModelConfig, d, prefix="transformer.model")


def resolve_model_config(mcfg: TransformerModelConfig, manifest: TokenManifest) -> TransformerModelConfig:
    """Vocabulary sizes and grid come from the token shards' manifest (dVAE and tokenizer)."""
    return dataclasses.replace(mcfg, text_vocab=manifest.text_vocab, image_vocab=manifest.image_vocab, image_grid=manifest.grid)


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast, or nothing (fp32), for a config value (tessera.trainer.precision)."""
    dtype = autocast_dtype(precision, device)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def make_optimizer(model: torch.nn.Module, tcfg: Any) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices (linear weights) only, not on biases, norms or embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "emb" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), eps=tcfg.eps)


def load_tokenizer_or_none(manifest: TokenManifest, bpe_dropout: float):
    """The manifest's tokenizer for BPE-dropout, or None (no dropout wanted, or no tokenizer available)."""
    path = manifest.resolve(manifest.tokenizer)
    if bpe_dropout <= 0 or not path or not Path(path).exists():
        return None
    try:
        from tessera.dataprep.tokenizer import load_tokenizer
    except ImportError:
        return None
    return load_tokenizer(path)


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
        with autocast_context(tcfg.precision, device):
            out = model.loss(t, im, tcfg.image_loss_weight)
        for k in sums:
            sums[k] += float(out[k]) * t.shape[0]
        n += t.shape[0]
    model.train(was)
    return {f"eval_{k}": v / n for k, v in sums.items()}


class _Sampler:
    """Periodic sample grids decoded with the manifest's dVAE (skipped when it names none)."""

    def __init__(self, manifest: TokenManifest, data: str, mcfg: TransformerModelConfig, sample_cfg: Any, device: torch.device, n: int = 8):
        self.dvae = None
        path = manifest.resolve(manifest.dvae)
        if path and Path(path).exists():
            from tessera.trainer.dvae import load_dvae

            self.dvae, _ = load_dvae(path)
            self.dvae.to(device)
        self.text, self.captions = fixed_sample_captions(data, mcfg, n)
        self.cfg, self.device = sample_cfg, device

    def __call__(self, model: DALLE, run: RunDir, step: int) -> Path | None:
        if self.dvae is None:
            return None
        from tessera.trainer.sample import sample_codes

        g = torch.Generator(device=self.device).manual_seed(step)
        codes = sample_codes(model, self.text.to(self.device), self.cfg, generator=g)
        grid = model.cfg.image_grid
        images = self.dvae.decode_codes(codes.view(-1, grid, grid))
        path = run.sample_path(step)
        save_image_grid(images, path, nrow=len(self.captions))
        run.metrics.image("samples", step, torch.cat(list(images), dim=2))
        return path


def train_transformer(cfg_root: Any, data: str | None, output: str | Path, dist: Any = None) -> dict[str, Any]:
    """Train (or resume) a transformer run in `output` on token shards `data`; returns a summary dict."""
    from tessera.cluster.dist import init

    dist = init(dist)
    tcfg = cfg_root.transformer.train
    threads_before = torch.get_num_threads()
    if tcfg.threads > 0:
        torch.set_num_threads(tcfg.threads)
    try:
        return _train(cfg_root, data, output, dist)
    finally:
        torch.set_num_threads(threads_before)


def _train(cfg_root: Any, data: str | None, output: str | Path, dist: Any) -> dict[str, Any]:
    tcfg = cfg_root.transformer.train
    data = data or tcfg.train_data
    if not data:
        raise ConfigError("transformer training: no token shards given (--data or transformer.train.train_data)")
    manifest = read_manifest(data)
    mcfg = resolve_model_config(cfg_root.transformer.model, manifest)
    cfg_root = dataclasses.replace(cfg_root, transformer=dataclasses.replace(cfg_root.transformer, model=mcfg))
    device = dist.device
    if tcfg.batch_size % dist.world_size:
        raise ConfigError(
            f"config key 'transformer.train.batch_size': expected a multiple of the world size {dist.world_size}, got {tcfg.batch_size}"
        )
    local_batch = tcfg.batch_size // dist.world_size

    run = RunDir(output, cfg_root, rank=dist.rank)
    seed = cfg_root.seed + 1000  # each stage derives its own seed
    torch.manual_seed(seed)  # the same initial weights on every rank (ZeRO-3 partitions each rank's own copy)
    model = DALLE(mcfg).to(device)
    n_params = model.num_parameters()  # before ZeRO-3 partitions the parameters
    if dist.rank:
        torch.manual_seed(seed + dist.rank)
    opt = make_optimizer(model, tcfg)
    zero = cfg_root.cluster.zero_stage > 0
    if zero and cfg_root.cluster.zero_stage == 3 and tcfg.ema_decay > 0:
        raise ConfigError(
            "config key 'transformer.train.ema_decay': parameter EMA needs whole parameters on every rank; set it to 0 with cluster.zero_stage = 3"
        )
    ema = EMA(model, tcfg.ema_decay) if tcfg.ema_decay > 0 else None
    plateau = Plateau(tcfg.lr) if tcfg.decay == "plateau" else None
    step, horizon, data_state, elapsed_before = 0, 0, None, 0.0
    engine = None
    zero_dir = run.checkpoint_dir / ZERO_DIR

    def restore(ck: dict[str, Any], where: Path) -> None:
        nonlocal step, horizon, data_state, elapsed_before
        try:
            saved_cfg = model_config_from_dict(ck["model_cfg"])
        except (KeyError, ConfigError) as e:
            raise CheckpointError(f"checkpoint '{where}' has no usable model_cfg ({e})") from None
        if saved_cfg != mcfg:
            raise CheckpointError(f"checkpoint '{where}' was trained with another transformer.model config; use a new --output")
        if ema is not None and ck.get("ema") is not None:
            ema.load_state_dict(ck["ema"])
        if plateau is not None and ck.get("plateau"):
            plateau.load_state_dict(ck["plateau"])
        step, horizon = int(ck["step"]), int(ck.get("horizon", 0))
        data_state = ck.get("data", {}).get(str(dist.rank))
        elapsed_before = float(ck.get("elapsed_s", 0.0))
        torch.set_rng_state(ck["rng"]["torch"])

    if zero:
        # DeepSpeed ZeRO: the engine owns the optimizer state (sharded) and its checkpoints
        from tessera.cluster.engine import build_engine

        if run.latest_checkpoint() is not None:
            raise CheckpointError(
                f"run directory '{output}' holds a plain/DDP checkpoint (checkpoints/latest.pt); resume it with cluster.zero_stage = 0 or use a new --output"
            )
        engine = build_engine(
            model, opt, dist, cfg_root.cluster, grad_clip=tcfg.grad_clip, micro_batch_size=local_batch, checkpoint_kind=KIND
        )
        got, client = engine.load_checkpoint(zero_dir)
        if got:
            restore({**client, "step": got}, zero_dir)
    else:
        if (zero_dir / "latest").exists():
            raise CheckpointError(
                f"run directory '{output}' holds a DeepSpeed ZeRO checkpoint ({zero_dir}); resume it with the same cluster.zero_stage"
            )
        latest = run.latest_checkpoint()
        if latest is not None:
            ck = load_checkpoint(latest, KIND)
            restore(ck, latest)
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])

    tokenizer = load_tokenizer_or_none(manifest, tcfg.bpe_dropout)
    batches = TokenBatches(
        data,
        text_len=mcfg.text_len,
        text_vocab=mcfg.text_vocab,
        grid=mcfg.image_grid,
        batch_size=local_batch,
        seed=seed,
        rank=dist.rank,
        world=dist.world_size,
        shuffle_buffer=tcfg.shuffle_buffer,
        caption_dropout=tcfg.caption_dropout,
        tokenizer=tokenizer,
        bpe_dropout=tcfg.bpe_dropout,
        state=data_state,
    )
    eval_set = None
    if tcfg.eval_data:
        eval_set = load_token_set(tcfg.eval_data, mcfg.text_len, mcfg.text_vocab, mcfg.image_grid, limit=512)
    sampler = _Sampler(manifest, data, mcfg, cfg_root.sample, device) if dist.is_main and tcfg.sample_every > 0 else None

    wrapped = model
    if engine is not None:
        wrapped = engine.wrapped
    elif dist.world_size > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def lr_at(s: int) -> float:
        if s < tcfg.warmup_steps:
            return tcfg.lr * (s + 1) / tcfg.warmup_steps
        if plateau is not None:
            return plateau.lr
        return warmup_cosine(s, tcfg.lr, tcfg.lr_min, tcfg.warmup_steps, horizon or tcfg.steps)

    def checkpoint(s: int) -> Path | None:
        states = [None] * dist.world_size
        if dist.initialized and dist.world_size > 1:
            torch.distributed.all_gather_object(states, batches.state())
        else:
            states = [batches.state()]
        state = {
            "ema": ema.state_dict() if ema else None,
            "plateau": plateau.state_dict() if plateau else None,
            "horizon": horizon,
            "data": {str(r): st for r, st in enumerate(states)},
            "model_cfg": dataclasses.asdict(mcfg),
            "rng": {"torch": torch.get_rng_state()},
            "elapsed_s": elapsed_before + (time.time() - t_start),
            "train_data": str(data),
            "dvae": manifest.resolve(manifest.dvae),
            "tokenizer": manifest.resolve(manifest.tokenizer),
        }
        if engine is not None:  # every rank writes its shard
            return engine.save_checkpoint(zero_dir, s, state, keep_last=2)
        return run.save_checkpoint(KIND, s, {**state, "model": model.state_dict(), "optimizer": opt.state_dict(), "step": s})

    def eval_model() -> DALLE:
        """The weights to evaluate/sample with (EMA when kept). Collective under ZeRO-3: every rank calls it."""
        if engine is not None and cfg_root.cluster.zero_stage == 3:
            m = DALLE(mcfg).to(device)
            m.load_state_dict(engine.full_state_dict())
            return m
        if ema is None:
            return model
        m = DALLE(mcfg).to(device)
        m.load_state_dict(model.state_dict())
        ema.copy_to(m)
        return m

    def main_eval_model() -> DALLE | None:
        """eval_model() on the main rank (None elsewhere); all ranks take part where gathering is needed."""
        if engine is not None and cfg_root.cluster.zero_stage == 3:
            m = eval_model()
            return m if dist.is_main else None
        return eval_model() if dist.is_main else None

    n_tokens = local_batch * model.seq_len
    t_start = time.time()
    t_log, tok_since = time.time(), 0
    last: dict[str, float] = {}
    model.train()
    pbar = bar(total=tcfg.steps, desc="transformer", unit="step", initial=step) if dist.is_main else None
    stop_reason = "steps"
    probe_start: tuple[int, float] | None = None
    while step < tcfg.steps:
        if tcfg.time_budget_s > 0 and elapsed_before + (time.time() - t_start) >= tcfg.time_budget_s:
            stop_reason = "time_budget"
            break
        text, image = next(batches)
        text, image = text.to(device, non_blocking=True), image.to(device, non_blocking=True)
        lr = lr_at(step)
        with autocast_context(tcfg.precision, device):
            out = (
                model.loss(text, image, tcfg.image_loss_weight)
                if wrapped is model
                else _ddp_loss(wrapped, text, image, tcfg.image_loss_weight)
            )
        if not torch.isfinite(out["loss"]):
            raise RuntimeError(f"transformer training diverged at step {step} (loss {float(out['loss'])}); lower transformer.train.lr")
        if engine is not None:
            engine.set_lr(lr)
            engine.backward(out["loss"])
            engine.step()
            gnorm = engine.last_grad_norm if engine.last_grad_norm is not None else float("nan")
        else:
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip if tcfg.grad_clip > 0 else math.inf)
            opt.step()
        if ema is not None:
            ema.update(model)
        step += 1
        tok_since += n_tokens
        if tcfg.time_budget_s > 0:
            if probe_start is None and step >= 5:  # skip the first updates (shuffle-buffer fill, allocator warm-up)
                probe_start = (step, time.time())
            elif probe_start is not None and (step - probe_start[0]) % _HORIZON_PROBE == 0:
                per_step = (time.time() - probe_start[1]) / (step - probe_start[0])
                left = tcfg.time_budget_s - (elapsed_before + time.time() - t_start)
                horizon = max(min(tcfg.steps, step + int(left / per_step)), tcfg.warmup_steps + 1)
        if pbar is not None:
            pbar.update(1)
        if step % tcfg.log_every == 0 or step == tcfg.steps:
            last = {k: float(v.detach()) for k, v in out.items()}
            dt = time.time() - t_log
            row = {
                **last,
                "lr": lr,
                "grad_norm": float(gnorm),
                "tokens_per_s": tok_since * dist.world_size / max(dt, 1e-9),
                "elapsed_s": elapsed_before + time.time() - t_start,
            }
            if plateau is not None and step >= tcfg.warmup_steps:
                plateau.step(last["loss"])
            if eval_set is not None:
                em = main_eval_model()
                if em is not None:
                    row.update(eval_loss(em, eval_set[0], eval_set[1], tcfg, device))
            run.metrics.log(step, **row)
            if pbar is not None:
                pbar.set_postfix(loss=f"{last['loss']:.3f}", img=f"{last['image_ce']:.3f}")
            t_log, tok_since = time.time(), 0
        if tcfg.sample_every > 0 and step % tcfg.sample_every == 0:
            em = main_eval_model()
            if sampler is not None and em is not None:
                sampler(em, run, step)
        if tcfg.ckpt_every > 0 and step % tcfg.ckpt_every == 0:
            checkpoint(step)
    if pbar is not None:
        pbar.close()
    path = checkpoint(step)
    final = main_eval_model() if (sampler is not None or eval_set is not None or engine is not None) else None
    if sampler is not None and final is not None and step > 0 and step % tcfg.sample_every != 0:
        sampler(final, run, step)
    total_time = elapsed_before + time.time() - t_start
    summary = {
        "run_dir": str(run.path),
        "steps": step,
        "stop_reason": stop_reason,
        "horizon": horizon or tcfg.steps,
        "time_s": round(total_time, 2),
        "checkpoint": str(path) if path else None,
        "parameters": n_params,
        "precision": resolve_precision(tcfg.precision, device),
        **{f"final_{k}": v for k, v in last.items()},
    }
    if engine is not None:
        summary["engine"] = f"deepspeed-zero{cfg_root.cluster.zero_stage}"
    if eval_set is not None and final is not None:
        summary.update(eval_loss(final, eval_set[0], eval_set[1], tcfg, device))
    run.close()
    return summary


def _ddp_loss(wrapped: torch.nn.Module, text: torch.Tensor, image: torch.Tensor, w: float) -> dict[str, torch.Tensor]:
    """The paper loss through the DDP wrapper's forward (so gradients are all-reduced)."""
    import torch.nn.functional as F

    text_logits, image_logits = wrapped(text, image)
    text_ce = F.cross_entropy(text_logits.float().flatten(0, 1), text[:, 1:].flatten())
    image_ce = F.cross_entropy(image_logits.float().flatten(0, 1), image.flatten())
    return {"loss": (text_ce + w * image_ce) / (1 + w), "text_ce": text_ce.detach(), "image_ce": image_ce.detach()}


def load_transformer(path: str | Path, use_ema: bool = True) -> tuple[DALLE, TransformerModelConfig, dict]:
    """A trained transformer (EMA weights when present) from a run dir or checkpoint, with its checkpoint dict."""
    ck = load_checkpoint(path, KIND)
    try:
        mcfg = model_config_from_dict(ck["model_cfg"])
        weights = ck["ema"] if (use_ema and ck.get("ema")) else ck["model"]
    except (KeyError, ConfigError) as e:
        raise CheckpointError(f"checkpoint '{path}' lacks model_cfg or weights ({e})") from None
    model = DALLE(mcfg)
    sd = model.state_dict()
    try:
        model.load_state_dict({k: v.to(sd[k].dtype) for k, v in weights.items()})
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"checkpoint '{path}': weights do not match its model_cfg ({str(e).splitlines()[0][:120]})") from None
    return model.eval(), mcfg, ck


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tessera.cli import add_config_arguments

    parser.add_argument("--data", default=None, help="token shards (a folder with manifest.json from 'tessera prep encode')")
    parser.add_argument("--output", required=True, help="run directory (resumed when it holds a checkpoint)")
    add_config_arguments(parser, default="demo")


def run(args: argparse.Namespace) -> int:
    import json

    cfg = load_root(args.config, args.overrides)
    summary = train_transformer(cfg, args.data, args.output)
    print(json.dumps(summary, indent=1))
    return 0


__all__ = ["train_transformer", "load_transformer", "autocast_context", "make_optimizer", "resolve_model_config"]
