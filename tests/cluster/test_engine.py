"""tessera.cluster.engine: plain, DDP (+PowerSGD) and DeepSpeed ZeRO 1-3 (+ CPU offload, bf16) on two real gloo ranks.

One pair of worker processes (this file run as a script) trains the same tiny regression model in
every mode in turn (DeepSpeed is imported once per process, which is most of the cost), writes
losses, each rank's full weights, and checkpoints; the tests below read what they wrote.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "trainer"))
from rank_workers import run_rank_workers  # noqa: E402

MODES = {
    "zero1": dict(zero_stage=1),
    "zero2": dict(zero_stage=2),
    "zero3": dict(zero_stage=3),
    "zero2_offload": dict(zero_stage=2, offload_optimizer=True, overlap_comm=True, bucket_mb=1),
    "zero1_bf16": dict(zero_stage=1, precision="bf16"),
    "ddp": dict(zero_stage=0),
    "ddp_powersgd": dict(zero_stage=0, powersgd_rank=2, powersgd_start_iter=2),
}
STEPS = 25


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-specific inputs of a fixed smooth target, so the ranks' gradients differ."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(16, 8, generator=g)
    w = torch.linspace(-1, 1, 32).view(8, 4)
    return x, torch.tanh(x @ w)


def worker(out: Path) -> None:
    from tessera.cluster.config import DistConfig
    from tessera.cluster.dist import discover, group_timeout_s, init, shutdown
    from tessera.cluster.engine import build_engine

    dist = init(discover(), backend="gloo")
    for mode, kw in MODES.items():
        d = out / mode
        cfg = DistConfig(**kw)
        model = make_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        eng = build_engine(model, opt, dist, cfg, grad_clip=1.0, micro_batch_size=16)
        applied = _applied(eng)
        applied.update(backend=torch.distributed.get_backend(), timeout=group_timeout_s())
        losses = []
        for step in range(STEPS):
            x, y = batch(dist.rank, step)
            loss = torch.nn.functional.mse_loss(eng(x), y)
            eng.backward(loss)
            eng.step()
            t = loss.detach().clone()
            dist.all_reduce_mean(t)
            losses.append(t.item())
        eng.save_checkpoint(d / "ckpt", STEPS, {"note": mode})
        full = eng.full_state_dict()
        torch.save(full, d / f"rank{dist.rank}.pt")
        # a fresh engine resumes from the checkpoint: same weights, same step, the client state back
        model2 = make_model()
        with torch.no_grad():
            for p in model2.parameters():
                p.add_(1.0)
        eng2 = build_engine(model2, torch.optim.AdamW(model2.parameters(), lr=1e-2), dist, cfg, grad_clip=1.0, micro_batch_size=16)
        step, client = eng2.load_checkpoint(d / "ckpt")
        resumed = eng2.full_state_dict()
        same = all(torch.equal(resumed[k], full[k]) for k in full)
        # and one more step trains on from there identically in both engines
        x, y = batch(dist.rank, STEPS)
        outs = []
        for e in (eng, eng2):
            loss = torch.nn.functional.mse_loss(e(x), y)
            e.backward(loss)
            e.step()
            outs.append(e.full_state_dict())
        cont_same = all(torch.allclose(outs[0][k], outs[1][k], atol=1e-6) for k in outs[0])
        # set_lr reaches the optimizer that really steps (DeepSpeed wraps it): lr 0 freezes the weights
        eng.set_lr(0.0)
        loss = torch.nn.functional.mse_loss(eng(x), y)
        eng.backward(loss)
        eng.step()
        after = eng.full_state_dict()
        frozen = all(torch.equal(after[k], outs[0][k]) for k in after)
        if dist.rank == 0:
            (d / "result.json").write_text(
                json.dumps(
                    {
                        "losses": losses,
                        "kind": eng.kind,
                        "resume_step": step,
                        "client": client,
                        "resume_same": same,
                        "continue_same": cont_same,
                        "lr0_frozen": frozen,
                        "applied": applied,
                    }
                )
            )
        dist.barrier()
    shutdown(dist)


def _applied(eng) -> dict:
    """What the DeepSpeed optimizer really runs with (bucket sizes in elements, overlap, offload), or DDP's bucket cap."""
    if eng.kind != "deepspeed":
        return {"bucket_bytes_cap": eng.wrapped.bucket_bytes_cap}
    o = eng.ds.optimizer
    return {
        "reduce_bucket_size": int(o.reduce_bucket_size),
        "allgather_bucket_size": int(getattr(o, "allgather_bucket_size", -1)),
        "overlap_comm": bool(getattr(o, "overlap_comm", False)),
        "offload": bool(getattr(o, "cpu_offload", False) or getattr(o, "offload_optimizer", False)),
        "optimizer": type(eng.ds_optimizer).__name__,
        "param_dtype": str(next(eng.module.parameters()).dtype),
    }


def single_worker(out: Path) -> None:
    """DeepSpeed in one process (no launcher): a one-rank group; checkpoints pruned to the last two."""
    from tessera.cluster.config import DistConfig
    from tessera.cluster.dist import discover, group_timeout_s
    from tessera.cluster.engine import build_engine
    from tessera.core.errors import CheckpointError

    dist = discover()
    assert dist.world_size == 1 and not torch.distributed.is_initialized()
    model = make_model()
    cfg = DistConfig(zero_stage=2, timeout_s=45.0, backend="gloo")
    eng = build_engine(model, torch.optim.AdamW(model.parameters(), lr=1e-2), dist, cfg, micro_batch_size=16)
    group = {"backend": torch.distributed.get_backend(), "world": torch.distributed.get_world_size(), "timeout": group_timeout_s()}
    losses = []
    for step in range(1, STEPS + 1):
        x, y = batch(0, step)
        loss = torch.nn.functional.mse_loss(eng(x), y)
        eng.backward(loss)
        eng.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == STEPS:
            eng.save_checkpoint(out / "ckpt", step, keep_last=2)
    torch.save(eng.full_state_dict(), out / "final.pt")
    (out / "ddp").mkdir()
    (out / "ddp" / "latest.pt").write_bytes(b"")
    try:
        eng.load_checkpoint(out / "ddp")
        refused = ""
    except CheckpointError as e:
        refused = str(e)
    (out / "result.json").write_text(
        json.dumps({"kind": eng.kind, "world": dist.world_size, "losses": losses, "refused": refused, "group": group})
    )


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine")
    for m in MODES:
        (out / m).mkdir()
    run_rank_workers(__file__, [str(out)], 2, "engine", {"DS_ACCELERATOR": "cpu"}, timeout=240)
    return out


@pytest.mark.parametrize("mode", list(MODES))
def test_two_ranks_train_and_agree(two_rank_run, mode):
    d = two_rank_run / mode
    res = json.loads((d / "result.json").read_text())
    assert res["kind"] == ("deepspeed" if MODES[mode]["zero_stage"] else "ddp")
    losses = res["losses"]
    assert sum(losses[-5:]) / 5 < 0.3 * sum(losses[:3]) / 3, losses
    w0, w1 = torch.load(d / "rank0.pt", weights_only=True), torch.load(d / "rank1.pt", weights_only=True)
    assert set(w0) == set(make_model().state_dict())
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    # the weights moved away from the common initialisation
    assert not torch.allclose(w0["0.weight"], make_model().state_dict()["0.weight"])
    assert res["resume_step"] == STEPS and res["client"] == {"note": mode}
    assert res["resume_same"] and res["lr0_frozen"]
    # and the next step is the same in both engines; with PowerSGD too: its error buffers resume from their mean over the
    # ranks and its warm-start Qs as they were (within float rounding: allclose)
    assert res["continue_same"]


@pytest.mark.parametrize("mode", list(MODES))
def test_cluster_keys_reach_deepspeed_and_ddp(two_rank_run, mode):
    """bucket_mb, overlap_comm and offload_optimizer as the DeepSpeed optimizer holds them; DDP's bucket cap; the group."""
    from tessera.cluster.config import DistConfig

    cfg = DistConfig(**MODES[mode])
    got = json.loads((two_rank_run / mode / "result.json").read_text())["applied"]
    assert got.pop("backend") == "gloo" and got.pop("timeout") == cfg.timeout_s
    if cfg.zero_stage == 0:
        assert got == {"bucket_bytes_cap": cfg.bucket_mb * 2**20}
        return
    assert got["reduce_bucket_size"] == cfg.bucket_mb * 2**20 // 4  # fp32 elements
    assert got["optimizer"] == ("DeepSpeedZeroOptimizer_Stage3" if cfg.zero_stage == 3 else "DeepSpeedZeroOptimizer")
    if cfg.zero_stage < 3:
        assert got["allgather_bucket_size"] == cfg.bucket_mb * 2**20 // 4
        assert got["overlap_comm"] == cfg.overlap_comm
    assert got["offload"] == cfg.offload_optimizer
    assert got["param_dtype"] == {"fp32": "torch.float32", "bf16": "torch.bfloat16"}[cfg.precision]  # DeepSpeed cast the model


@pytest.mark.parametrize("mode", ["zero1", "zero2", "zero3"])
def test_consolidated_zero_checkpoint_loads_into_fresh_model(two_rank_run, mode):
    from tessera.cluster.engine import consolidate_zero_checkpoint, zero_checkpoint_client_state

    d = two_rank_run / mode
    assert zero_checkpoint_client_state(d / "ckpt") == (STEPS, {"note": mode})
    ck = d / "ckpt"
    assert (ck / "latest").read_text().strip() == f"step_{STEPS:08d}"
    shards = sorted(p.name for p in (ck / f"step_{STEPS:08d}").iterdir() if "optim_states" in p.name)
    assert len(shards) == 2, shards  # one optimizer shard per rank
    sd = consolidate_zero_checkpoint(ck)
    trained = torch.load(d / "rank0.pt", weights_only=True)
    fresh = make_model()
    fresh.load_state_dict(sd)
    ref = make_model()
    ref.load_state_dict(trained)
    x = torch.randn(5, 8)
    assert torch.allclose(fresh(x), ref(x), atol=1e-6)
    assert not torch.allclose(fresh(x), make_model()(x), atol=1e-3)


def test_ddp_checkpoint_is_a_rundir_checkpoint(two_rank_run):
    from tessera.core.files import load_checkpoint

    ck = load_checkpoint(two_rank_run / "ddp" / "ckpt" / "latest.pt", "engine")
    assert ck["step"] == STEPS and ck["note"] == "ddp"  # client state at the top level, as the trainers write it
    fresh = make_model()
    fresh.load_state_dict(ck["model"])
    ref = make_model()
    ref.load_state_dict(torch.load(two_rank_run / "ddp" / "rank0.pt", weights_only=True))
    x = torch.randn(5, 8)
    assert torch.allclose(fresh(x), ref(x))
    assert (two_rank_run / "ddp" / "ckpt" / f"step_{STEPS:08d}.pt").exists()


def test_plain_engine_single_process(tmp_path):
    from tessera.cluster.dist import DistState
    from tessera.cluster.engine import PlainEngine, build_engine
    from tessera.core.errors import CheckpointError

    model = make_model()
    eng = build_engine(model, torch.optim.AdamW(model.parameters(), lr=1e-2), DistState())
    assert isinstance(eng, PlainEngine) and eng.module is model
    first = None
    for step in range(STEPS):
        x, y = batch(0, step)
        loss = torch.nn.functional.mse_loss(eng(x), y)
        first = first or loss.item()
        eng.backward(loss)
        eng.step()
    assert loss.item() < 0.3 * first
    eng.set_lr(0.5)
    assert eng.optimizer.param_groups[0]["lr"] == 0.5
    eng.save_checkpoint(tmp_path, 7, {"data": [1, 2]})
    with pytest.raises(ValueError, match="reserved"):
        eng.save_checkpoint(tmp_path, 8, {"model": 1})
    m2 = make_model()
    e2 = build_engine(m2, torch.optim.AdamW(m2.parameters()), DistState())
    with pytest.raises(CheckpointError, match="'transformer'"):
        build_engine(make_model(), torch.optim.AdamW(m2.parameters()), DistState(), checkpoint_kind="transformer").load_checkpoint(tmp_path)
    assert e2.load_checkpoint(tmp_path) == (7, {"data": [1, 2]})
    assert e2.optimizer.param_groups[0]["lr"] == 0.5
    assert all(torch.equal(a, b) for a, b in zip(m2.state_dict().values(), model.state_dict().values()))
    # an empty directory is a fresh start; a ZeRO directory is refused by name
    assert e2.load_checkpoint(tmp_path / "none") == (0, {})


def test_deepspeed_config_and_validation():
    from tessera.cluster.config import DistConfig
    from tessera.cluster.engine import deepspeed_config
    from tessera.core.errors import ConfigError

    c = deepspeed_config(DistConfig(zero_stage=3, precision="bf16", bucket_mb=1), world_size=4, micro_batch_size=8, grad_clip=1.0)
    assert c["zero_optimization"]["stage"] == 3 and c["train_batch_size"] == 32
    assert c["bf16"] == {"enabled": True} and c["gradient_clipping"] == 1.0
    assert c["zero_optimization"]["reduce_bucket_size"] == 2**18
    assert "optimizer" not in c
    for bad, key in (
        (dict(zero_stage=4), "zero_stage"),
        (dict(zero_stage=2, powersgd_rank=4), "powersgd_rank"),
        (dict(precision="bf16"), "precision"),
    ):
        with pytest.raises(ConfigError, match=key):
            DistConfig(**bad).validate()


def _fp16_supported() -> bool:
    return bool(getattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: False)())


@pytest.mark.skipif(_fp16_supported() or torch.cuda.is_available(), reason="this machine supports fp16, so it is not refused")
def test_fp16_refused_where_cpu_lacks_it():
    from tessera.cluster.config import DistConfig
    from tessera.cluster.dist import DistState
    from tessera.cluster.engine import build_engine
    from tessera.core.errors import ConfigError

    model = make_model()
    with pytest.raises(ConfigError, match="fp16"):
        build_engine(model, torch.optim.AdamW(model.parameters()), DistState(), DistConfig(zero_stage=2, precision="fp16"))


def test_deepspeed_single_process(tmp_path):
    from tessera.cluster.engine import consolidate_zero_checkpoint

    run_rank_workers(__file__, [str(tmp_path), "single"], 1, "deepspeed single process", {"DS_ACCELERATOR": "cpu"}, timeout=240)
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["kind"] == "deepspeed" and res["world"] == 1
    assert res["group"] == {"backend": "gloo", "world": 1, "timeout": 45.0}  # the one-rank group build_engine created
    assert sum(res["losses"][-5:]) / 5 < 0.3 * sum(res["losses"][:3]) / 3
    assert "DDP/plain checkpoint" in res["refused"]
    ck = tmp_path / "ckpt"
    assert sorted(p.name for p in ck.iterdir() if p.is_dir()) == ["step_00000020", f"step_{STEPS:08d}"]  # step 10 pruned
    sd = consolidate_zero_checkpoint(ck)
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    assert all(torch.equal(sd[k], final[k]) for k in final)
    older = consolidate_zero_checkpoint(ck, tag="step_00000020")
    assert not torch.equal(older["0.weight"], final["0.weight"])


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    sys.path.insert(0, str(REPO))
    if sys.argv[2:] == ["single"]:
        single_worker(Path(sys.argv[1]))
    else:
        worker(Path(sys.argv[1]))
