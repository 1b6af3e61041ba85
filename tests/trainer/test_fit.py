"""tessera.trainer.fit: one loop for the dVAE, the transformer and the CLIP.

Each task trains through the same `fit`: the loss falls, a resumed run is bit-identical to a straight
one, a non-finite loss is one error naming the step and the loss, the stop decision (time budget,
SLURM's preemption signal) is taken once for all ranks, fp16 runs with a loss scaler that skips
overflowing steps, and the CLIP's gradient clipping comes from its config.
"""

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from dvae_shapes import write_shape_shards  # noqa: E402
from rank_workers import spawn_ranks  # noqa: E402
from test_clip_train import COLORS, SHAPES, make_pairs  # noqa: E402
from token_fixtures import make_token_shards, tiny_root  # noqa: E402

from tessera.cluster import dist as D  # noqa: E402
from tessera.core.files import load_checkpoint  # noqa: E402
from tessera.core.root_config import load_root  # noqa: E402
from tessera.trainer.clip_train import ClipTask, train_clip  # noqa: E402
from tessera.trainer.config import ClipConfig  # noqa: E402
from tessera.trainer.dvae_train import DVAETask, train_dvae  # noqa: E402
from tessera.trainer.loop_state import DivergedError  # noqa: E402
from tessera.trainer.transformer_train import TransformerTask, train_transformer  # noqa: E402

TASKS = ("dvae", "transformer", "clip")
DVAE_TINY = [
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
    "dvae.train.lr=1e-2",
    "dvae.train.grad_clip=1.0",
    "dvae.train.lr_decay_steps=100",
    "dvae.train.kl_weight=0.01",
    "dvae.train.kl_warmup_steps=100",
    "dvae.train.temp_anneal_steps=100",
    "dvae.train.shuffle_buffer=8",
    "dvae.train.eval_samples=16",
    "dvae.train.eval_every=1000",
    "dvae.train.sample_every=1000",
    "dvae.train.time_budget_s=0",
]
CLIP_TINY = dict(
    d_model=32,
    n_layers=1,
    n_heads=2,
    image_width=8,
    image_size=16,
    embed_dim=16,
    text_len=8,
    batch_size=16,
    lr=3e-3,
    lr_min=1e-5,
    warmup_steps=5,
    eval_every=0,
    ckpt_every=0,
    eval_samples=32,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from tessera.dataprep.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("fit")
    write_shape_shards(d / "images", n_shards=2, per_shard=32, size=16, seed=5)
    make_token_shards(d / "tokens")
    train_tokenizer([f"a {c} {s}" for c in COLORS for s in SHAPES] * 8, d / "clip.model", vocab_size=40, threads=1)
    return {"images": str(d / "images"), "tokens": str(d / "tokens"), "tok": d / "clip.model", "pairs": make_pairs(96, seed=0)}


def train(task: str, inputs, out: Path, **loop):
    """Train `task` in `out` with these loop keys (tiny models); returns (summary, checkpoint, logged rows)."""
    if task == "dvae":
        cfg = load_root("demo", DVAE_TINY + [f"dvae.train.{k}={v}" for k, v in loop.items()])
        s = train_dvae(cfg, inputs["images"], None, out)
    elif task == "transformer":
        s = train_transformer(tiny_root(**{"threads": 1, **loop}), inputs["tokens"], out)
    else:
        s = train_clip(ClipConfig(**{**CLIP_TINY, **loop}), None, inputs["tok"], out, pairs=inputs["pairs"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return s, load_checkpoint(out, task), [r for r in rows if "loss" in r]


@pytest.mark.parametrize("task", TASKS)
def test_each_task_learns_through_the_one_loop(task, inputs, tmp_path):
    s, ck, rows = train(task, inputs, tmp_path / "run", steps=40, log_every=5)
    assert [r["step"] for r in rows] == list(range(5, 41, 5))
    assert min(r["loss"] for r in rows[-2:]) < 0.9 * rows[0]["loss"], [r["loss"] for r in rows]
    assert (s["steps"], s["stop_reason"], s["engine"], s["resumed_from"]) == (40, "steps", "plain", 0)
    assert ck["kind"] == task and ck["step"] == 40 and ck["metrics"]["steps"] == 40  # the summary rides in the last checkpoint
    assert all({"lr", "grad_norm", "elapsed_s"} <= set(r) for r in rows)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["checkpoint"] == s["checkpoint"]


@pytest.mark.parametrize("task", TASKS)
def test_resume_is_bit_exact_for_every_task(task, inputs, tmp_path):
    loop = dict(ema_decay=0.8, log_every=1)
    _, a, rows_a = train(task, inputs, tmp_path / "a", steps=8, **loop)
    train(task, inputs, tmp_path / "b", steps=3, **loop)
    s, b, rows_b = train(task, inputs, tmp_path / "b", steps=8, **loop)
    assert s["resumed_from"] == 3 and s["steps"] == 8
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert a["data"] == b["data"] if task != "clip" else torch.equal(a["data"][0]["order"], b["data"][0]["order"])
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    # the resumed run logged the same losses and learning rates for steps 4..8 as the straight one
    assert [(r["loss"], r["lr"]) for r in rows_a[3:]] == [(r["loss"], r["lr"]) for r in rows_b[3:]]


@pytest.mark.parametrize("task", TASKS)
def test_divergence_is_one_error_naming_the_step_and_the_loss(task, inputs, tmp_path, monkeypatch):
    cls = {"dvae": DVAETask, "transformer": TransformerTask, "clip": ClipTask}[task]
    real = cls.loss

    def poisoned(self, forward, batch, step, sch):
        loss, metrics = real(self, forward, batch, step, sch)
        return (loss * float("nan") if step == 4 else loss), metrics

    monkeypatch.setattr(cls, "loss", poisoned)
    prefix = {"dvae": "dvae.train", "transformer": "transformer.train", "clip": "clip"}[task]
    with pytest.raises(DivergedError) as e:
        train(task, inputs, tmp_path / "run", steps=10, ckpt_every=2, log_every=1)
    assert str(e.value) == f"{task} training diverged at step 5 (loss nan); lower {prefix}.lr"
    assert load_checkpoint(tmp_path / "run", task)["step"] == 4  # the last checkpoint is from before the bad step


def test_fp16_loss_scaler_skips_an_overflowing_step_and_goes_on(inputs, tmp_path, monkeypatch):
    """fp16 autocast on the CPU with the loop's GradScaler: the first updates overflow at the initial scale 2**16 and are
    skipped while the scale halves; an inf injected into one gradient at update 8 skips that update alone."""
    real = ClipTask.build_model
    calls = []

    def with_overflow(self):
        model = real(self)
        calls.clear()

        def hook(g):
            calls.append(1)
            return g * float("inf") if len(calls) == 8 else g

        model.image.proj.weight.register_hook(hook)
        return model

    clean, _, rows_c = train("clip", inputs, tmp_path / "clean", steps=12, log_every=1, precision="fp16")
    monkeypatch.setattr(ClipTask, "build_model", with_overflow)
    s, ck, rows = train("clip", inputs, tmp_path / "run", steps=12, log_every=1, precision="fp16")
    key = [(r["loss"], r["loss_scale"], r["skipped_steps"]) for r in rows]
    assert clean["precision"] == s["precision"] == "fp16" and s["steps"] == 12
    assert 1 <= clean["skipped_steps"] < 8 and rows_c[7]["skipped_steps"] == rows_c[6]["skipped_steps"]  # no overflow of its own at 8
    assert key[:7] == [(r["loss"], r["loss_scale"], r["skipped_steps"]) for r in rows_c[:7]]  # the same run until the injection
    assert rows[7]["skipped_steps"] == rows[6]["skipped_steps"] + 1 and rows[7]["loss_scale"] == rows[6]["loss_scale"] / 2
    assert rows[-1]["skipped_steps"] == rows[7]["skipped_steps"] == s["skipped_steps"] == clean["skipped_steps"] + 1
    assert all(int(st["step"]) == 12 - s["skipped_steps"] for st in ck["optimizer"]["state"].values())  # skipped: no Adam update
    assert all(torch.isfinite(v).all() for v in ck["model"].values()) and ck["scaler"]["scale"] == rows[-1]["loss_scale"]
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]  # and it went on learning


def test_clip_gradient_clipping_comes_from_the_config(inputs, tmp_path):
    norms = {}
    for clip in (1e-3, 0.0):
        s, ck, rows = train("clip", inputs, tmp_path / f"c{clip}", steps=1, log_every=1, grad_clip=clip)
        m = torch.cat([st["exp_avg"].flatten() for st in ck["optimizer"]["state"].values()])
        norms[clip] = (rows[0]["grad_norm"], m.norm().item())
    raw, first_moment = norms[1e-3]
    assert raw > 1e-2  # the gradient was far larger than the threshold...
    assert first_moment == pytest.approx(0.1 * 1e-3, rel=1e-3)  # ...and Adam saw it clipped: m = (1 - beta1) * clipped
    assert norms[0.0][1] == pytest.approx(0.1 * norms[0.0][0], rel=1e-3)  # grad_clip = 0: unclipped


def test_preemption_stop_file_checkpoints_and_resumes_exactly(inputs, tmp_path, monkeypatch):
    stop = tmp_path / "stop"
    monkeypatch.setenv("TESSERA_STOP_FILE", str(stop))
    real = ClipTask.observe

    def touch_after_three(self, step, row):  # SLURM's batch shell touches the file on its warning signal
        if step == 3:
            stop.touch()
        return real(self, step, row)

    monkeypatch.setattr(ClipTask, "observe", touch_after_three)
    s, ck, _ = train("clip", inputs, tmp_path / "b", steps=12, log_every=1, ema_decay=0.5)
    assert s["stop_reason"] == "preempted" and s["steps"] == ck["step"] == 4  # stopped after the step that saw it
    monkeypatch.undo()
    s, b, _ = train("clip", inputs, tmp_path / "b", steps=12, log_every=1, ema_decay=0.5)
    _, a, _ = train("clip", inputs, tmp_path / "a", steps=12, log_every=1, ema_decay=0.5)
    assert s["resumed_from"] == 4 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_no_config_is_mutated(inputs, tmp_path):
    cfg = load_root("demo", DVAE_TINY + ["dvae.train.steps=1"])
    train_dvae(cfg, inputs["images"], inputs["images"], tmp_path / "run")
    assert cfg.dvae.train.train_data == "" and cfg.dvae.train.eval_data == ""


# ---------------------------------------------------------------- two gloo ranks


def _rank(rank, world, port, inputs, out, mode):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TESSERA_PROGRESS="0")
    state = D.init(D.DistState(rank=rank, world_size=world, local_rank=rank, source="test"), backend="gloo")
    try:
        if mode == "budget":  # only rank 0's clock has a budget: rank 1 would train on forever alone
            budget = 4.0 if rank == 0 else 0.0
            s = train_transformer(tiny_root(steps=100000, batch_size=8, time_budget_s=budget, threads=1), inputs["tokens"], out, state)
        else:  # SLURM's warning signal reaches rank 1 only
            if rank == 1:
                threading.Thread(target=_signal_when_installed, daemon=True).start()
            cfg = load_root("demo", DVAE_TINY + ["dvae.train.steps=100000", "dvae.train.time_budget_s=120", "dvae.train.log_every=1"])
            s = train_dvae(cfg, inputs["images"], None, out, state)
    finally:
        D.shutdown(state)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(s))


def _signal_when_installed():
    while signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
        time.sleep(0.05)
    time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGUSR1)


@pytest.mark.parametrize("mode", ["budget", "signal"])
def test_two_ranks_stop_after_the_same_step(mode, inputs, tmp_path):
    out = tmp_path / "run"
    spawn_ranks(_rank, (2, D.free_port(), inputs, str(out), mode), 2)
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    reason = "time_budget" if mode == "budget" else "preempted"
    assert r0["stop_reason"] == r1["stop_reason"] == reason and r0["engine"] == "ddp"
    assert 0 < r0["steps"] == r1["steps"] < 100000 and r0["horizon"] == r1["horizon"]
    if mode == "budget" and r0["steps"] >= 25:  # rank 0 fitted the cosine horizon to its budget; rank 1 (no budget) got it
        assert r1["horizon"] < 100000
    ck = load_checkpoint(out, "transformer" if mode == "budget" else "dvae")
    assert ck["step"] == r0["steps"] and len(ck["data"]) == 2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == r0["steps"]
    if mode == "signal":
        assert r0["weights_sha256"] == r1["weights_sha256"]


# ---------------------------------------------------------------- per-resblock gradient scales (transformer.train.grad_scaling)

PER_BLOCK = dict(precision="fp16", grad_scaling="per_resblock", log_every=1)


def _scales(row: dict) -> list[float]:
    return [row[f"grad_scale/block_{i:02d}"] for i in range(4)]  # tiny_root: 4 resblocks


def test_per_resblock_fp16_follows_fp32_logs_the_paper_scales_and_resumes_exactly(inputs, tmp_path):
    from tessera.trainer.grad_scale import GROWTH

    _, _, ref = train("transformer", inputs, tmp_path / "fp32", steps=16, log_every=1)
    s, a, rows = train("transformer", inputs, tmp_path / "a", steps=16, **PER_BLOCK)
    assert s["precision"] == "fp16" and s["skipped_steps"] == 0 and a["scaler"] is None
    # M * 2^13 * 2^(k/1000) after k clean updates (M = 1 replica), every block, logged on every row
    for r in rows:
        assert _scales(r) == pytest.approx([2.0**13 * GROWTH ** r["step"]] * 4, rel=1e-12), r["step"]
        assert r["grad_scale/skipped"] == r["skipped_steps"] == 0 and r["grad_scale/min"] == r["grad_scale/max"]
    assert a["grad_scale"]["scales"] == pytest.approx([2.0**13 * GROWTH**16] * 4, rel=1e-12) and a["grad_scale"]["steps"] == 16
    # Tolerance: fp16 autocast rounds the matrix products to an 11-bit mantissa; measured on this tiny model over 16
    # updates (loss 2.87 -> 1.77), the fp16 losses stay within 1.9e-5 of the fp32 run's and the gradient norms within
    # 1.1e-4 (relative). 1e-3 on both leaves ~50x and ~9x room; a block left scaled (x8192) or unscaled twice would be
    # off by orders of magnitude in the norm (AdamW would hide such a constant factor in the loss curve).
    assert [r["step"] for r in rows] == [r["step"] for r in ref]
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(ref, rows)) < 1e-3
    assert all(abs(x["grad_norm"] - y["grad_norm"]) <= 1e-3 * x["grad_norm"] for x, y in zip(ref, rows))
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]
    # exact resume: the scales (and the cooldown state) ride in the checkpoint and come back
    _, mid, _ = train("transformer", inputs, tmp_path / "b", steps=4, **PER_BLOCK)
    assert mid["grad_scale"]["steps"] == 4
    s, b, rows_b = train("transformer", inputs, tmp_path / "b", steps=16, **PER_BLOCK)
    assert s["resumed_from"] == 4 and b["grad_scale"] == a["grad_scale"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [r["step"] for r in rows_b] == list(range(1, 17))  # both runs' lines, in one metrics.jsonl
    assert [(r["loss"], _scales(r)) for r in rows] == [(r["loss"], _scales(r)) for r in rows_b]


def test_per_resblock_overflow_in_one_block_skips_the_update_and_divides_only_its_scale(inputs, tmp_path, monkeypatch):
    from tessera.trainer.grad_scale import BACKOFF, GROWTH

    real = TransformerTask.build_model
    calls = []

    def with_overflow(self):
        model = real(self)

        def poison(_m, _args, out):  # the 6th backward: an inf in the gradient of block 2's MLP output
            calls.append(1)
            if len(calls) == 6:
                out.register_hook(lambda g: g * float("inf"))

        model.blocks[2].mlp.register_forward_hook(poison)
        return model

    monkeypatch.setattr(TransformerTask, "build_model", with_overflow)
    s, ck, rows = train("transformer", inputs, tmp_path / "run", steps=10, **PER_BLOCK)
    assert [r["skipped_steps"] for r in rows] == [0] * 5 + [1] * 5 and s["skipped_steps"] == ck["grad_scale"]["skipped"] == 1
    assert rows[5]["grad_norm"] == float("inf")  # the skipped update logs an infinite norm, as the global scaler's do
    for r in rows[5:]:  # k clean updates so far: the others grow, block 2 was divided once by sqrt(2)
        k = r["step"] - 1
        assert _scales(r) == pytest.approx([2.0**13 * GROWTH**k * f for f in (1, 1, BACKOFF, 1)], rel=1e-12), r["step"]
    assert ck["grad_scale"]["last_divided"][2] == 5
    assert all(int(st["step"]) == 9 for st in ck["optimizer"]["state"].values())  # skipped: no Adam update
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


@pytest.mark.parametrize("task", ["dvae", "clip", "zero"])  # the sharded layout takes them: tests/cluster/test_sharded_scales.py
def test_per_resblock_is_refused_where_it_cannot_work_in_one_line(task, inputs, tmp_path):
    from tessera.core.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        if task in ("dvae", "clip"):
            train(task, inputs, tmp_path / "run", steps=1, grad_scaling="per_resblock")
        else:
            root = tiny_root(("cluster.zero_stage=1",), steps=1, threads=1, grad_scaling="per_resblock")
            train_transformer(root, inputs["tokens"], tmp_path / "run")
    msg = str(e.value)
    assert "\n" not in msg
    prefix = {"dvae": "dvae.train", "clip": "clip"}.get(task, "transformer.train")
    assert msg.startswith(f"config key '{prefix}.grad_scaling': 'per_resblock' is for the "), msg
    if task in ("dvae", "clip"):
        assert msg.endswith(f"the {task} trains with 'global'")
    else:
        assert "cluster.zero_stage = 1 (DeepSpeed scales the loss itself)" in msg


@pytest.mark.parametrize("mode", ["horizon", "safety"])
def test_time_budget_mode_decides_the_horizon_and_whether_a_stop_is_a_failure(mode, inputs, tmp_path):
    """horizon: the budget ends the run and the cosine horizon shrinks to the updates that fit (no failure);
    safety: the horizon stays at `steps`, and the budget's stop is the summary's failure, naming the update."""
    cfg = tiny_root(steps=100000, batch_size=8, time_budget_s=3.0, threads=1, time_budget_mode=mode)
    s = train_transformer(cfg, inputs["tokens"], tmp_path / mode)
    assert s["stop_reason"] == "time_budget" and s["planned_steps"] == 100000 and 0 < s["steps"] < 100000
    if mode == "safety":
        assert s["horizon"] == 100000
        assert s["failure"] == f"transformer stopped by its safety time limit (3 s) at update {s['steps']} of 100000"
    else:
        assert s["horizon"] < 100000 and "failure" not in s
