"""The quick demo end to end (real HTTP server, crawler, tokenizer, dVAE, encoder, transformer,
export, sampling, detector), checked by its files and figures."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from tessera.cli import main as cli_main
from tessera.demo import demo_prompts, format_report
from tessera.status import read_status

# The quick run trains each model for ~30 s, too little for the full demo's accuracy targets
# (bench/bench_demo.py measures those). Its floors say that every stage learned something:
# the dVAE beats the best constant image by 4 dB (it reaches 19.4-20.1 dB for seeds 0-2, the
# constant image 12.7 dB), and generated backgrounds beat chance (1/3).
QUICK_PSNR_MARGIN_DB = 4.0
QUICK_MIN_BACKGROUND_ACC = 0.5


def global_mean_psnr(shards):
    """PSNR of reconstructing every held-out image as the mean held-out image (a trivial baseline)."""
    import torch

    from tessera.trainer.data import iter_image_batches
    from tessera.trainer.image_metrics import psnr

    x = torch.cat([b for b, _ in iter_image_batches(str(shards), 64, batch_size=100)])
    return psnr(x.mean(0, keepdim=True).expand_as(x), x).mean().item()


def test_demo_prompts_cover_every_colour_shape_pair():
    from tessera.dataprep.synthetic import COLORS, SHAPES

    prompts = demo_prompts()
    assert {(p["color"], p["shape"]) for p in prompts} == {(c, s) for c in COLORS for s in SHAPES}
    assert prompts == demo_prompts()  # fixed list


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    env = dict(os.environ, TESSERA_PROGRESS="0")
    r = subprocess.run(
        [sys.executable, "-m", "tessera.cli", "demo", "--quick", "--output", str(out)], capture_output=True, text=True, env=env, timeout=900
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return out, r


def test_quick_demo_report_and_figures(quick_demo):
    out, r = quick_demo
    report = json.loads((out / "report.json").read_text())
    assert report["num_prompts"] == len(demo_prompts())
    for key in ("color_acc", "shape_acc", "position_acc", "size_acc"):
        assert 0.0 <= report[key] <= 1.0
    assert report["dvae_psnr"] >= global_mean_psnr(out / "shards" / "eval") + QUICK_PSNR_MARGIN_DB, report
    assert report["background_acc"] >= QUICK_MIN_BACKGROUND_ACC, report
    assert report["total_seconds"] > 0 and set(report["stage_seconds"]) >= {"train dvae", "train transformer", "sample"}
    assert report["crawl_success"]["train"] > 0
    assert report["machine"]["cores"] >= 1 and set(report["machine"]["isa"]) >= {"avx2", "avx512_bf16", "amx_bf16"}
    if report["machine"]["isa"]["avx2"] and "ATEN_CPU_CAPABILITY" not in os.environ:  # issue 17: one kernel set on every x86 CPU
        assert report["machine"]["kernels"]["aten"] == "AVX2", report["machine"]
    assert set(report["training"]) >= {"dvae", "transformer"} and report["failures"] == []
    for name, row in report["training"].items():
        assert 0 < row["steps"] <= row["planned_steps"] and row["precision"] in ("fp32", "bf16"), (name, row)
    # issue 17: every quick stage is bound by its steps (time limits are safety stops), the transformer in fp32 on
    # every machine, and the images carry the prompt's colour (0.90 on machine D; 0.22 when it was time-bound)
    assert all(row["steps"] == row["planned_steps"] and row["stop_reason"] == "steps" for row in report["training"].values()), report
    assert report["training"]["transformer"]["precision"] == "fp32"
    assert report["color_acc"] >= 0.8 and report["position_acc"] >= 0.8, report
    assert "color_acc" in r.stdout and "dvae_psnr" in r.stdout  # the printed table
    # candidates > 1: a CLIP was trained for reranking; it tells held-out captions apart far above chance
    assert "train clip" in report["stage_seconds"]
    assert report["clip"]["i2t_top1"] >= 5 * report["clip"]["chance"], report["clip"]


def test_quick_demo_files(quick_demo):
    out, _ = quick_demo
    assert sorted(p.name for p in (out / "shards" / "train").glob("*.tar"))
    assert list((out / "shards" / "train").glob("*.parquet")) and list((out / "shards" / "train").glob("*_stats.json"))
    assert (out / "tokenizer" / "bpe.model").is_file()
    for run in ("dvae", "transformer"):
        d = out / run
        assert (d / "config.toml").is_file()
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) >= 2 and rows[-1]["step"] > rows[0]["step"]
        assert list((d / "tb").glob("events.out.tfevents.*"))
        assert (d / "checkpoints" / "latest.pt").is_file()
        assert list((d / "samples").glob("*.png"))
    assert (out / "tokens" / "manifest.json").is_file()
    assert (out / "export" / "config.json").is_file() and (out / "export" / "model.safetensors").is_file()
    assert json.loads((out / "export" / "config.json").read_text())["clip"] is not None  # exported for reranking
    grid = Image.open(out / "grid.png")
    n = len(demo_prompts()) * json.loads((out / "report.json").read_text())["samples_per_prompt"]
    assert len(list((out / "samples").glob("*.png"))) == n
    assert grid.size[0] > 64 and grid.size[1] > 64


def test_status_of_the_finished_demo(quick_demo, capsys):
    """`tessera status` on a real demo folder: each run's step and last loss are those its metrics.jsonl ends with."""
    out, _ = quick_demo
    st = read_status(out, query_slurm=False)
    assert st["kind"] == "demo" and st["finished"] and st["report"]["color_acc"] is not None
    assert set(st["runs"]) >= {"dvae", "transformer", "clip"}
    for name, run in st["runs"].items():
        rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
        losses = [r for r in rows if "loss" in r]
        assert run["finished"], (name, run)
        assert run["step"] == rows[-1]["step"] == run["checkpoint_step"], (name, run)
        assert run["loss"] == losses[-1]["loss"], (name, run)
    assert cli_main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "transformer" in text and "dvae" in text


def test_format_report_table():
    report = {
        "dvae_psnr": 27.1,
        "color_acc": 1.0,
        "shape_acc": 0.8,
        "position_acc": 0.5,
        "size_acc": 0.7,
        "heldout_color_acc": 1.0,
        "heldout_shape_acc": 0.5,
        "heldout_prompt_images": 8,
        "num_prompts": 18,
        "samples_per_prompt": 4,
        "stage_seconds": {"crawl train": 3.0},
        "total_seconds": 9.0,
    }
    text = format_report(report)
    assert "dvae_psnr (dB, held-out)  27.1" in text and "time: total" in text
    report["training"] = {"transformer": {"steps": 240, "planned_steps": 900, "stop_reason": "time_budget", "precision": "fp32"}}
    report["machine"] = {"cpu": "AMD EPYC", "kind": "avx2", "isa": {"avx2": True}, "cores": 2, "threads": 2, "torch": "2.13.0"}
    report["failures"] = ["transformer stopped by its safety time limit (380 s) at update 240 of 900"]
    text = format_report(report)
    assert "updates: transformer" in text and "240 of 900 (time_budget, fp32)" in text
    assert "AMD EPYC (avx2: avx2), 2 cores, 2 threads, torch 2.13.0" in text
    assert text.splitlines()[-1].split() == [
        "FAILED",
        "transformer",
        "stopped",
        *"by its safety time limit (380 s) at update 240 of 900".split(),
    ]


def test_a_new_demo_in_the_same_folder_starts_every_run_afresh(tmp_path):
    """_reset removes every stage folder the demo writes: a CLIP run left by an earlier demo was resumed before (its
    summary then said 89 of 100 updates in 0.3 s), so the new demo's reranker was the old one."""
    from tessera.demo import STAGE_DIRS, _reset

    for name in ("dvae", "transformer", "clip", "export"):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        (tmp_path / name / "checkpoints" / "latest.pt").write_bytes(b"x")
    (tmp_path / "report.json").write_text("{}")
    (tmp_path / "mine.txt").write_text("the user's own file")
    assert "clip" in STAGE_DIRS
    _reset(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]
