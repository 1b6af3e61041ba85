"""Training the small CLIP on image shards: `tessera train clip` and `train_clip(...)`.

    tessera train clip --config demo --data SHARDS --tokenizer FILE --output RUN_DIR [--eval-data SHARDS]

The pairs (image, caption) are read once into memory as uint8 (the CLIP is small and so is its
data: `clip.max_train_samples` bounds it), then sampled in shuffled epochs. Each step encodes a
batch of captions (with BPE-dropout when `clip.bpe_dropout` > 0), computes the symmetric
contrastive loss and takes an AdamW step under a warm-up + cosine schedule.

Evaluation is retrieval among distinct captions: for each held-out image, is the most similar
caption (among all distinct captions of the evaluation set) its own? Many images share a caption
in the synthetic data, so chance is 1 / (number of distinct captions).

A run directory (tessera.trainer.rundir.RunDir) gets config.toml, metrics.jsonl, TensorBoard events and
"clip" checkpoints; an interrupted run resumes from checkpoints/latest.pt.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from tessera.core.errors import InputError
from tessera.core.root_config import load_root
from tessera.dataprep.shards import read_pairs
from tessera.trainer.clip import CLIP, ClipScorer, checkpoint_state, model_from_state, pad_ids
from tessera.trainer.config import ClipConfig
from tessera.trainer.precision import autocast_dtype


@torch.no_grad()
def retrieval_accuracy(scorer: ClipScorer, images: torch.Tensor, captions: Sequence[str]) -> dict[str, float]:
    """Top-1 image->text and text->image retrieval among the distinct captions of the set.

    images: (N, 3, H, W) uint8 or float in [0, 1]. text->image: a distinct caption's most similar
    image carries that caption.
    """
    if len(images) != len(captions) or not len(captions):
        raise InputError(f"retrieval_accuracy: {len(images)} images and {len(captions)} captions")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    distinct = sorted(set(captions))
    index = {c: i for i, c in enumerate(distinct)}
    truth = torch.tensor([index[c] for c in captions])
    sim = scorer.similarity(x, distinct)  # (N, D)
    i2t = (sim.argmax(1) == truth).float().mean().item()
    best_img = sim.argmax(0)  # (D,)
    t2i = (truth[best_img] == torch.arange(len(distinct))).float().mean().item()
    return {"i2t_top1": i2t, "t2i_top1": t2i, "chance": 1.0 / len(distinct), "n_captions": len(distinct), "n_images": len(captions)}


def _device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _param_groups(model: CLIP, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # weights of linear and conv layers decay; norms, biases, embeddings, positions, temperature do not
        (decay if p.dim() >= 2 and "tok." not in name and not name.endswith(".pos") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_clip(
    cfg: ClipConfig,
    data: str | Path,
    tokenizer: str | Path,
    output: str | Path,
    *,
    eval_data: str | Path | None = None,
    seed: int = 0,
    root_cfg: Any = None,
    device: str | None = None,
    pairs: tuple[torch.Tensor, list[str]] | None = None,
) -> dict[str, Any]:
    """Train a CLIP and write the run directory `output`; returns the final metrics and checkpoint path.

    `pairs` (uint8 images, captions) may be given instead of reading `data` (tests, the demo).
    """
    from tessera.core.files import load_checkpoint
    from tessera.core.progress import bar
    from tessera.dataprep.tokenizer import load_tokenizer
    from tessera.trainer.rundir import RunDir
    from tessera.trainer.schedules import warmup_cosine

    cfg.validate()
    if cfg.checkpoint:  # a local open_clip checkpoint replaces training: check that it loads
        from tessera.core.errors import ConfigError, TesseraError
        from tessera.trainer.openclip import load_openclip

        try:
            oc = load_openclip(cfg.checkpoint).cfg
        except TesseraError as e:
            raise ConfigError(f"config key 'clip.checkpoint': {e}") from None
        return {
            "checkpoint": str(cfg.checkpoint),
            "open_clip": True,
            "summary": f"clip: not training; the open_clip checkpoint {cfg.checkpoint} (ViT, image {oc.image_size}px, embed {oc.embed_dim}) will be used",
        }
    dev = _device(device)
    tok = load_tokenizer(tokenizer)
    images, captions = pairs if pairs is not None else read_pairs(data, cfg.image_size, cfg.max_train_samples)
    if images.shape[-1] != cfg.image_size:
        images = (
            torch.nn.functional.interpolate(images.float(), size=(cfg.image_size,) * 2, mode="bilinear", antialias=True)
            .round()
            .clamp(0, 255)
            .to(torch.uint8)
        )
    if eval_data:
        ev_images, ev_caps = read_pairs(eval_data, cfg.image_size, cfg.eval_samples)
    else:  # no held-out set: report retrieval on (the first) training pairs
        ev_images, ev_caps = images[: cfg.eval_samples], captions[: cfg.eval_samples]
    if root_cfg is None:
        root_cfg = load_root()
        root_cfg.clip = cfg
    run = RunDir(output, root_cfg)
    torch.manual_seed(seed)
    model = CLIP(cfg, tok.vocab_size).to(dev)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    step = 0
    latest = run.latest_checkpoint()
    if latest is not None:
        state = load_checkpoint(latest, "clip")
        model = model_from_state(state, latest).to(dev)
        opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
    use_bf16 = autocast_dtype(cfg.precision, dev) == torch.bfloat16
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    n = len(captions)
    bs = min(cfg.batch_size, n)
    order = torch.randperm(n, generator=gen)
    pos = 0
    scorer = ClipScorer(model, tok, dev)
    start = time.time()
    last_loss = math.nan
    metrics: dict[str, Any] = {}

    def save() -> Path | None:
        state = checkpoint_state(model, tokenizer)
        state.update(step=step, optimizer=opt.state_dict(), metrics=metrics)
        return run.save_checkpoint("clip", step, state)

    def evaluate() -> dict[str, float]:
        model.eval()
        r = retrieval_accuracy(scorer, ev_images, ev_caps)
        model.train()
        return r

    with bar(cfg.steps, "clip", "step", initial=step) as pb:
        model.train()
        while step < cfg.steps:
            if cfg.time_budget_s and time.time() - start > cfg.time_budget_s:
                break
            if pos + bs > n:
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos : pos + bs]
            pos += bs
            x = images[idx].to(dev, non_blocking=True).float() / 255.0
            ids = pad_ids(tok.encode_batch([captions[i] for i in idx.tolist()], dropout=cfg.bpe_dropout), cfg.text_len).to(dev)
            lr = warmup_cosine(step, cfg.lr, cfg.lr_min, cfg.warmup_steps, cfg.steps)
            for g in opt.param_groups:
                g["lr"] = lr
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = model(x, ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            last_loss = loss.item()
            pb.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                pb.set_postfix(loss=f"{last_loss:.3f}")
                run.metrics.log(step, loss=last_loss, lr=lr, temperature=1.0 / model.logit_scale.exp().item())
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                r = evaluate()
                run.metrics.log(step, **{f"eval_{k}": v for k, v in r.items()})
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.steps:
                save()
    r = evaluate()
    metrics = {"step": step, "loss": last_loss, **r, "train_seconds": round(time.time() - start, 2)}
    run.metrics.log(step, **{f"eval_{k}": v for k, v in r.items()})
    path = save()
    run.close()
    metrics["checkpoint"] = str(path) if path else None
    return metrics


# --------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tessera.cli import add_config_arguments

    parser.add_argument("--data", required=True, help="training image shards (folder of *.tar, a tar, a glob or a brace pattern)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer model file from `tessera prep tokenizer`")
    parser.add_argument("--output", required=True, help="run directory (resumed when it holds a checkpoint)")
    parser.add_argument("--eval-data", default=None, help="held-out image shards for retrieval accuracy")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from tessera.core.root_config import load_root

    root = load_root(args.config, args.overrides)
    m = train_clip(
        root.clip, args.data, args.tokenizer, args.output, eval_data=args.eval_data, seed=root.seed, root_cfg=root, device=args.device
    )
    if m.get("open_clip"):
        print(m["summary"])
        return 0
    print(
        f"clip: {m['step']} steps in {m['train_seconds']} s, loss {m['loss']:.3f}; retrieval top-1 image->text {m['i2t_top1']:.3f}, "
        f"text->image {m['t2i_top1']:.3f} over {m['n_captions']} captions (chance {m['chance']:.3f}); checkpoint {m['checkpoint']}"
    )
    return 0


__all__ = ["train_clip", "read_pairs", "retrieval_accuracy"]
