"""`tessera train dvae | transformer | clip`: parse the flags, build the root config, call the trainer."""

from __future__ import annotations

import argparse
import json

from tessera.cli.common import add_config_arguments
from tessera.cluster import dist as D
from tessera.core.root_config import load_root
from tessera.trainer.clip_train import train_clip
from tessera.trainer.dvae_train import train_dvae
from tessera.trainer.transformer_train import train_transformer


def add_dvae(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", default=None, help="training image shards: folder, brace pattern or s3://bucket/prefix (else dvae.train.train_data)"
    )
    parser.add_argument("--eval-data", default=None, help="held-out image shards for PSNR/SSIM (else dvae.train.eval_data)")
    parser.add_argument("--output", required=True, help="run directory (resumed when it holds a checkpoint)")
    add_config_arguments(parser, default="demo")


def run_dvae(args: argparse.Namespace) -> int:
    cfg = load_root(args.config, args.overrides)
    with D.process_group(cfg.cluster.backend, cfg.cluster.timeout_s) as state:
        summary = train_dvae(cfg, args.data, args.eval_data, args.output, state)
    if state.is_main:
        print(json.dumps(summary, indent=2))
    return 0


def add_transformer(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, help="token shards (a folder with manifest.json from 'tessera prep encode')")
    parser.add_argument("--output", required=True, help="run directory (resumed when it holds a checkpoint)")
    add_config_arguments(parser, default="demo")


def run_transformer(args: argparse.Namespace) -> int:
    cfg = load_root(args.config, args.overrides)
    with D.process_group(cfg.cluster.backend, cfg.cluster.timeout_s) as state:
        summary = train_transformer(cfg, args.data, args.output, state)
    if state.is_main:
        print(json.dumps(summary, indent=1))
    return 0


def add_clip(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="training image shards (folder of *.tar, a tar, a glob or a brace pattern)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer model file from `tessera prep tokenizer`")
    parser.add_argument("--output", required=True, help="run directory (resumed when it holds a checkpoint)")
    parser.add_argument("--eval-data", default=None, help="held-out image shards for retrieval accuracy")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    add_config_arguments(parser)


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
