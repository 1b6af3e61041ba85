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
import io
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from tessera.cluster.dist import DistState
from tessera.core.errors import ConfigError, InputError, TesseraError
from tessera.core.root_config import load_root
from tessera.dataprep.tokenizer import input_files
from tessera.trainer.clip_task import ClipTask, _param_groups, retrieval_accuracy  # noqa: F401  (public here too)
from tessera.trainer.config import ClipConfig
from tessera.trainer.fit import fit
from tessera.trainer.openclip import load_openclip
from tessera.trainer.rundir import RunDir

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


def _check_tar_end(tf: tarfile.TarFile, path: Path) -> None:
    """tarfile stops quietly at a member header cut short; a whole archive has its end-of-archive
    zero blocks (>= 1024 bytes) after the last member, so anything else is a truncated file."""
    f = tf.fileobj
    f.seek(0, 2)
    size = f.tell()
    f.seek(tf.offset)
    tail = f.read(size - tf.offset)
    if len(tail) < 1024 or tail.strip(b"\0"):
        raise InputError(f"shard '{path}' is truncated (ends inside a member header at byte {tf.offset + len(tail)})")


def read_pairs(spec: str | Path, image_size: int, limit: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """(images uint8 (N, 3, S, S), captions) from webdataset shards ({key}.jpg|png|webp + {key}.txt).

    `spec`: a folder of *.tar, a tar, a glob or a brace pattern. Images of another size are resized
    (bicubic) to `image_size` after a center crop.
    """
    imgs: list[np.ndarray] = []
    caps: list[str] = []
    for path in input_files(spec):
        pending: dict[str, dict[str, bytes]] = {}
        try:
            with tarfile.open(path, "r:*") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    key, _, ext = m.name.rpartition(".")
                    ext = "." + ext.lower()
                    if ext not in IMAGE_EXTS and ext != ".txt":
                        continue
                    f = tf.extractfile(m)
                    entry = pending.setdefault(key, {})
                    entry["txt" if ext == ".txt" else "img"] = f.read() if f else b""
                    if "txt" in entry and "img" in entry:
                        del pending[key]
                        imgs.append(_decode(entry["img"], image_size, path, key))
                        caps.append(entry["txt"].decode("utf-8", errors="replace").strip())
                        if limit is not None and len(caps) >= limit:
                            return _stack(imgs), caps
                _check_tar_end(tf, path)
        except (tarfile.TarError, EOFError) as e:
            raise InputError(f"shard '{path}' is not a readable tar file ({type(e).__name__})") from None
    if not caps:
        raise InputError(f"image shards '{spec}' hold no (image, caption) pairs")
    return _stack(imgs), caps


def _decode(data: bytes, size: int, path: Path, key: str) -> np.ndarray:
    try:
        im = Image.open(io.BytesIO(data)).convert("RGB")
    except Exception:
        raise InputError(f"shard '{path}': image '{key}' cannot be decoded") from None
    w, h = im.size
    if (w, h) != (size, size):
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(im).transpose(2, 0, 1).copy()


def _stack(imgs: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(imgs))


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
