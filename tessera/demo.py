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
"""

from __future__ import annotations

import itertools
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

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

STAGE_DIRS = ("source", "urls", "shards", "tokenizer", "dvae", "tokens", "transformer", "export", "samples")
SAMPLES_PER_PROMPT = 4


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


def run_demo(cfg: Any, out: Path, samples_per_prompt: int = SAMPLES_PER_PROMPT) -> dict[str, Any]:
    """Run every stage into `out` (see the module docstring) and return the report written to report.json."""

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


def format_report(report: dict[str, Any]) -> str:
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
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
