"""`tessera demo --ranks 4 --reuse` at tiny size: the demo's transformer on 4 local processes (2 groups of 2, FSDP2 within,
PowerSGD across, per-resblock scales) beside the same training in 1 process, on token shards as an earlier demo leaves them.

The token shards, tokenizer and dVAE are those of tests/trainer/token_fixtures.py (a learnable toy); the model is shrunk by
the same overrides as its tiny_root, so that the whole command (5 processes) takes well under a minute on 2 cores.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "trainer"))
from token_fixtures import make_token_shards  # noqa: E402

STEPS = 12
TINY = [
    "transformer.model.text_len=8",
    "transformer.model.d_model=32",
    "transformer.model.n_layers=4",
    "transformer.model.n_heads=2",
    "transformer.model.conv_kernel=3",
    "transformer.train.batch_size=16",
    "transformer.train.warmup_steps=3",
    "transformer.train.lr=3e-3",
    "transformer.train.shuffle_buffer=64",
    "transformer.train.threads=1",
    "cluster.powersgd_rank=4",  # the demo's 16 would hardly compress d_model 32
]


def demo(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, TESSERA_PROGRESS="0", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "tessera.cli", "demo", *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO
    )


@pytest.fixture(scope="module")
def ranks_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_ranks") / "run"
    make_token_shards(out / "tokens")
    (out / "report.json").write_text(json.dumps({"config": "demo", "kept": True}))  # an earlier demo's report: kept, extended
    r = demo("--ranks", "4", "--reuse", "--ranks-steps", str(STEPS), "--output", str(out), *TINY)
    assert r.returncode == 0, r.stderr[-4000:]
    return out, r


def test_report_has_the_distributed_section(ranks_run):
    out, r = ranks_run
    report = json.loads((out / "report.json").read_text())
    assert report["kept"] is True and "distributed transformer" in report["stage_seconds"]
    d = report["distributed"]
    fp16 = bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    assert d["layout"] == {
        "ranks": 4,
        "groups": 2,
        "ranks_per_group": 2,
        "engine": "sharded",
        "powersgd_rank": 4,
        "precision": "fp16" if fp16 else "fp32",
        "grad_scaling": "per_resblock",
        "resblocks": 4,
        "steps": STEPS,
        "batch_size": 16,
    }
    # the scales were on in both runs (the summary counts skipped updates only then), and nothing overflowed
    assert d["skipped_steps"] == d["skipped_steps_1_process"] == 0
    rate, b = d["compression_rate"], d["bytes_per_update"]
    assert rate["paper"] == pytest.approx(1 - 5 * 4 / (8 * 32), abs=1e-4)
    assert 0.3 < rate["measured"] < 1 and 0 < rate["measured_all_across_bytes"] < rate["measured"]
    assert b["saved"] == b["across_groups_uncompressed"] - b["across_groups"] > 0
    assert b["within_groups"] > b["across_groups"] > 0
    # both runs learn the toy from ln(vocab) ~ 3, and end within 15% of each other (same global batch and steps)
    assert d["final_loss"] < 2.6 and d["final_loss_1_process"] < 2.6, d
    assert abs(d["final_loss"] - d["final_loss_1_process"]) < 0.15 * d["final_loss_1_process"], d
    assert d["tokens_per_s"] > 0 and d["tokens_per_s_1_process"] > 0 and d["seconds"] > 0
    # the printed table
    assert "compression rate" in r.stdout and "bytes/update saved" in r.stdout and "(1 process)" in r.stdout


def test_the_runs_are_real(ranks_run):
    out, _ = ranks_run
    lay = json.loads((out / "distributed" / "ranks_4" / "layout.json").read_text())
    assert (lay["world_size"], lay["n_groups"], lay["ranks_per_node"]) == (4, 2, 2), lay
    for run in ("ranks_4", "single"):
        rows = [json.loads(x) for x in (out / "distributed" / run / "metrics.jsonl").read_text().splitlines()]
        rows = [x for x in rows if "loss" in x]
        assert rows[-1]["step"] == STEPS and "grad_scale/block_03" in rows[-1], run
    assert (out / "distributed" / "ranks_4" / "checkpoints" / "latest.sharded").is_file()
    assert (out / "distributed" / "single" / "checkpoints" / "latest.pt").is_file()


def test_the_stage_keeps_several_resblocks():
    """The demo's 1-layer model would leave one gradient scale: the distributed stage trains at least 2 resblocks."""
    from tessera.core.root_config import load_root
    from tessera.demo import RANKS_MIN_LAYERS, _stage_cfg

    cfg = load_root("demo", [])
    assert cfg.transformer.model.n_layers < RANKS_MIN_LAYERS == 2
    for ranks in (4, 1):
        m = _stage_cfg(cfg, 10, ranks).transformer.model
        assert (m.n_layers, m.d_model, m.image_grid) == (2, cfg.transformer.model.d_model, cfg.transformer.model.image_grid)
    four = load_root("demo", ["transformer.model.n_layers=4"])
    assert _stage_cfg(four, 10, 4).transformer.model.n_layers == 4


@pytest.mark.parametrize(
    "args,needle", [(("--ranks", "3"), "--ranks: expected an even number"), (("--reuse",), "--reuse: only with --ranks")]
)
def test_bad_ranks_are_one_line_errors(tmp_path, args, needle):
    r = demo(*args, "--output", str(tmp_path / "x"), timeout=60)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and needle in r.stderr, r.stderr


def test_reuse_without_tokens_names_the_folder(tmp_path):
    r = demo("--ranks", "4", "--reuse", "--output", str(tmp_path / "empty"), timeout=60)
    assert r.returncode == 2 and "no token shards in" in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
