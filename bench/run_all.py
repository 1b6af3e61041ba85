"""Run every benchmark that this machine can run (GPU ones only where CUDA is available).

    python bench/run_all.py [--skip demo,crawl,...]

Each benchmark prints its own figures; record them in BENCHMARKS.md with the machine's name.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CPU = ["crawl", "tokenizer", "dvae", "transformer", "demo"]
GPU = ["attention", "powersgd"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip", default="", help="comma-separated names to skip")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    try:
        import torch

        on_gpu = torch.cuda.is_available()
    except ImportError:
        on_gpu = False
    names = CPU + (GPU if on_gpu else [])
    failed = []
    for name in names:
        if name in skip:
            continue
        print(f"== bench_{name}", flush=True)
        if subprocess.run([sys.executable, str(HERE / f"bench_{name}.py")]).returncode != 0:
            failed.append(name)
    if not on_gpu:
        print("no CUDA device: skipped " + ", ".join(f"bench_{g}" for g in GPU))
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
