"""The small CLIP as a task of tessera.trainer.fit: shuffled epochs of in-memory (image, caption) pairs (the
generator's state and the epoch's order are its data position, so a resumed run sees the same batches), the
symmetric contrastive loss, AdamW weight decay on linear and conv weights, warm-up + cosine, and retrieval accuracy.

Evaluation is retrieval among distinct captions: for each held-out image, is the most similar caption (among all
distinct captions of the evaluation set) its own? Many images share a caption in the synthetic data, so chance is
1 / (number of distinct captions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from tessera.cluster.dist import DistState
from tessera.core.errors import CheckpointError, ConfigError, InputError
from tessera.dataprep.tokenizer import load_tokenizer
from tessera.trainer.clip import CLIP, ClipScorer, checkpoint_state, pad_ids
from tessera.trainer.config import ClipConfig
from tessera.trainer.schedules import warmup_cosine


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
