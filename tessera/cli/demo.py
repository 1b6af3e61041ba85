"""`tessera demo`: the whole pipeline end to end on the embedded dataset (tessera.demo)."""

from __future__ import annotations

import argparse
from pathlib import Path

from tessera import demo
from tessera.cli.common import add_config_arguments
from tessera.core.errors import InputError
from tessera.core.root_config import load_root


def add_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="the 2-minute version (preset demo-quick)")
    parser.add_argument("--output", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("-n", "--samples-per-prompt", type=int, default=demo.SAMPLES_PER_PROMPT, help="images per prompt")
    parser.add_argument(
        "--ranks",
        type=int,
        default=0,
        help="also train the transformer on N local processes (2 groups of N/2: FSDP2 within, PowerSGD across, per-resblock "
        "scales) and in 1 process, and add a 'distributed' section to report.json (make demo-distributed: 4)",
    )
    parser.add_argument("--ranks-steps", type=int, default=demo.RANKS_STEPS, help="updates of each --ranks run (default: %(default)s)")
    parser.add_argument(
        "--reuse", action="store_true", help="with --ranks: only the distributed stage, on the tokens of the demo in --output"
    )
    add_config_arguments(parser)


def run_demo(args: argparse.Namespace) -> int:
    preset = args.config or ("demo-quick" if args.quick else "demo")
    cfg = load_root(preset, args.overrides)
    if args.samples_per_prompt < 1:
        raise InputError(f"--samples-per-prompt: expected >= 1, got {args.samples_per_prompt}")
    out = Path(args.output)
    if args.reuse and not args.ranks:
        raise InputError("--reuse: only with --ranks N (it reuses an earlier demo's tokens for the distributed stage)")
    if args.reuse:
        report = demo.run_distributed_only(cfg, out, args.ranks, args.ranks_steps)
    else:
        report = demo.run_demo(cfg, out, args.samples_per_prompt, args.ranks, args.ranks_steps)
    print(demo.format_report(report))
    print(f"\nreport: {out / 'report.json'}" + (f"  grid: {out / 'grid.png'}" if "dvae_psnr" in report else ""))
    return 3 if report.get("failures") else 0  # a stage stopped by its safety time limit: the figures are not the recipe's
