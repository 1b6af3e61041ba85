"""`tessera status RUN_DIR`: step, last loss, throughput, last checkpoint and whether the run finished;
for a run submitted with `tessera cluster submit-train`, the SLURM job id and state. A demo output
folder reports each of its runs and report.json. See tessera.status for what is read from where.
"""

from __future__ import annotations

import argparse
import json

from tessera.status import format_status, read_status


def add_status(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (tessera train ... --output) or a demo output folder")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    parser.add_argument("--no-slurm", action="store_true", help="do not ask squeue/scontrol/sacct for the job state")


def run_status(args: argparse.Namespace) -> int:
    info = read_status(args.run_dir, query_slurm=not args.no_slurm)
    print(json.dumps(info, indent=2) if args.json else format_status(info))
    return 0
