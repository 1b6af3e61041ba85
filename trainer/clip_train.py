"""Training the small CLIP on image shards: `train_clip(...)` (`tessera train clip`), a task of tessera.trainer.fit.

The pairs (image, caption) are read once into memory as uint8 (the CLIP is small and so is its
data: `clip.max_train_samples` bounds it), then sampled in shuffled epochs (the generator's state
and the epoch's order are in the checkpoint, so a resumed run sees the same batches). Each step
encodes a batch of captions (with BPE-dropout when `clip.bpe_dropout` > 0; its draws are not
resumable), computes the symmetric contrastive loss and takes an AdamW step under a warm-up +
cosine schedule; the loop clips the gradients to `clip.grad_clip` and checks for divergence.

Evaluation is retrieval among distinct captions: for each held-out image, is the most similar
caption (among all distinct captions of the evaluation set) its own? Many images share a caption
in the synthetic data, so chance is 1 / (number of distinct captions).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from tessera.cluster.dist import DistState
from tessera.core.errors import ConfigError, TesseraError
from tessera.core.root_config import load_root
from tessera.dataprep.shards import read_pairs
from tessera.trainer.clip_task import ClipTask, _param_groups, retrieval_accuracy  # noqa: F401  (public here too)
from tessera.trainer.config import ClipConfig
from tessera.trainer.fit import fit
from tessera.trainer.openclip import load_openclip
from tessera.trainer.rundir import RunDir


def _device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _open_clip(cfg: ClipConfig) -> dict[str, Any]:
    """A local open_clip checkpoint replaces training: check that it loads."""
    try:
        oc = load_openclip(cfg.checkpoint).cfg
    except TesseraError as e:
        raise ConfigError(f"config key 'clip.checkpoint': {e}") from None
    return {
        "checkpoint": str(cfg.checkpoint),
        "open_clip": True,
        "summary": f"clip: not training; the open_clip checkpoint {cfg.checkpoint} (ViT, image {oc.image_size}px, embed {oc.embed_dim}) will be used",
    }


def _resized(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size:
        return images
    x = torch.nn.functional.interpolate(images.float(), size=(size,) * 2, mode="bilinear", antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8)


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
    dist: DistState | None = None,
) -> dict[str, Any]:
    """Train (or resume) a CLIP in the run directory `output`; returns the summary with the retrieval metrics and checkpoint path.

    `pairs` (uint8 images, captions) may be given instead of reading `data` (tests, the demo).
    """
    cfg.validate()
    if cfg.checkpoint:
        return _open_clip(cfg)
    dist = dist or DistState()
    images, captions = pairs if pairs is not None else read_pairs(data, cfg.image_size, cfg.max_train_samples)
    images = _resized(images, cfg.image_size)
    if eval_data:
        ev = read_pairs(eval_data, cfg.image_size, cfg.eval_samples)
    else:  # no held-out set: report retrieval on (the first) training pairs
        ev = images[: cfg.eval_samples], captions[: cfg.eval_samples]
    root = dataclasses.replace(root_cfg if root_cfg is not None else load_root(), clip=cfg)
    task = ClipTask(cfg, tokenizer, (images, captions), ev, seed, _device(device), dist)
    run = RunDir(output, root, rank=dist.rank)
    return fit(task, cfg, run, dist, root.cluster)


__all__ = ["train_clip", "read_pairs", "retrieval_accuracy"]
