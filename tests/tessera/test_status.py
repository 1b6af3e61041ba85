"""`tessera status`: a demo-shaped folder of real (tiny) dVAE, transformer and CLIP runs, runs in progress,
runs that hold nothing yet, and folders that are not runs. The SLURM side is tests/cluster/test_slurm.py."""

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import tomli_w
import tomllib
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
from dvae_shapes import write_shape_shards  # noqa: E402
from token_fixtures import make_token_shards, tiny_root  # noqa: E402

from tessera.cli import main  # noqa: E402
from tessera.cluster import slurm  # noqa: E402
from tessera.core.root_config import load_root  # noqa: E402
from tessera.status import read_status  # noqa: E402
from tessera.trainer.clip_train import train_clip  # noqa: E402
from tessera.trainer.config import ClipConfig  # noqa: E402
from tessera.trainer.dvae_train import train_dvae  # noqa: E402
from tessera.trainer.rundir import RunDir  # noqa: E402
from tessera.trainer.transformer_train import train_transformer  # noqa: E402

DVAE = [
    "dvae.train.diversity_weight=0",
    "dvae.train.mse_weight=0",
    "dvae.train.codebook_init=none",
    "dvae.model.image_size=16",
    "dvae.model.n_groups=3",
    "dvae.model.n_hid=8",
    "dvae.model.n_blk_per_group=1",
    "dvae.model.vocab_size=32",
    "dvae.model.n_init=16",
    "dvae.train.batch_size=8",
    "dvae.train.shuffle_buffer=8",
    "dvae.train.eval_samples=16",
    "dvae.train.time_budget_s=0",
    "dvae.train.steps=6",
    "dvae.train.log_every=2",
    "dvae.train.eval_every=6",
    "dvae.train.sample_every=6",
    "dvae.train.ckpt_every=4",
]
CLIP = dict(
    d_model=32,
    n_layers=1,
    n_heads=2,
    image_width=8,
    image_size=16,
    embed_dim=16,
    text_len=8,
    batch_size=16,
    warmup_steps=2,
    steps=6,
    log_every=1,
    eval_every=0,
    ckpt_every=4,
    eval_samples=16,
)
STEPS = {"dvae": 6, "transformer": 10, "clip": 6}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A `tessera demo`-shaped output folder: dvae/, transformer/, clip/ trained for real (tiny), and report.json."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("status")
        out = root / "demo"
        write_shape_shards(out / "shards" / "train", n_shards=2, per_shard=16, size=16, seed=1)
        tokens = make_token_shards(out / "tokens")
        s_dvae = train_dvae(load_root("demo", DVAE), str(out / "shards" / "train"), None, out / "dvae")
        s_tr = train_transformer(tiny_root(steps=STEPS["transformer"]), str(tokens), out / "transformer")
        s_clip = train_clip(ClipConfig(**CLIP), str(out / "shards" / "train"), tokens / "bpe.model", out / "clip", seed=0)
        report = {"config": "tiny", "dvae_psnr": 12.5, "all_acc": 0.25, "dvae": s_dvae, "transformer": s_tr, "total_seconds": 9.0}
        (out / "report.json").write_text(json.dumps(report))
        return out, {"dvae": s_dvae, "transformer": s_tr, "clip": s_clip}, root
    finally:
        torch.set_num_threads(n)


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def table(out: str) -> dict[str, str]:
    """The printed key/value table of one run."""
    return {line[:16].strip(): line[16:].strip() for line in out.splitlines()}


def status(capsys, *args) -> tuple[int, str, str]:
    code = main(["status", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", ["dvae", "transformer", "clip"])
def test_finished_run_prints_its_steps_last_loss_and_finished(demo, capsys, name):
    out_dir, summaries, _ = demo
    run = out_dir / name
    rows = rows_of(run)
    last_loss = [r for r in rows if "loss" in r][-1]
    code, out, err = status(capsys, str(run), "--no-slurm")
    assert code == 0 and err == ""
    t = table(out)
    assert t["run"] == f"{run} ({name})"
    assert t["step"] == f"{STEPS[name]} / {STEPS[name]}"
    shown, at = t["loss"].split(" (step ")
    assert float(shown) == pytest.approx(last_loss["loss"], rel=1e-5) and at == f"{last_loss['step']})"
    assert t["finished"] == "yes (the configured steps reached)"
    assert t["last checkpoint"].startswith(f"step {STEPS[name]}, ")

    s = read_status(run, query_slurm=False)
    assert s["kind"] == name and s["step"] == STEPS[name] and s["target_steps"] == STEPS[name]
    assert s["loss"] == last_loss["loss"] and s["finished"] is True and s["stop_reason"] == "steps"
    assert s["checkpoint_step"] == STEPS[name]
    assert s["checkpoint_time"] == pytest.approx((run / "checkpoints" / "latest.pt").stat().st_mtime, abs=1e-3)
    assert s["slurm"] is None


def test_throughput_is_what_each_trainer_logs(demo):
    out_dir, summaries, _ = demo
    d = read_status(out_dir / "dvae", query_slurm=False)
    assert d["throughput_unit"] == "images/s"
    assert d["throughput"] == [r for r in rows_of(out_dir / "dvae") if "images_per_s" in r][-1]["images_per_s"]
    t = read_status(out_dir / "transformer", query_slurm=False)
    assert t["throughput_unit"] == "tokens/s"
    assert t["throughput"] == [r for r in rows_of(out_dir / "transformer") if "tokens_per_s" in r][-1]["tokens_per_s"]
    c = read_status(out_dir / "clip", query_slurm=False)  # the CLIP logs no rate: steps/s from its last two rows
    a, b = [r for r in rows_of(out_dir / "clip") if "loss" in r][-2:]
    assert c["throughput_unit"] == "steps/s" and c["throughput"] == pytest.approx((b["step"] - a["step"]) / (b["time"] - a["time"]))


def test_demo_folder_reports_each_run_and_the_report(demo, capsys):
    out_dir, summaries, _ = demo
    code, out, err = status(capsys, str(out_dir), "--no-slurm")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith(f"demo {out_dir}: finished, report.json ")
    assert "dvae_psnr 12.5" in lines[1] and "all_acc 0.25" in lines[1]
    header = lines[3].split()
    assert header[:3] == ["run", "step", "loss"]
    body = {line.split()[0]: line.split() for line in lines[4:7]}
    assert list(body) == ["dvae", "transformer", "clip"]
    for name, cols in body.items():
        assert cols[1] == f"{STEPS[name]}/{STEPS[name]}"
        assert float(cols[2]) == pytest.approx([r for r in rows_of(out_dir / name) if "loss" in r][-1]["loss"], rel=1e-5)
        assert cols[-1] == "yes" or " ".join(cols).endswith("yes (the configured steps reached)")
    code, out, _ = status(capsys, str(out_dir), "--json", "--no-slurm")
    s = json.loads(out)
    assert s["kind"] == "demo" and s["finished"] is True and s["report"]["dvae_psnr"] == 12.5
    assert {k: (v["kind"], v["step"], v["finished"]) for k, v in s["runs"].items()} == {
        k: (k, STEPS[k], True) for k in ("dvae", "transformer", "clip")
    }
    # the demo removes report.json when it starts again: then the folder is a demo in progress
    again = out_dir.parent / "demo-again"
    shutil.copytree(out_dir, again)
    (again / "report.json").unlink()
    s = read_status(again, query_slurm=False)
    assert s["kind"] == "demo" and s["finished"] is False and set(s["runs"]) == {"dvae", "transformer", "clip"}


def test_runs_in_progress_are_not_finished(demo, tmp_path, capsys):
    out_dir, _, _ = demo
    # a dVAE killed after step 4: no summary.json, metrics up to step 4 and a line cut short
    run = tmp_path / "dvae"
    shutil.copytree(out_dir / "dvae", run)
    (run / "summary.json").unlink()
    rows = [r for r in rows_of(run) if r["step"] <= 4]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')
    s = read_status(run, query_slurm=False)
    assert s["finished"] is False and s["stop_reason"] is None
    assert s["step"] == 6  # latest.pt (the final checkpoint) is still there, step 6
    assert s["loss"] == [r for r in rows if "loss" in r][-1]["loss"] and s["loss_step"] == 4
    code, out, _ = status(capsys, str(run), "--no-slurm")
    assert table(out)["finished"] == "no"
    # a resumed dVAE: config.toml rewritten after summary.json
    run2 = tmp_path / "dvae-resumed"
    shutil.copytree(out_dir / "dvae", run2)
    later = time.time() + 5
    os.utime(run2 / "config.toml", (later, later))
    s = read_status(run2, query_slurm=False)
    assert s["finished"] is False and any("resumed run" in n for n in s["notes"])
    # a transformer run at its step-10 checkpoint of 20
    tr = tmp_path / "transformer"
    shutil.copytree(out_dir / "transformer", tr)
    cfg = tomllib.loads((tr / "config.toml").read_text())
    cfg["transformer"]["train"]["steps"] = 20
    (tr / "config.toml").write_text(tomli_w.dumps(cfg))
    s = read_status(tr, query_slurm=False)
    assert (s["step"], s["target_steps"], s["finished"]) == (10, 20, False)
    code, out, _ = status(capsys, str(tr), "--no-slurm")
    assert table(out)["step"] == "10 / 20" and table(out)["finished"] == "no"


def test_transformer_stopped_on_its_time_budget(demo, tmp_path):
    torch.set_num_threads(1)
    tokens = demo[0] / "tokens"
    s = train_transformer(tiny_root(steps=100000, time_budget_s=0.5, log_every=1), str(tokens), tmp_path / "tr")
    assert s["stop_reason"] == "time_budget"
    st = read_status(tmp_path / "tr", query_slurm=False)
    assert st["finished"] is True and st["stop_reason"] == "time_budget"
    assert st["step"] == s["steps"] < 100000 and st["checkpoint_step"] == s["steps"]


def test_run_dirs_that_hold_nothing_yet(tmp_path, capsys):
    # a job recorded by submit-train that has not started: only slurm_job.json
    slurm.record_job(tmp_path / "queued", slurm.Submitted("77"), command=["tessera", "train", "transformer", "--output", "queued"])
    code, out, err = status(capsys, str(tmp_path / "queued"), "--no-slurm")
    assert code == 0 and err == ""
    t = table(out)
    assert t["run"].endswith("(transformer)") and t["step"] == "-" and t["loss"] == "-"
    assert t["last checkpoint"] == "none yet" and t["finished"] == "no"
    assert t["slurm job"] == "77: not queried; not started yet"
    # a trainer that has only created its run directory
    RunDir(tmp_path / "fresh", load_root("demo")).close()
    s = read_status(tmp_path / "fresh", query_slurm=False)
    assert (s["kind"], s["step"], s["loss"], s["checkpoint"], s["finished"]) == (None, None, None, None, False)


def test_a_corrupt_checkpoint_is_a_note(demo, tmp_path):
    run = tmp_path / "clip"
    shutil.copytree(demo[0] / "clip", run)
    (run / "checkpoints" / "latest.pt").write_bytes(b"not a checkpoint")
    s = read_status(run, query_slurm=False)
    assert s["kind"] == "clip" and s["finished"] is False
    assert any("could not be read" in n and "latest.pt" in n for n in s["notes"])


def test_not_a_run_dir_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    for target, says in (
        (tmp_path / "empty", f"'{tmp_path / 'empty'}' is not a run directory"),
        (tmp_path / "file.txt", f"'{tmp_path / 'file.txt'}' is not a run directory (a file)"),
        (tmp_path / "missing", f"run directory '{tmp_path / 'missing'}' does not exist"),
    ):
        code, out, err = status(capsys, str(target))
        assert code == 2 and out == ""
        assert err.startswith(f"tessera: error: {says}") and err.count("\n") == 1, err


def test_a_job_record_without_a_slurm_client_here(tmp_path, monkeypatch, capsys):
    """status run off the cluster (no squeue on PATH): the job id is still shown, its state UNKNOWN, with a note."""
    slurm.record_job(tmp_path / "run", slurm.Submitted("123"), command=["tessera", "train", "dvae", "--output", "run"])
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    s = read_status(tmp_path / "run")
    assert s["slurm"]["job_id"] == "123" and s["slurm"]["state"] == "UNKNOWN" and s["slurm"]["state_source"] is None
    assert s["notes"] == ["'squeue' not found: is the SLURM client installed and on PATH?"]
    code, out, _ = status(capsys, str(tmp_path / "run"))
    assert code == 0 and table(out)["slurm job"] == "123: UNKNOWN; not started yet"
