"""Training the DALL-E transformer on token shards: `train_transformer(...)` (`tessera train transformer`), a task of tessera.trainer.fit.

The task (paper App. B.2, scaled down): AdamW with decoupled weight decay on matrices only, linear
warm-up then cosine (or plateau) decay, caption dropout (empty captions teach the unconditional model
used by classifier-free guidance), BPE-dropout when the tokenizer is available. The loop does the
rest (gradient clipping, EMA, checkpoints with data position and RNG states for exact resume).

Time budget: with `time_budget_s > 0` the cosine horizon is min(steps, updates that fit in the budget
at the speed measured since update 5), re-estimated on rank 0 every 20 updates and shared with every
rank (tessera.trainer.loop_state.Stopper), and saved in the checkpoint; the decay then ends when the
budget does instead of being cut midway or finishing early.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from tessera.cluster.dist import init
from tessera.core.errors import CheckpointError, ConfigError
from tessera.core.files import load_checkpoint
from tessera.trainer.config import TransformerModelConfig
from tessera.trainer.fit import fit
from tessera.trainer.rundir import RunDir
from tessera.trainer.token_data import TokenManifest, read_manifest
from tessera.trainer.transformer import DALLE
from tessera.trainer.transformer_task import KIND, TransformerTask, model_config_from_dict


def resolve_model_config(mcfg: TransformerModelConfig, manifest: TokenManifest) -> TransformerModelConfig:
    """Vocabulary sizes and grid come from the token shards' manifest (dVAE and tokenizer)."""
    return dataclasses.replace(mcfg, text_vocab=manifest.text_vocab, image_vocab=manifest.image_vocab, image_grid=manifest.grid)


def train_transformer(cfg_root: Any, data: str | None, output: str | Path, dist: Any = None) -> dict[str, Any]:
    """Train (or resume) a transformer run in `output` on token shards `data` (else transformer.train.train_data); returns the summary."""
    dist = init(dist, cfg_root.cluster.backend, cfg_root.cluster.timeout_s)
    tc = cfg_root.transformer.train
    data = data or tc.train_data
    if not data:
        raise ConfigError("transformer training: no token shards given (--data or transformer.train.train_data)")
    manifest = read_manifest(data)
    if tc.batch_size % dist.world_size:
        raise ConfigError(
            f"config key 'transformer.train.batch_size': expected a multiple of the world size {dist.world_size}, got {tc.batch_size}"
        )
    mcfg = resolve_model_config(cfg_root.transformer.model, manifest)
    tc = dataclasses.replace(tc, train_data=str(data))
    root = dataclasses.replace(cfg_root, transformer=dataclasses.replace(cfg_root.transformer, model=mcfg, train=tc))
    run = RunDir(output, root, rank=dist.rank)
    return fit(TransformerTask(root, str(data), manifest, dist, run), tc, run, dist, root.cluster)


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


__all__ = ["train_transformer", "load_transformer", "resolve_model_config", "model_config_from_dict", "TransformerTask"]
