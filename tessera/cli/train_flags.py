"""The flags of `tessera train dvae | transformer | clip`, without the trainers: `tessera cluster submit-train` parses
the training command it submits with them, and must not import torch to do so (a dry run: 0.5 s, not 4 s)."""

from __future__ import annotations

import argparse

from tessera.cli.common import add_config_arguments


def add_dvae(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", default=None, help="training image shards: folder, brace pattern or s3://bucket/prefix (else dvae.train.train_data)"
    )
    parser.add_argument("--eval-data", default=None, help="held-out image shards for PSNR/SSIM (else dvae.train.eval_data)")
    parser.add_argument("--output", required=True, help="run directory (resumed when it holds a checkpoint)")
    add_config_arguments(parser, default="demo")


def add_transformer(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, help="token shards (a folder with manifest.json from 'tessera prep encode')")
    parser.add_argument("--output", required=True, help="run directory (resumed when it holds a checkpoint)")
    add_config_arguments(parser, default="demo")


def add_clip(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="training image shards (folder of *.tar, a tar, a glob or a brace pattern)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer model file from `tessera prep tokenizer`")
    parser.add_argument("--output", required=True, help="run directory (resumed when it holds a checkpoint)")
    parser.add_argument("--eval-data", default=None, help="held-out image shards for retrieval accuracy")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    add_config_arguments(parser)
