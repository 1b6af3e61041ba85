"""`tessera demo`: the whole pipeline, end to end, with real components, on the embedded dataset.

1. generate the synthetic shapes dataset (held-out attribute combinations for evaluation);
2. serve it from a local HTTP server on 127.0.0.1 and write the url lists as parquet;
3. crawl both lists with the real crawler into webdataset shards;
4. train the BPE tokenizer on the training captions;
5. train the dVAE; 6. encode the training shards to token shards;
7. train the transformer; 8. export; 9. sample a fixed list of prompts into grid.png;
10. score: dVAE PSNR on held-out images, and the analytic detector's colour / shape / position
    accuracy on the generated images; report.json and a printed table.

The output folder holds one subfolder per stage. `report.json` is written last (atomically): its
presence means the run is complete.

With `ranks` (`tessera demo --ranks N`, `make demo-distributed` = 4), one more stage trains the demo's
transformer (with at least RANKS_MIN_LAYERS layers) on the encoded tokens with N local processes
(torch.multiprocessing, gloo) in the paper's layout, 2 groups of N/2 ranks (FSDP2 within a group, PowerSGD
across), with per-resblock gradient scales in fp16 where the CPU has fp16 matrix products (mkldnn), else in
fp32 with the scales still active; and the same training in 1 process. Both are bound by steps (not by time, so that they compare).
report.json gets a "distributed" section: the layout, the compression rate across groups (the paper's
1 - 5 r / (8 d_model) and the measured one), the bytes handed to collectives per update within and
across groups (summed over the ranks), the bytes saved against an uncompressed all-reduce, and the
final losses of both runs. `--reuse` runs only that stage on the tokens an earlier demo left in the
output folder.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from PIL import Image

from tessera.cluster.dist import free_port
from tessera.cluster.sharded_powersgd import paper_compression_rate
from tessera.core import machine
from tessera.core.errors import InputError
from tessera.core.progress import bar
from tessera.core.progress import enabled as progress_enabled
from tessera.dataprep import detector, synthetic
from tessera.dataprep.crawl import crawl
from tessera.dataprep.encode import encode_shards
from tessera.dataprep.imaging import save_image_grid
from tessera.dataprep.synthetic import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES
from tessera.dataprep.tokenizer import read_captions, train_tokenizer
from tessera.trainer.clip_train import train_clip
from tessera.trainer.data import iter_image_batches
from tessera.trainer.dvae import load_dvae
from tessera.trainer.dvae_train import train_dvae
from tessera.trainer.export import export
from tessera.trainer.image_metrics import psnr
from tessera.trainer.inference import load as load_inference
from tessera.trainer.transformer_train import train_transformer

STAGE_DIRS = ("source", "urls", "shards", "tokenizer", "dvae", "tokens", "transformer", "clip", "export", "samples", "distributed")
SAMPLES_PER_PROMPT = 4
RANKS_STEPS = 100  # updates of each run of the distributed stage (both runs; steps, not time, so that they compare)
# The PowerSGD rank across groups when cluster.powersgd_rank is 0. Rank 24 compresses the cross-group matrices by
# 88% (paper formula 1 - 5r/(8 d_model), above the paper's 85.9%) and ends within 10% of the 1-process loss: machine D,
# the demo's tokens (128 image codes), 100 updates, 4 ranks: +4.5% / +3.4% at seeds 0 / 1; rank 16 ended +13.4% there
# (+7.6% with 512 codes), rank 32 +2.3%, rank 4 +28% (bench/results/powersgd_quality.md).
RANKS_POWERSGD = 24
# Resblocks of the distributed stage's transformer at least: the demo's own 1-layer model would leave the per-resblock
# gradient scales a single scale, so the stage trains the paper's pattern cut to 2 layers (row, conv) when it is smaller.
RANKS_MIN_LAYERS = 2


def demo_prompts() -> list[dict[str, str]]:
    """The fixed prompt list: every (colour, shape) pair once, with sizes, positions and backgrounds in rotation."""

    sizes, positions, backgrounds = list(SIZES), list(POSITIONS), list(BACKGROUNDS)
    prompts = []
    for i, (color, shape) in enumerate(itertools.product(COLORS, SHAPES)):
        prompts.append(
            {
                "shape": shape,
                "color": color,
                "size": sizes[i % len(sizes)],
                "position": positions[i % len(positions)],
                "background": backgrounds[i % len(backgrounds)],
            }
        )
    return prompts


class Stages:
    """Times each stage and prints one line per stage as it ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.t0 = time.perf_counter()

    def run(self, name: str, fn, *args, **kw):
        print(f"[demo] {name} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        out = fn(*args, **kw)
        self.seconds[name] = round(time.perf_counter() - t, 2)
        print(f"[demo] {name} done in {self.seconds[name]:.1f} s", file=sys.stderr, flush=True)
        return out

    @property
    def total(self) -> float:
        return round(time.perf_counter() - self.t0, 2)


def _reset(out: Path) -> None:
    """Remove what an earlier demo left in `out` (only the demo's own names)."""
    for name in (*STAGE_DIRS, "report.json", "grid.png"):
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _heldout_psnr(dvae_dir: Path, eval_shards: Path) -> float:
    """PSNR of hard-code reconstructions (argmax codes -> decoder, EMA weights) over the held-out shards."""

    model, model_cfg = load_dvae(dvae_dir)
    model.eval()
    vals, n = 0.0, 0
    with torch.no_grad():
        for x, _ in iter_image_batches(str(eval_shards), model_cfg.image_size, batch_size=64):
            rec = model.decode_codes(model.get_codes(x))
            vals += psnr(rec, x).sum().item()
            n += x.shape[0]
    if n == 0:
        raise InputError(f"held-out shards '{eval_shards}' hold no images")
    return vals / n


def _data_stages(cfg: Any, out: Path, st: Stages) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stages 1-3: generate the synthetic dataset, serve it locally, crawl both url lists into shards."""

    src = st.run("synthetic data", synthetic.generate, out / "source", cfg.synthetic, seed=cfg.seed)
    server, base_url = synthetic.serve(out / "source")
    try:
        urls = synthetic.write_url_lists(out / "source", base_url, out / "urls")
        crawl_stats = {}
        for split in ("train", "eval"):
            crawl_stats[split] = st.run(
                f"crawl {split}", crawl, urls[split], str(out / "shards" / split), cfg.crawl, progress=progress_enabled()
            )
    finally:
        server.stop()
    return src, crawl_stats


def _model_stages(cfg: Any, out: Path, st: Stages) -> dict[str, Any]:
    """Stages 4-8: tokenizer, dVAE, encode, transformer, the CLIP (when reranking) and the export.

    Returns the report's summaries: {"dvae", "transformer", "clip"} (clip None when none was trained).
    """

    captions = list(read_captions(out / "shards" / "train"))
    tok_path = out / "tokenizer" / "bpe.model"
    st.run(
        "tokenizer",
        train_tokenizer,
        captions,
        tok_path,
        kind=cfg.tokenizer.kind,
        vocab_size=cfg.tokenizer.vocab_size,
        lowercase=cfg.tokenizer.lowercase,
        deterministic=cfg.tokenizer.deterministic,
    )

    dvae_summary = st.run("train dvae", train_dvae, cfg, str(out / "shards" / "train"), str(out / "shards" / "eval"), out / "dvae")
    st.run("encode", encode_shards, out / "dvae", tok_path, str(out / "shards" / "train"), out / "tokens", cfg=cfg.encode)
    tr_summary = st.run("train transformer", train_transformer, cfg, str(out / "tokens"), out / "transformer")
    clip_dir = None
    if cfg.sample.candidates > 1:  # reranking needs a CLIP: train the small one on the same shards
        clip_dir = out / "clip"
        clip_summary = st.run(
            "train clip",
            train_clip,
            cfg.clip,
            str(out / "shards" / "train"),
            tok_path,
            clip_dir,
            eval_data=str(out / "shards" / "eval"),
            seed=cfg.seed,
            root_cfg=cfg,
        )
    st.run("export", export, out / "transformer", out / "export", clip=clip_dir)
    return {
        "dvae": _small(dvae_summary),
        "transformer": _small(tr_summary),
        "clip": _small(clip_summary) if clip_dir is not None else None,
    }


def _generate(export_dir: Path, captions: list[str], samples_per_prompt: int, sample_cfg: Any) -> torch.Tensor:
    """Load the exported directory and sample `samples_per_prompt` images per caption."""
    pipe = load_inference(export_dir)
    return pipe.generate(captions, samples_per_prompt, sample_cfg)


def _sample_stage(cfg: Any, out: Path, st: Stages, prompts: list[dict[str, str]], samples_per_prompt: int) -> Any:
    """Stage 9: sample the prompts from the export, write one png per image and grid.png; returns the uint8 images."""

    captions_p = [synthetic.caption(a) for a in prompts]
    images = st.run("sample", _generate, out / "export", captions_p, samples_per_prompt, cfg.sample)  # (P * n, 3, H, W), prompt-major
    (out / "samples").mkdir(exist_ok=True)

    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype("uint8")
    with bar(len(arr), "write samples", "img") as pb:
        for i, a in enumerate(arr):
            Image.fromarray(a).save(out / "samples" / f"{i // samples_per_prompt:02d}_{i % samples_per_prompt}.png")
            pb.update(1)
    save_image_grid(images, out / "grid.png", nrow=samples_per_prompt * 2)
    return arr


def _score_samples(arr: Any, prompts: list[dict[str, str]], src: dict[str, Any], samples_per_prompt: int) -> dict[str, Any]:
    """Stage 10a: the detector's accuracies on all generated images and on those of held-out attribute combinations."""

    expected = [a for a in prompts for _ in range(samples_per_prompt)]
    acc = detector.score(arr, expected)
    held = {tuple(sorted(h.items())) for h in src["heldout_combinations"]}
    is_held = [tuple(sorted(a.items())) in held for a in expected]
    held_idx = [i for i, h in enumerate(is_held) if h]
    acc_held = detector.score(arr[held_idx], [expected[i] for i in held_idx]) if held_idx else None
    return {
        "color_acc": round(acc["color_acc"], 4),
        "shape_acc": round(acc["shape_acc"], 4),
        "position_acc": round(acc["position_acc"], 4),
        "size_acc": round(acc["size_acc"], 4),
        "background_acc": round(acc["background_acc"], 4),
        "all_acc": round(acc["all_acc"], 4),
        "heldout_prompt_images": len(held_idx),
        "heldout_color_acc": round(acc_held["color_acc"], 4) if acc_held else None,
        "heldout_shape_acc": round(acc_held["shape_acc"], 4) if acc_held else None,
    }


def _write_report(out: Path, report: dict[str, Any]) -> None:
    """Write report.json atomically (its presence marks a complete run)."""
    tmp = out / ".report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out / "report.json")


def run_demo(
    cfg: Any, out: Path, samples_per_prompt: int = SAMPLES_PER_PROMPT, ranks: int = 0, ranks_steps: int = RANKS_STEPS
) -> dict[str, Any]:
    """Run every stage into `out` (see the module docstring) and return the report written to report.json."""
    check_ranks(ranks, ranks_steps)

    out.mkdir(parents=True, exist_ok=True)
    _reset(out)
    torch.manual_seed(cfg.seed)
    st = Stages()

    src, crawl_stats = _data_stages(cfg, out, st)
    summaries = _model_stages(cfg, out, st)
    prompts = demo_prompts()
    arr = _sample_stage(cfg, out, st, prompts, samples_per_prompt)
    scores = _score_samples(arr, prompts, src, samples_per_prompt)
    dvae_psnr = st.run("held-out psnr", _heldout_psnr, out / "dvae", out / "shards" / "eval")

    report = {
        "config": cfg.name,
        "dvae_psnr": round(dvae_psnr, 2),
        **scores,
        "num_prompts": len(prompts),
        "samples_per_prompt": samples_per_prompt,
        "crawl_success": {k: v["successes"] for k, v in crawl_stats.items()},
        **summaries,
        "stage_seconds": st.seconds,
        "total_seconds": st.total,
        "torch_threads": torch.get_num_threads(),
        "machine": machine.describe(),
        "training": _training_table(summaries),
    }
    report["failures"] = [row["failure"] for row in report["training"].values() if row.get("failure")]
    if ranks:
        report["distributed"] = st.run("distributed transformer", run_distributed, cfg, out, ranks, ranks_steps)
        report["stage_seconds"], report["total_seconds"] = st.seconds, st.total
    _write_report(out, report)
    return report


# -- the distributed stage (--ranks) ------------------------------------------------------------------


def check_ranks(ranks: int, steps: int) -> None:
    if ranks and (ranks < 2 or ranks % 2):
        raise InputError(f"--ranks: expected an even number of processes >= 2 (2 groups of N/2), got {ranks}")
    if steps < 1:
        raise InputError(f"--ranks-steps: expected >= 1, got {steps}")


def distributed_precision() -> str:
    """fp16 where the CPU computes fp16 matrix products (mkldnn; DeepSpeed's test too), else fp32 (the scales stay on)."""
    if torch.cuda.is_available():
        return "fp16"
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", None)
    return "fp16" if probe is not None and bool(probe()) else "fp32"


def _stage_cfg(cfg: Any, steps: int, ranks: int) -> Any:
    """The demo's config for one run of the stage: step-bound, per-resblock scales, no samples; sharded on `ranks` > 1."""
    tc = dataclasses.replace(
        cfg.transformer.train,
        steps=steps,
        time_budget_s=0.0,
        precision=distributed_precision(),
        grad_scaling="per_resblock",
        log_every=max(1, steps // 20),
        sample_every=0,
        eval_every=0,
        ckpt_every=0,
        eval_data="",
        threads=1 if ranks > 1 else cfg.transformer.train.threads,
    )
    model = dataclasses.replace(cfg.transformer.model, n_layers=max(cfg.transformer.model.n_layers, RANKS_MIN_LAYERS))
    cluster = cfg.cluster
    if ranks > 1:
        rank = cluster.powersgd_rank or RANKS_POWERSGD
        cluster = dataclasses.replace(cluster, sharded=True, ranks_per_node=ranks // 2, powersgd_rank=rank, zero_stage=0, backend="gloo")
    return dataclasses.replace(cfg, transformer=dataclasses.replace(cfg.transformer, model=model, train=tc), cluster=cluster)


def _rank_main(rank: int, world: int, port: int, cfg: Any, tokens: str, run_dir: str) -> None:
    """One process of the N-process run (torch.multiprocessing): torchrun's variables, then the transformer's training."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    summary = train_transformer(cfg, tokens, run_dir)
    keep = {
        k: v for k, v in summary.items() if k in ("final_loss", "steps", "skipped_steps", "precision", "engine", "comm", "tokens_per_s")
    }
    (Path(run_dir) / f"rank_{rank}.json").write_text(json.dumps(keep))


def _run_ranks(cfg: Any, tokens: Path, run_dir: Path, ranks: int) -> list[dict[str, Any]]:
    run_dir.mkdir(parents=True, exist_ok=True)
    args = (ranks, free_port(), cfg, str(tokens), str(run_dir))
    mp.start_processes(_rank_main, args=args, nprocs=ranks, join=True, start_method="spawn")
    return [json.loads((run_dir / f"rank_{r}.json").read_text()) for r in range(ranks)]


def _comm_figures(per_rank: list[dict[str, Any]], rank: int, d_model: int) -> dict[str, Any]:
    """The compression rates and the bytes of one update, summed over the ranks, from each rank's comm_stats."""
    comm = [r.get("comm") or {} for r in per_rank]
    total = {k: sum(int(c.get(k, 0)) for c in comm) for k in ("inter_compressed_bytes", "inter_bytes", "inter_dense_bytes")}
    # each rank's compressed payload against the fp32 size of the same shards (its measured rate says how much that was)
    dense_of_compressed = sum(
        c["inter_compressed_bytes"] / (1.0 - c["measured_compression_rate"]) for c in comm if c.get("inter_compressed_bytes")
    )
    within = sum(int(c.get("intra_reduce_scatter_bytes", 0)) + int(c.get("intra_all_gather_bytes", 0)) for c in comm)
    return {
        "compression_rate": {
            "paper": round(paper_compression_rate(rank, d_model), 4),
            "measured": round(1.0 - total["inter_compressed_bytes"] / dense_of_compressed, 4) if dense_of_compressed else 0.0,
            "measured_all_across_bytes": round(1.0 - total["inter_bytes"] / total["inter_dense_bytes"], 4)
            if total["inter_dense_bytes"]
            else 0.0,
        },
        "bytes_per_update": {
            "within_groups": within,
            "across_groups": total["inter_bytes"],
            "across_groups_uncompressed": total["inter_dense_bytes"],
            "saved": total["inter_dense_bytes"] - total["inter_bytes"],
        },
    }


def run_distributed(cfg: Any, out: Path, ranks: int, steps: int = RANKS_STEPS) -> dict[str, Any]:
    """The distributed stage on `out`/tokens: `ranks` processes in 2 groups, and 1 process; returns the report's section."""
    check_ranks(ranks, steps)
    tokens = _tokens(out)
    where = out / "distributed"
    shutil.rmtree(where, ignore_errors=True)
    many, one = _stage_cfg(cfg, steps, ranks), _stage_cfg(cfg, steps, 1)
    t = time.perf_counter()
    per_rank = _run_ranks(many, tokens, where / f"ranks_{ranks}", ranks)
    t_many = time.perf_counter() - t
    t = time.perf_counter()
    single = train_transformer(one, str(tokens), where / "single")
    t_one = time.perf_counter() - t
    tc = many.transformer.train
    return {
        "layout": {
            "ranks": ranks,
            "groups": 2,
            "ranks_per_group": ranks // 2,
            "engine": per_rank[0]["engine"],
            "powersgd_rank": many.cluster.powersgd_rank,
            "precision": per_rank[0]["precision"],
            "grad_scaling": tc.grad_scaling,
            "resblocks": many.transformer.model.n_layers,
            "steps": steps,
            "batch_size": tc.batch_size,
        },
        **_comm_figures(per_rank, many.cluster.powersgd_rank, cfg.transformer.model.d_model),
        "final_loss": round(sum(r["final_loss"] for r in per_rank) / ranks, 4),
        "final_loss_1_process": round(float(single["final_loss"]), 4),
        "skipped_steps": max(int(r.get("skipped_steps", 0)) for r in per_rank),
        "skipped_steps_1_process": int(single.get("skipped_steps", 0)),
        "tokens_per_s": per_rank[0]["tokens_per_s"],  # the loop's own measure, over its updates (the global batch)
        "tokens_per_s_1_process": single["tokens_per_s"],
        "seconds": round(t_many, 1),  # wall time, process starts included
        "seconds_1_process": round(t_one, 1),
    }


def _tokens(out: Path) -> Path:
    tokens = out / "tokens"
    if not (tokens / "manifest.json").is_file():
        raise InputError(f"distributed demo: no token shards in '{tokens}' (manifest.json); run the demo's stages first")
    return tokens


def run_distributed_only(cfg: Any, out: Path, ranks: int, steps: int = RANKS_STEPS) -> dict[str, Any]:
    """`tessera demo --ranks N --reuse`: the distributed stage on an earlier demo's tokens; its report.json gains the section
    (a report with the config and that section only where the folder holds none)."""
    check_ranks(ranks, steps)
    _tokens(out)
    path = out / "report.json"
    report = json.loads(path.read_text()) if path.is_file() else {"config": cfg.name}
    st = Stages()
    report["distributed"] = st.run("distributed transformer", run_distributed, cfg, out, ranks, steps)
    report.setdefault("stage_seconds", {}).update(st.seconds)
    _write_report(out, report)
    return report


def _small(summary: Any) -> Any:
    """Keep the scalar entries of a stage summary for the report."""
    if not isinstance(summary, dict):
        return None
    return {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _training_table(summaries: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per training stage: updates done of planned, why it stopped, its precision and a failure (a safety stop), if any."""
    keys = ("steps", "planned_steps", "stop_reason", "precision", "failure")
    return {name: {k: s.get(k) for k in keys if k in s} for name, s in summaries.items() if isinstance(s, dict)}


def format_distributed(d: dict[str, Any]) -> list[tuple[str, Any]]:
    lay, rate, b = d["layout"], d["compression_rate"], d["bytes_per_update"]
    return [
        (
            "distributed layout",
            f"{lay['ranks']} ranks: {lay['groups']} groups x {lay['ranks_per_group']} ({lay['engine']}, PowerSGD r{lay['powersgd_rank']})",
        ),
        (
            "distributed precision",
            f"{lay['precision']}, {lay['grad_scaling']} scales ({lay.get('resblocks', '?')} resblocks), {lay['steps']} updates of {lay['batch_size']}",
        ),
        (
            "compression rate",
            f"{rate['measured']:.4f} measured on the compressed matrices, {rate['paper']:.4f} paper (1 - 5r/(8 d_model))",
        ),
        ("bytes/update within groups", f"{b['within_groups']:,}"),
        ("bytes/update across groups", f"{b['across_groups']:,} of {b['across_groups_uncompressed']:,} uncompressed"),
        (
            "bytes/update saved",
            f"{b['saved']:,} across groups ({rate['measured_all_across_bytes']:.1%}, with the uncompressed embeddings, gains, biases)",
        ),
        ("final loss", f"{d['final_loss']:.4f} ({lay['ranks']} ranks) vs {d['final_loss_1_process']:.4f} (1 process)"),
        ("skipped updates", f"{d['skipped_steps']} ({lay['ranks']} ranks) vs {d['skipped_steps_1_process']} (1 process)"),
        ("tokens/s", f"{d['tokens_per_s']:,.0f} ({lay['ranks']} ranks) vs {d['tokens_per_s_1_process']:,.0f} (1 process)"),
    ]


def format_report(report: dict[str, Any]) -> str:
    if "dvae_psnr" not in report:  # --reuse on a folder without a finished demo: the distributed section only
        rows = format_distributed(report["distributed"])
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
    rows = [
        ("dvae_psnr (dB, held-out)", report["dvae_psnr"]),
        ("color_acc", report["color_acc"]),
        ("shape_acc", report["shape_acc"]),
        ("position_acc", report["position_acc"]),
        ("size_acc", report["size_acc"]),
        (
            "heldout color/shape acc",
            f"{report['heldout_color_acc']} / {report['heldout_shape_acc']} ({report['heldout_prompt_images']} images)",
        ),
        ("prompts x samples", f"{report['num_prompts']} x {report['samples_per_prompt']}"),
    ]
    for name, t in report.get("training", {}).items():
        planned = f" of {t['planned_steps']}" if t.get("planned_steps") is not None else ""
        rows.append((f"updates: {name}", f"{t.get('steps')}{planned} ({t.get('stop_reason')}, {t.get('precision')})"))
    rows += [(f"time: {k}", f"{v:.1f} s") for k, v in report["stage_seconds"].items()]
    rows.append(("time: total", f"{report['total_seconds']:.1f} s"))
    if report.get("machine"):
        rows.append(("machine", machine.one_line(report["machine"])))
    rows += [("FAILED", f) for f in report.get("failures", [])]
    if report.get("distributed"):
        rows += format_distributed(report["distributed"])
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
