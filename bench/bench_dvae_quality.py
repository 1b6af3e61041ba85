"""dVAE quality for a CPU time budget on the demo's embedded dataset (issue: "report what it reaches
with a 30-minute CPU budget").

Trains `tessera train dvae` with the demo preset and a longer lr decay on the shards of a demo
output directory (`tessera demo --output DIR` makes them), then measures on the held-out shard:
PSNR/SSIM of hard reconstructions, codebook perplexity and unused codes, and how often the
project's detector recovers each attribute from the reconstructions (the transformer can only
learn what the codes keep). Writes a markdown table to --report.

The warm start and the temperature keep the demo's lengths (k-means warm start 500 updates, then
1 -> 1/16 over 400): stretching the anneal to the horizon kept the relaxation hot for thousands of
updates and the codebook collapsed (bench/results/dvae.md).

    python bench/bench_dvae_quality.py --demo-dir runs/demo --budget 1800 --steps 6000 --threads 1 [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from tessera.core.root_config import load_root

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo-dir", required=True, help="a `tessera demo` output dir (its shards/ and urls/)")
    ap.add_argument("--output", default="/tmp/tessera-dvae-quality")
    ap.add_argument("--budget", type=float, default=1800.0, help="training seconds")
    ap.add_argument("--steps", type=int, default=6000, help="update horizon of the lr decay (the temperature keeps the demo's fast anneal)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--report", default=None, help="markdown file to append the result to")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    import pyarrow.parquet as pq

    from tessera.dataprep import detector
    from tessera.trainer.data import iter_image_batches
    from tessera.trainer.dvae import load_dvae
    from tessera.trainer.dvae_train import train_dvae

    d = Path(a.demo_dir)
    over = [
        f"dvae.train.steps={a.steps}",
        f"dvae.train.lr_decay_steps={a.steps}",
        f"dvae.train.time_budget_s={a.budget}",
        f"dvae.train.eval_every={max(a.steps // 6, 1)}",
        f"dvae.train.sample_every={max(a.steps // 6, 1)}",
        f"dvae.train.ckpt_every={max(a.steps // 6, 1)}",
        *a.overrides,
    ]
    cfg = load_root("demo", over)
    t0 = time.time()
    s = train_dvae(cfg, str(d / "shards" / "train"), str(d / "shards" / "eval"), a.output)
    wall = time.time() - t0

    model, mc = load_dvae(a.output)
    rows = {r["url"]: r for r in pq.read_table(d / "urls" / "eval_urls.parquet").to_pylist()}
    xs, attrs = [], []
    for x, metas in iter_image_batches(str(d / "shards" / "eval"), mc.image_size, batch_size=100):
        xs.append(x)
        for m in metas:
            j = m.get("json") or m
            if isinstance(j, (bytes, str)):
                j = json.loads(j)
            attrs.append(rows[j["url"]])
    x = torch.cat(xs)
    with torch.no_grad():
        rec = model.reconstruct(x)
    acc = detector.score(rec, attrs)
    res = {
        "steps": s["steps"],
        "train_s": round(wall),
        "eval_psnr": round(s["eval_psnr"], 2),
        "eval_ssim": round(s["eval_ssim"], 3),
        "perplexity": round(s["perplexity"], 1),
        "unused_codes": s["unused_codes"],
        **{f"recon_{k}": round(v, 3) for k, v in acc.items() if k.endswith("_acc")},
    }
    print(json.dumps(res))
    if a.report:
        line = (
            f"| {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s) | {a.budget:.0f} s budget, horizon {a.steps} "
            f"| {res['steps']} | {res['eval_psnr']} | {res['eval_ssim']} | {res['perplexity']} | {res['unused_codes']} "
            f"| {res['recon_color_acc']} | {res['recon_shape_acc']} | {' '.join(a.overrides) or '-'} |\n"
        )
        with open(a.report, "a") as f:
            f.write(line)


if __name__ == "__main__":
    main()
