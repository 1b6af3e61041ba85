"""Where the demo's compute goes (issue 17, requirement 3): per stage, the FLOPs it needs, the rate it reached
against this machine's measured matmul peak, and its floor (FLOPs / peak).

    python bench/bench_demo_flops.py --report runs/demo/report.json [--config demo] [--md bench/results/demo.md]

Counts:
- model FLOPs: 3 x forward FLOPs per training sample (forward + backward), the forward FLOPs of the planner's
  model shapes (tessera.cluster.plan_model: matmuls and convolutions, attention counting only the pairs the
  layer pattern allows); encode is the dVAE encoder's forward only (counted by FlopCounterMode); sampling is one forward per sampled sequence
  (with the KV cache each position is computed once), the CLIP scores are counted with the CLIP.
- executed FLOPs: what torch runs for one training step, counted by torch.utils.flop_counter.FlopCounterMode
  (matmuls and convolutions, the transformer's attention as the dense masked products the CPU path runs),
  times the updates the report says were done.
- peak: the best of a few 2048^3 matmuls on this machine's threads, in fp32 and, where the CPU has native bf16,
  bf16; a stage's floor uses the peak of the precision it trained in.
The rates are over each stage's wall time in the report, which includes data loading, evaluation and checkpoints.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from tessera.cluster.plan_model import dvae_shape, transformer_shape
from tessera.core.machine import describe, one_line
from tessera.core.root_config import load_root
from tessera.trainer.clip import CLIP
from tessera.trainer.dvae import DVAE
from tessera.trainer.transformer import DALLE


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Best FLOP/s of an n^3 matmul in `dtype` on torch's current threads."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def executed(fn) -> float:
    """FLOPs torch runs in `fn()` (forward and backward), by FlopCounterMode."""
    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def stage_flops(cfg, report: dict) -> list[dict]:
    """One row per stage: name, updates or items, model FLOPs, executed FLOPs (None where not counted), precision."""
    tr, dv, cl = report.get("transformer") or {}, report.get("dvae") or {}, report.get("clip") or {}
    tm = cfg.transformer.model
    tm.text_vocab, tm.image_vocab = cfg.tokenizer.vocab_size, cfg.dvae.model.vocab_size
    ts, ds = transformer_shape(tm), dvae_shape(cfg.dvae.model)
    n_train = int(cfg.synthetic.num_train * (1 - cfg.synthetic.holdout_fraction))
    dvae = DVAE(cfg.dvae.model)
    x = torch.rand(cfg.dvae.train.batch_size, 3, cfg.dvae.model.image_size, cfg.dvae.model.image_size)
    dvae_step = executed(lambda: dvae(x, 1.0)[1].float().mean().backward())
    with torch.no_grad():
        enc = executed(lambda: dvae.encoder(x)) / len(x)  # per image
    model = DALLE(tm)
    b = cfg.transformer.train.batch_size
    text = torch.randint(0, tm.text_vocab, (b, tm.text_len))
    image = torch.randint(0, tm.image_vocab, (b, tm.image_grid**2))
    tr_step = executed(lambda: model.loss(text, image)["loss"].backward())
    rows = [
        dict(stage="train dvae", n=dv.get("steps", 0), model=3 * ds.flops_fwd * cfg.dvae.train.batch_size, step=dvae_step),
        dict(stage="encode", n=n_train, model=enc, step=enc),
        dict(stage="train transformer", n=tr.get("steps", 0), model=3 * ts.flops_fwd * b, step=tr_step),
    ]
    rows[0]["precision"], rows[2]["precision"] = dv.get("precision", "fp32"), tr.get("precision", "fp32")
    if cl:
        clip = CLIP(cfg.clip, cfg.tokenizer.vocab_size + cfg.clip.text_len)
        imgs, ids = (
            torch.rand(cfg.clip.batch_size, 3, 64, 64),
            torch.randint(0, cfg.tokenizer.vocab_size, (cfg.clip.batch_size, cfg.clip.text_len)),
        )
        clip_step = executed(lambda: clip(imgs, ids).backward())
        rows.append(dict(stage="train clip", n=cl.get("steps", 0), model=clip_step, step=clip_step, precision=cl.get("precision", "fp32")))
    seqs = report.get("num_prompts", 0) * report.get("samples_per_prompt", 0) * max(cfg.sample.candidates, 1)
    rows.append(dict(stage="sample", n=seqs, model=ts.flops_fwd, step=None, precision="fp32"))
    for r in rows:
        r.setdefault("precision", "fp32")
        r["model_total"] = r["model"] * r["n"]
        r["executed_total"] = r["step"] * r["n"] if r["step"] is not None else None
    return rows


def table(rows: list[dict], report: dict, peaks: dict[str, float]) -> str:
    secs = report["stage_seconds"]
    out = [
        "| stage | updates / items | model GFLOP | executed GFLOP | wall s | achieved GFLOP/s (model) | of peak | floor s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        wall = secs.get(r["stage"])
        peak = peaks.get(r["precision"], peaks["fp32"])
        rate = r["model_total"] / wall / 1e9 if wall else None
        ex = f"{r['executed_total'] / 1e9:,.0f}" if r["executed_total"] is not None else "-"
        out.append(
            f"| {r['stage']} ({r['precision']}) | {r['n']:,} | {r['model_total'] / 1e9:,.0f} | {ex} | "
            f"{wall if wall is not None else '-'} | {f'{rate:.1f}' if rate else '-'} | "
            f"{f'{100 * rate * 1e9 / peak:.0f}%' if rate else '-'} | {r['model_total'] / peak:.1f} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", required=True, help="a finished demo's report.json")
    ap.add_argument("--config", default=None, help="its preset (default: the report's config name)")
    ap.add_argument("--md", default=None, help="append the table to this markdown file")
    args = ap.parse_args()
    report = json.loads(Path(args.report).read_text())
    cfg = load_root(args.config or report["config"])
    torch.set_num_threads(report.get("torch_threads", torch.get_num_threads()))
    m = describe()
    peaks = {"fp32": matmul_peak(torch.float32)}
    if m["isa"]["avx512_bf16"] or m["isa"]["amx_bf16"]:
        peaks["bf16"] = matmul_peak(torch.bfloat16)
    rows = stage_flops(cfg, report)
    head = f"machine: {one_line(m)}; matmul peak " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items())
    text = f"{head}\nreport: {args.report} ({report['config']}, total {report['total_seconds']:.0f} s)\n\n{table(rows, report, peaks)}\n"
    print(text)
    if args.md:
        with open(args.md, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
