"""`tessera train dvae | transformer | clip`: parse the flags (declared in tessera.cli.train_flags), build the root
config, call the trainer."""

from __future__ import annotations

import argparse
import json

from tessera.cli.train_flags import add_clip, add_dvae, add_transformer
from tessera.cluster import dist as D
from tessera.core.root_config import load_root
from tessera.trainer.clip_train import train_clip
from tessera.trainer.dvae_train import train_dvae
from tessera.trainer.transformer_train import train_transformer

__all__ = ["add_clip", "add_dvae", "add_transformer", "run_clip", "run_dvae", "run_transformer"]


def run_dvae(args: argparse.Namespace) -> int:
    cfg = load_root(args.config, args.overrides)
    with D.process_group(cfg.cluster.backend, cfg.cluster.timeout_s) as state:
        summary = train_dvae(cfg, args.data, args.eval_data, args.output, state)
    if state.is_main:
        print(json.dumps(summary, indent=2))
    return 0


def run_transformer(args: argparse.Namespace) -> int:
    cfg = load_root(args.config, args.overrides)
    with D.process_group(cfg.cluster.backend, cfg.cluster.timeout_s) as state:
        summary = train_transformer(cfg, args.data, args.output, state)
    if state.is_main:
        print(json.dumps(summary, indent=1))
    return 0


def run_clip(args: argparse.Namespace) -> int:
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
