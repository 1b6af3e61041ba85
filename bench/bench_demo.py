"""Benchmark of the end-to-end demo: wall time and quality of `tessera demo` and `tessera demo --quick`.

Targets (issue 2, 2-core CPU without GPU): full demo <= 600 s with color_acc >= 0.9 and
shape_acc >= 0.7; --quick <= 120 s. Each run is a fresh process, as a user runs it.

    python bench/bench_demo.py [--only quick|full] [--out runs/bench-demo]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from tessera.core.machine import describe, one_line

TARGETS = {"full": {"seconds": 600, "color_acc": 0.9, "shape_acc": 0.7}, "quick": {"seconds": 120, "color_acc": 0.8}}


def run_one(kind: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "tessera.cli", "demo", "--output", str(out)] + (["--quick"] if kind == "quick" else [])
    t = time.perf_counter()
    r = subprocess.run(cmd, env=dict(os.environ, TESSERA_PROGRESS="0"), capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"demo ({kind}) failed with exit code {r.returncode}")
    report = json.loads((out / "report.json").read_text())
    res = {
        "kind": kind,
        "wall_s": round(wall, 1),
        **{k: report[k] for k in ("dvae_psnr", "color_acc", "shape_acc", "position_acc", "size_acc")},
        **{k: report.get(k) for k in ("heldout_color_acc", "heldout_shape_acc")},
        "updates": {
            s: f"{report[s]['steps']} ({report[s]['stop_reason']}, {report[s]['precision']})"
            for s in ("dvae", "transformer", "clip")
            if s in report
        },
    }
    res["stage_seconds"] = report["stage_seconds"]
    res["machine"] = one_line(report["machine"])  # as the demo ran: its kernels are pinned (tessera.core.portable), this process's are not
    tgt = TARGETS[kind]
    res["meets_targets"] = wall <= tgt["seconds"] and all(report[k] >= v for k, v in tgt.items() if k != "seconds")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["quick", "full"])
    ap.add_argument("--out", default="runs/bench-demo")
    args = ap.parse_args()
    print(f"this process: {one_line(describe())}, python {platform.python_version()} (each run's line names the kernels the demo ran)")
    kinds = [args.only] if args.only else ["quick", "full"]
    for kind in kinds:
        res = run_one(kind, Path(args.out) / kind)
        print(json.dumps(res))


if __name__ == "__main__":
    main()
