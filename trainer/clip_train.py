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
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from tessera.cluster.dist import DistState
from tessera.core.errors import CheckpointError, ConfigError, InputError, TesseraError
from tessera.core.root_config import load_root
from tessera.dataprep.tokenizer import input_files, load_tokenizer
from tessera.trainer.clip import CLIP, ClipScorer, checkpoint_state, pad_ids
from tessera.trainer.config import ClipConfig
from tessera.trainer.fit import fit
from tessera.trainer.openclip import load_openclip
from tessera.trainer.rundir import RunDir
from tessera.trainer.schedules import warmup_cosine

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


class ClipTask:
    """The CLIP for tessera.trainer.fit: shuffled epochs of in-memory pairs, the contrastive loss, retrieval accuracy."""

    kind, unit = "clip", "pairs"

    def __init__(self, cfg: ClipConfig, tokenizer: str | Path, pairs: tuple, eval_pairs: tuple, seed: int, device, dist: DistState):
        self.cfg, self.tokenizer, self.seed, self.device, self.dist = cfg, tokenizer, seed, device, dist
        self.tok = load_tokenizer(tokenizer)
        (self.images, self.captions), self.eval_pairs = pairs, eval_pairs
        self.bs = min(cfg.batch_size, len(self.captions))
        if self.bs % dist.world_size:
            raise ConfigError(f"config key 'clip.batch_size': expected a multiple of the world size {dist.world_size}, got {self.bs}")
        self.local_batch, self.items_per_step = self.bs // dist.world_size, self.bs

    def make_model(self) -> CLIP:
        return CLIP(self.cfg, self.tok.vocab_size).to(self.device)

    def build_model(self) -> CLIP:
        torch.manual_seed(self.seed)
        self.model = self.make_model()
        return self.model

    def param_groups(self, model: CLIP) -> list[dict]:
        return _param_groups(model, self.cfg.weight_decay)

    def start(self, step: int, states: list | None, log) -> None:
        n = len(self.captions)
        self.gen = torch.Generator()
        state = states[0] if states else None
        if state:
            self.gen.set_state(state["generator"].cpu())
            self.order, self.pos = state["order"].cpu(), int(state["pos"])
        else:  # a fresh run (or a checkpoint from before the data position was saved)
            self.gen.manual_seed(self.seed * 1000 + step)
            self.order, self.pos = torch.randperm(n, generator=self.gen), 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos + self.bs > len(self.captions):
            self.order, self.pos = torch.randperm(len(self.captions), generator=self.gen), 0
        idx = self.order[self.pos : self.pos + self.bs]
        self.pos += self.bs
        idx = idx[self.dist.rank * self.local_batch : (self.dist.rank + 1) * self.local_batch]
        x = self.images[idx].to(self.device, non_blocking=True).float() / 255.0
        ids = self.tok.encode_batch([self.captions[i] for i in idx.tolist()], dropout=self.cfg.bpe_dropout)
        return x, pad_ids(ids, self.cfg.text_len).to(self.device)

    def schedules(self, step: int, horizon: int) -> dict[str, float]:
        c = self.cfg
        return {"lr": warmup_cosine(step, c.lr, c.lr_min, c.warmup_steps, c.steps)}

    def loss(self, forward, batch: tuple[torch.Tensor, torch.Tensor], step: int, sch: dict) -> tuple[torch.Tensor, dict]:
        return forward(*batch), {"temperature": lambda: 1.0 / self.model.logit_scale.exp().item()}

    def observe(self, step: int, row: dict) -> None:
        pass

    def evaluate(self, model: CLIP, step: int) -> dict[str, float]:
        r = retrieval_accuracy(ClipScorer(model, self.tok, self.device), *self.eval_pairs)
        return {f"eval_{k}": v for k, v in r.items()}

    def sample(self, model: CLIP, step: int) -> None:
        pass

    def data_state(self) -> dict[str, Any]:
        return {"generator": self.gen.get_state(), "order": self.order, "pos": self.pos}

    def state_dict(self, step: int) -> dict[str, Any]:
        state = checkpoint_state(self.model, self.tokenizer)
        del state["model"]  # the engine saves the weights
        return state

    def load_state_dict(self, client: dict, where: Path) -> None:
        saved = client.get("config") or {}
        if any(saved.get(k) != getattr(self.cfg, k) for k in ClipConfig.MODEL_KEYS) or client.get("vocab_size") != self.tok.vocab_size:
            raise CheckpointError(f"checkpoint in '{where}' holds a CLIP with another architecture or vocabulary; use a new --output")

    def summary(self, summary: dict, last_eval: dict) -> dict[str, Any]:
        retrieval = {k.removeprefix("eval_"): v for k, v in last_eval.items()}
        return {"step": summary["steps"], "loss": summary.get("final_loss"), **retrieval, "train_seconds": summary["time_s"]}


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
