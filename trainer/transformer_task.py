"""The DALL-E transformer as a task of tessera.trainer.fit (paper App. B.2, scaled down): token batches with caption
dropout (empty captions teach the unconditional model used by classifier-free guidance) and BPE-dropout when the
tokenizer is available, the paper loss, AdamW weight decay on matrices only, linear warm-up then cosine (to the
horizon the loop fits to the time budget) or plateau decay, held-out loss and sample grids.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tessera.cluster.dist import DistState
from tessera.core import config as C
from tessera.core.errors import CheckpointError, ConfigError
from tessera.dataprep.tokenizer import load_tokenizer
from tessera.trainer.config import TransformerModelConfig
from tessera.trainer.data import resume_state
from tessera.trainer.rundir import RunDir
from tessera.trainer.schedules import Plateau, warmup_cosine
from tessera.trainer.token_data import TokenBatches, TokenManifest, load_token_set
from tessera.trainer.transformer import DALLE
from tessera.trainer.transformer_eval import Sampler, eval_loss

KIND = "transformer"


def model_config_from_dict(d: dict) -> TransformerModelConfig:
    return C.from_dict(TransformerModelConfig, d, prefix="transformer.model")


def load_tokenizer_or_none(manifest: TokenManifest, bpe_dropout: float):
    """The manifest's tokenizer for BPE-dropout, or None (no dropout wanted, or no tokenizer available)."""
    path = manifest.resolve(manifest.tokenizer)
    if bpe_dropout <= 0 or not path or not Path(path).exists():
        return None
    return load_tokenizer(path)


def dalle_loss(forward, text: torch.Tensor, image: torch.Tensor, w: float) -> dict[str, torch.Tensor]:
    """The paper loss (DALLE.loss) through `forward` (the engine's wrapper, so that DDP/ZeRO hooks run)."""
    text_logits, image_logits = forward(text, image)
    text_ce = F.cross_entropy(text_logits.float().flatten(0, 1), text[:, 1:].flatten())
    image_ce = F.cross_entropy(image_logits.float().flatten(0, 1), image.flatten())
    return {"loss": (text_ce + w * image_ce) / (1 + w), "text_ce": text_ce.detach(), "image_ce": image_ce.detach()}


class TransformerTask:
    """The transformer for tessera.trainer.fit: token batches, the paper loss, held-out loss and sample grids."""

    kind, unit = KIND, "tokens"

    def __init__(self, root: Any, data: str, manifest: TokenManifest, dist: DistState, run: RunDir):
        self.root, self.data, self.manifest, self.dist, self.run = root, data, manifest, dist, run
        self.mcfg, self.tc = root.transformer.model, root.transformer.train
        self.seed = root.seed + 1000  # each stage derives its own seed
        self.device = dist.device
        self.local_batch = self.tc.batch_size // dist.world_size
        self.plateau = Plateau(self.tc.lr) if self.tc.decay == "plateau" else None

    def make_model(self) -> DALLE:
        return DALLE(self.mcfg).to(self.dist.device)

    def build_model(self) -> DALLE:
        torch.manual_seed(self.seed)  # the same initial weights on every rank (ZeRO-3 partitions each rank's own copy)
        model = self.make_model()
        self.n_params = model.num_parameters()  # before ZeRO-3 partitions the parameters
        self.items_per_step = self.local_batch * model.seq_len * self.dist.world_size
        if self.dist.rank:
            torch.manual_seed(self.seed + self.dist.rank)
        return model

    def param_groups(self, model: DALLE) -> list[dict]:
        """Weight decay on matrices (linear weights) only, not on biases, norms or embeddings."""
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 and "emb" not in name else no_decay).append(p)
        return [{"params": decay, "weight_decay": self.tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def resblocks(self, model: DALLE) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
        """For grad_scaling = "per_resblock": the resblocks (one gradient scale each) and the modules run in fp32 (the logits heads)."""
        return list(model.blocks), [model.text_head, model.image_head]

    def start(self, step: int, states: list | None, log) -> None:
        tc, mcfg, dist = self.tc, self.mcfg, self.dist
        self.batches = TokenBatches(
            self.data,
            text_len=mcfg.text_len,
            text_vocab=mcfg.text_vocab,
            grid=mcfg.image_grid,
            batch_size=tc.batch_size,  # global: this rank decodes its slice of each global batch
            seed=self.seed,
            rank=dist.rank,
            world=dist.world_size,
            shuffle_buffer=tc.shuffle_buffer,
            caption_dropout=tc.caption_dropout,
            tokenizer=load_tokenizer_or_none(self.manifest, tc.bpe_dropout),
            bpe_dropout=tc.bpe_dropout,
            state=resume_state(states),  # the same global position on every rank, whatever the world size it was saved at
        )
        self.eval_set = load_token_set(tc.eval_data, mcfg.text_len, mcfg.text_vocab, mcfg.image_grid, limit=512) if tc.eval_data else None
        main = dist.is_main and tc.sample_every > 0
        self.sampler = Sampler(self.manifest, self.data, mcfg, self.root.sample, dist.device) if main else None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        text, image = next(self.batches)
        return text.to(self.dist.device, non_blocking=True), image.to(self.dist.device, non_blocking=True)

    def schedules(self, step: int, horizon: int) -> dict[str, float]:
        tc = self.tc
        if step < tc.warmup_steps:
            return {"lr": tc.lr * (step + 1) / tc.warmup_steps}
        if self.plateau is not None:
            return {"lr": self.plateau.lr}
        return {"lr": warmup_cosine(step, tc.lr, tc.lr_min, tc.warmup_steps, horizon or tc.steps)}

    def loss(self, forward, batch: tuple[torch.Tensor, torch.Tensor], step: int, sch: dict) -> tuple[torch.Tensor, dict]:
        out = dalle_loss(forward, batch[0], batch[1], self.tc.image_loss_weight)
        return out["loss"], {"text_ce": out["text_ce"], "image_ce": out["image_ce"]}

    def observe(self, step: int, row: dict) -> None:
        """Plateau decay: every rank halves on the same logged loss (the global batch's, averaged over ranks by the loop)."""
        if self.plateau is not None and step >= self.tc.warmup_steps:
            self.plateau.step(float(row["loss"]))

    def evaluate(self, model: DALLE, step: int) -> dict[str, float]:
        if self.eval_set is None:
            return {}
        return eval_loss(model, self.eval_set[0], self.eval_set[1], self.tc, self.dist.device)

    def sample(self, model: DALLE, step: int) -> None:
        if self.sampler is not None:
            self.sampler(model, self.run, step)

    def data_state(self) -> Any:
        return self.batches.state()

    def state_dict(self, step: int) -> dict[str, Any]:
        m = self.manifest
        return {
            "plateau": self.plateau.state_dict() if self.plateau else None,
            "model_cfg": dataclasses.asdict(self.mcfg),
            "train_data": str(self.data),
            "dvae": m.resolve(m.dvae),
            "tokenizer": m.resolve(m.tokenizer),
        }

    def load_state_dict(self, client: dict, where: Path) -> None:
        try:
            saved = model_config_from_dict(client["model_cfg"])
        except (KeyError, ConfigError) as e:
            raise CheckpointError(f"checkpoint '{where}' has no usable model_cfg ({e})") from None
        if saved != self.mcfg:
            raise CheckpointError(f"checkpoint '{where}' was trained with another transformer.model config; use a new --output")
        if self.plateau is not None and client.get("plateau"):
            self.plateau.load_state_dict(client["plateau"])

    def summary(self, summary: dict, last_eval: dict) -> dict[str, Any]:
        return {"parameters": self.n_params}
