"""`tessera prep crawl|tokenizer|encode|synthetic`: flags -> config -> one data-preparation function."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging

from tessera.cli.common import add_config_arguments
from tessera.core.errors import InputError
from tessera.core.root_config import TesseraConfig, load_root
from tessera.dataprep.config import CrawlConfig
from tessera.dataprep.crawl import crawl
from tessera.dataprep.encode import encode_shards
from tessera.dataprep.shards import list_shards
from tessera.dataprep.synthetic import generate, write_url_lists
from tessera.dataprep.tokenizer import KINDS, read_captions, sidecar_path, train_tokenizer


def add_crawl(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="url list: parquet/csv/tsv/jsonl (optionally .gz) or a folder of them")
    parser.add_argument("--output", required=True, help="output folder or s3://bucket/prefix")
    g = parser.add_argument_group("columns")
    g.add_argument("--url-col", help="column with the image URL (default url)")
    g.add_argument("--caption-col", help="column with the caption (default caption)")
    g.add_argument("--keep-cols", help="comma-separated extra columns copied into each sample's json")
    g = parser.add_argument_group("images and shards")
    g.add_argument("--image-size", type=int, help="output side in pixels")
    g.add_argument("--resize", choices=["center_crop", "keep_ratio", "border"])
    g.add_argument("--output-format", choices=["jpg", "webp"])
    g.add_argument("--quality", type=int, help="JPEG/WebP quality")
    g.add_argument("--shard-size", type=int, help="input rows per shard")
    g.add_argument("--processes", type=int, help="worker processes (default: the config's, 2)")
    g.add_argument("--threads", type=int, help="concurrent downloads per process")
    g.add_argument("--part", help="process only part I of N, as I/N (0-based), e.g. 0/4")
    g.add_argument("--overwrite", action="store_true", help="discard existing shards (of this part) instead of resuming")
    g = parser.add_argument_group("downloading")
    g.add_argument("--timeout", type=float, help="per-request timeout in seconds")
    g.add_argument("--retries", type=int, help="retries of transient failures")
    g.add_argument("--max-bytes", type=int, help="largest accepted body in bytes")
    g.add_argument("--max-redirects", type=int)
    g.add_argument("--allowed-schemes", help="comma-separated URL schemes (default http,https)")
    g.add_argument("--user-agent")
    g.add_argument("--ignore-robots-header", action="store_true", help="do not honour X-Robots-Tag noai/noimageai")
    g.add_argument("--s3-endpoint-url", help="S3 endpoint for s3:// outputs")
    g = parser.add_argument_group("filters")
    g.add_argument("--min-image-size", type=int, help="reject images whose shorter side is smaller")
    g.add_argument("--max-aspect-ratio", type=float, help="reject images with a larger long/short ratio")
    g.add_argument("--min-caption-chars", type=int)
    g.add_argument("--max-caption-chars", type=int)
    g.add_argument("--max-pixels", type=int, help="decompression-bomb guard (checked before decoding)")
    g.add_argument("--no-dedup", action="store_true", help="keep exact duplicates")
    g.add_argument("--dedup-near", action="store_true", help="drop near duplicates (perceptual hash)")
    g.add_argument("--near-dup-bits", type=int)
    g.add_argument("--similarity-threshold", type=float, help="minimum image-text similarity (LAION: 0.28)")
    g.add_argument("--similarity-model", help="scorer: CLIP export dir, or module:factory / file.py:factory")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_arguments(parser)


_FLAG_FIELDS = {
    "url_col": "url_col",
    "caption_col": "caption_col",
    "image_size": "image_size",
    "resize": "resize",
    "output_format": "output_format",
    "quality": "quality",
    "shard_size": "shard_size",
    "processes": "processes",
    "threads": "threads",
    "timeout": "timeout",
    "retries": "retries",
    "max_bytes": "max_bytes",
    "max_redirects": "max_redirects",
    "user_agent": "user_agent",
    "s3_endpoint_url": "s3_endpoint_url",
}
_FILTER_FLAGS = (
    "min_image_size",
    "max_aspect_ratio",
    "min_caption_chars",
    "max_caption_chars",
    "max_pixels",
    "near_dup_bits",
    "similarity_threshold",
    "similarity_model",
)


def config_from_args(args: argparse.Namespace) -> CrawlConfig:
    """Defaults < --config preset < key=value overrides < explicit flags."""

    roots = {f.name for f in dataclasses.fields(TesseraConfig)}
    overrides = [ov if ov.split("=", 1)[0].split(".", 1)[0] in roots else f"crawl.{ov}" for ov in (args.overrides or [])]
    cfg: CrawlConfig = load_root(args.config, overrides).crawl
    changes = {field: getattr(args, flag) for flag, field in _FLAG_FIELDS.items() if getattr(args, flag) is not None}
    if args.keep_cols is not None:
        changes["keep_cols"] = [c.strip() for c in args.keep_cols.split(",") if c.strip()]
    if args.allowed_schemes is not None:
        changes["allowed_schemes"] = [c.strip().lower() for c in args.allowed_schemes.split(",") if c.strip()]
    if args.ignore_robots_header:
        changes["respect_robots_header"] = False
    fchanges = {k: getattr(args, k) for k in _FILTER_FLAGS if getattr(args, k) is not None}
    if args.no_dedup:
        fchanges["dedup_exact"] = False
    if args.dedup_near:
        fchanges["dedup_near"] = True
    if fchanges:
        changes["filters"] = dataclasses.replace(cfg.filters, **fchanges)
    cfg = dataclasses.replace(cfg, **changes)
    cfg.validate()
    return cfg


def run_crawl(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    stats = crawl(args.input, args.output, cfg, part=args.part, overwrite=args.overwrite, progress=not args.no_progress)
    sc = stats["status_counts"]
    print(
        f"crawl {stats['output']} part {stats['part']}: {stats['rows']} rows, {stats['successes']} images "
        f"({stats['success_rate']:.1%}), {stats['shards_written']} shards written, {stats['shards_skipped']} already complete, "
        f"{stats['images_per_s']:.0f} images/s"
    )
    if sc:
        print("  status: " + ", ".join(f"{k}={v}" for k, v in sc.items()))
    if stats["reason_counts"]:
        print("  reasons: " + ", ".join(f"{k}={v}" for k, v in stats["reason_counts"].items()))
    return 0


def add_tokenizer(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input",
        required=True,
        help="webdataset shards (folder of *.tar, a tar, a glob or brace pattern, local or s3://bucket/prefix) or a text file with one caption per line",
    )
    parser.add_argument("--output", required=True, help="model file to write (FILE and FILE.json)")
    parser.add_argument("--vocab-size", type=int, default=None, help="vocabulary size, specials included (default: tokenizer.vocab_size)")
    parser.add_argument("--kind", choices=KINDS, default=None, help="BPE implementation (default: tokenizer.kind)")
    parser.add_argument("--no-lowercase", action="store_true", help="keep the captions' case (the paper lower-cases)")
    parser.add_argument(
        "--character-coverage",
        type=float,
        default=1.0,
        help="fraction of characters kept as symbols, the rarest mapped to unk (sentencepiece suggests 0.9995 for large web corpora)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="training threads of the C++ trainers (default: every core): sentencepiece, and youtokentome's with tokenizer.deterministic=false (Tessera's deterministic trainer, the default for youtokentome, runs on one)",
    )
    add_config_arguments(parser)


def run_tokenizer(args: argparse.Namespace) -> int:

    cfg = load_root(args.config, args.overrides).tokenizer
    kind = args.kind or cfg.kind
    vocab = args.vocab_size if args.vocab_size is not None else cfg.vocab_size
    lowercase = cfg.lowercase and not args.no_lowercase
    list_shards(args.input)  # fail early, naming the input
    logging.basicConfig(level=logging.INFO, format="tessera: %(message)s")
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads {args.threads}: expected >= 1")
    tok = train_tokenizer(
        read_captions(args.input),
        args.output,
        kind=kind,
        vocab_size=vocab,
        lowercase=lowercase,
        character_coverage=args.character_coverage,
        threads=args.threads,
        deterministic=cfg.deterministic,
    )
    meta = json.loads(sidecar_path(args.output).read_text())
    print(f"wrote {kind} tokenizer {args.output} ({tok.vocab_size} tokens, trained on {meta['num_captions']} captions)")
    return 0


def add_encode(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dvae", required=True, help="dVAE run directory, checkpoint or export dir")
    parser.add_argument("--tokenizer", required=True, help="tokenizer model file (with FILE.json beside it)")
    parser.add_argument("--input", required=True, help="image shards: folder, brace pattern or s3://bucket/prefix")
    parser.add_argument("--output", required=True, help="folder for the token shards and manifest.json")
    parser.add_argument("--part", default=None, help="I/N: encode only part I of N (shards I, I+N, ...)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    add_config_arguments(parser, default="demo")


def run_encode(args: argparse.Namespace) -> int:

    cfg = load_root(args.config, args.overrides)
    m = encode_shards(
        args.dvae, args.tokenizer, args.input, args.output, batch_size=cfg.encode.batch_size, part=args.part, device=args.device
    )
    print(json.dumps({k: v for k, v in m.items() if k not in ("entries", "counts")}, indent=2))
    return 0


def add_synthetic(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, help="folder for images/, train.parquet, eval.parquet, synthetic.json")
    parser.add_argument(
        "--base-url", default=None, help="also write train_urls.parquet/eval_urls.parquet with absolute URLs under this base"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: the config's seed)")
    add_config_arguments(parser, default="demo")


def run_synthetic(args: argparse.Namespace) -> int:

    cfg = load_root(args.config, args.overrides)
    seed = cfg.seed if args.seed is None else args.seed
    summary = generate(args.output, cfg.synthetic, seed=seed)
    print(f"wrote {summary['num_train']} training and {summary['num_eval']} held-out images to {args.output}")
    print(f"  url lists: {summary['train']} and {summary['eval']} (relative urls)")
    print(f"  {len(summary['heldout_combinations'])} attribute combinations held out of training")
    if args.base_url:
        lists = write_url_lists(args.output, args.base_url)
        print(f"  absolute url lists: {lists['train']} and {lists['eval']}")
    return 0
