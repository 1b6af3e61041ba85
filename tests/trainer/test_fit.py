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
    import torch.multiprocessing as mp

    out = tmp_path / "run"
    mp.spawn(_rank, args=(2, D.free_port(), inputs, str(out), mode), nprocs=2, join=True)
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
