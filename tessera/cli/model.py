"""`tessera export|sample|eval`: flags -> one function of the pipeline layer (export, sampling, evaluation)."""

from __future__ import annotations

import argparse
import json

from tessera.cli.common import add_config_arguments
from tessera.core.errors import InputError
from tessera.trainer import evaluate, inference
from tessera.trainer.export import export
from tessera.trainer.sample import read_prompts


def add_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a transformer run directory (or one of its checkpoint files)")
    parser.add_argument("--output", required=True, help="the inference directory to write")
    parser.add_argument("--clip", default=None, help="a CLIP run directory or checkpoint to include (enables reranking)")
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="storage precision of the weights (default fp32)")
    parser.add_argument("--dvae", default=None, help="dVAE run/checkpoint/export (default: the one named by the run's token manifest)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer model file (default: the one named by the run's token manifest)")
    parser.add_argument("--no-ema", action="store_true", help="export the raw weights even when the run kept an EMA")


def run_export(args: argparse.Namespace) -> int:
    summary = export(
        args.run_dir, args.output, clip=args.clip, dtype=args.dtype, dvae=args.dvae, tokenizer=args.tokenizer, use_ema=not args.no_ema
    )
    print(json.dumps(summary))
    return 0


def add_sample(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="an export directory (tessera export RUN --output DIR)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one caption")
    src.add_argument("--prompts", help="a text file with one caption per line (e.g. configs/prompts/paper_eval.txt)")
    parser.add_argument("-n", type=int, default=4, help="images per prompt (default 4)")
    parser.add_argument("--output", required=True, help="folder for the PNGs and grid.png")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    add_config_arguments(parser, default=None)


def run_sample(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise InputError(f"-n: expected >= 1 images per prompt, got {args.n}")
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
    pipe = inference.load(args.model)
    cfg = inference.sample_config(pipe, args.config, args.overrides)
    written = inference.write_samples(pipe, prompts, args.n, cfg, args.output, seed=args.seed)
    print(f"wrote {written} images for {len(prompts)} prompts to {args.output}")
    return 0


def add_eval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="generated (or reconstructed) images: a folder, a glob, or shards")
    parser.add_argument("--reference", required=True, help="reference images: webdataset shards (folder of *.tar) or an image folder")
    parser.add_argument("--clip", default=None, help="a `tessera train clip` run directory or checkpoint (CLIP score, fid_clip, is_clip)")
    parser.add_argument(
        "--inception",
        default=None,
        help="local Inception-v3 state dict (torchvision's naming; .pt/.pth or .safetensors) for FID and IS: torchvision's ImageNet weights or pytorch-fid's pt_inception-2015-12-05 FID weights (never downloaded; torchvision not needed)",
    )
    parser.add_argument("--paired", action="store_true", help="also PSNR/SSIM of image i against reference i")
    parser.add_argument("--size", type=int, default=None, help="side both sets are resized to (default: the generated images' side)")
    parser.add_argument("--limit", type=int, default=None, help="use at most this many images from each side")
    parser.add_argument("--is-splits", type=int, default=1, help="folds for the IS mean and std (the usual 10 needs >= 5000 images)")
    parser.add_argument("--output", required=True, help="report JSON file")


def run_eval(args: argparse.Namespace) -> int:
    report = evaluate.evaluate_to_file(
        args.images,
        args.reference,
        args.output,
        clip=args.clip,
        inception=args.inception,
        paired=args.paired,
        size=args.size,
        limit=args.limit,
        is_splits=args.is_splits,
    )
    print(evaluate.format_table({k: v for k, v in report.items() if k not in ("images", "reference", "clip", "inception")}))
    print(f"wrote {args.output}")
    return 0
