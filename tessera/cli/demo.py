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
    add_config_arguments(parser)


def run_demo(args: argparse.Namespace) -> int:
    preset = args.config or ("demo-quick" if args.quick else "demo")
    cfg = load_root(preset, args.overrides)
    if args.samples_per_prompt < 1:
        raise InputError(f"--samples-per-prompt: expected >= 1, got {args.samples_per_prompt}")
    out = Path(args.output)
    report = demo.run_demo(cfg, out, args.samples_per_prompt)
    print(demo.format_report(report))
    print(f"\nreport: {out / 'report.json'}  grid: {out / 'grid.png'}")
    return 3 if report["failures"] else 0  # a stage stopped by its safety time limit: the figures are not the recipe's
