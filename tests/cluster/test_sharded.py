"""tessera.cluster.sharded: FSDP2 within groups, PowerSGD across them, on real gloo process groups (1, 2 and 4 ranks).

This file, run as a script under RANK/WORLD_SIZE/..., is the worker: it trains two tiny models (a
residual MLP with an unevenly sharded head, and a 2-layer DALLE with d_model 32) on a fixed global
batch split by rank, in each layout and mode, and writes loss curves, byte counts, shard shapes,
full weights, error buffers and checkpoints; the tests below read what it wrote.
"""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
STEPS = 8
GLOBAL_BATCH = 8
LR = 1e-2
FULL_RANK = 64  # clipped to each shard's smaller side: exact
LOW_RANK = 2
SCALE = 8.0
CKPT_AT = 4


class GradTimes(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by `c`."""

    @staticmethod
    def forward(ctx, x, c):
        ctx.c = c
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.c, None


class Block(torch.nn.Module):
    """A resblock with its own gradient scale (the paper's per-resblock scaling): its parameters' gradients are `grad_scale` x."""

    def __init__(self, d: int):
        super().__init__()
        self.ln = torch.nn.LayerNorm(d)
        self.fc = torch.nn.Linear(d, 2 * d)
        self.proj = torch.nn.Linear(2 * d, d)
        self.grad_scale = 1.0

    def forward(self, x):
        s = self.grad_scale
        branch = self.proj(torch.nn.functional.gelu(self.fc(self.ln(GradTimes.apply(x, 1.0 / s)))))
        return x + GradTimes.apply(branch, s)


class ResMLP(torch.nn.Module):
    def __init__(self, d: int = 32):
        super().__init__()
        self.inp = torch.nn.Linear(6, d)
        self.blocks = torch.nn.ModuleList(Block(d) for _ in range(2))
        self.head = torch.nn.Linear(d, 5)  # 5 rows: shards of 3 and 2 rows in a group of 2 (padding)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def dalle_cfg():
    from tessera.trainer.config import TransformerModelConfig

    return TransformerModelConfig(text_len=8, text_vocab=64, image_grid=4, image_vocab=48, d_model=32, n_layers=2, n_heads=4)


def make_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        return ResMLP()
    from tessera.trainer.transformer import DALLE

    return DALLE(dalle_cfg())


def global_batch(name: str, step: int):
    g = torch.Generator().manual_seed(1000 + step % 2)  # two batches in turn: the loss falls in a few steps
    if name == "mlp":
        x = torch.randn(GLOBAL_BATCH, 6, generator=g)
        y = torch.stack([torch.sin(x @ torch.linspace(-1, 1, 6) * (i + 1)) for i in range(5)], dim=1)
        return x, y
    return torch.randint(0, 64, (GLOBAL_BATCH, 8), generator=g), torch.randint(0, 48, (GLOBAL_BATCH, 16), generator=g)


def loss_of(name: str, model, batch, rank: int, world: int) -> torch.Tensor:
    per = GLOBAL_BATCH // world
    a, b = (t[rank * per : (rank + 1) * per] for t in batch)
    if name == "mlp":
        return torch.nn.functional.mse_loss(model(a), b)
    return model.loss(a, b)["loss"]


def make_opt(params):
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.01)


# -- the worker ----------------------------------------------------------------------------------------
def _mean(t: torch.Tensor, world: int) -> float:
    t = t.detach().clone()
    if world > 1:
        torch.distributed.all_reduce(t)
    return t.item() / world


def train(eng, name: str, dist, steps: range) -> list[float]:
    losses = []
    for step in steps:
        loss = loss_of(name, eng.module, global_batch(name, step), dist.rank, dist.world_size)
        eng.backward(loss)
        eng.step()
        losses.append(_mean(loss, dist.world_size))
    return losses


def plain_curve(name: str) -> list[float]:
    model = make_model(name)
    opt = make_opt(model.parameters())
    losses = []
    for step in range(STEPS):
        loss = loss_of(name, model, global_batch(name, step), 0, 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def layouts_for(world: int) -> list[tuple[int, int]]:
    """(ranks_per_node, powersgd_rank) runs at this world size."""
    if world == 1:
        return [(1, 0)]
    if world == 2:
        return [(2, 0), (1, 0), (1, FULL_RANK)]
    return [(2, 0), (2, FULL_RANK), (2, LOW_RANK)]


def curves_worker(out: Path, dist) -> None:
    from tessera.cluster.sharded import ShardedPowerSGDEngine

    res: dict = {}
    for name in ("mlp", "dalle"):
        if dist.world_size == 1:
            res[f"{name}/plain"] = plain_curve(name)
        for k, r in layouts_for(dist.world_size):
            model = make_model(name)
            opt = make_opt(model.parameters()) if r else make_opt  # both ways of handing the optimizer in
            eng = ShardedPowerSGDEngine(model, opt, dist, ranks_per_node=k, powersgd_rank=r, grad_clip=1.0, d_model=32)
            key = f"{name}/{dist.world_size // k}x{k}/r{r}"
            losses = train(eng, name, dist, range(STEPS))
            full = eng.full_state_dict()
            res[key] = {
                "losses": losses,
                "kind": eng.kind,
                "stats": eng.comm_stats(),
                "expected": vars(eng.reducer.expected_bytes()),
                "local_shapes": {n: list(p.to_local().shape) for n, p in eng.module.named_parameters()},
                "grad_norm": eng.last_grad_norm,
            }
            torch.save(full, out / f"{key.replace('/', '_')}_rank{dist.rank}.pt")
            torch.save(dict(eng.reducer.error_state()), out / f"{key.replace('/', '_')}_errors_rank{dist.rank}.pt")
    if dist.world_size == 4:
        res["dalle/build_engine"] = through_build_engine(dist)
        scaled_and_overflow(out, dist, res)
        checkpoint_first(out, dist, res)
    (out / f"rank{dist.rank}.json").write_text(json.dumps(res))


def through_build_engine(dist) -> dict:
    """cluster.sharded = true reaches this layout through build_engine, the one place that wraps models."""
    from tessera.cluster.config import DistConfig
    from tessera.cluster.engine import build_engine

    model = make_model("dalle")
    cfg = DistConfig(backend="gloo", sharded=True, ranks_per_node=2, powersgd_rank=FULL_RANK)
    eng = build_engine(model, make_opt(model.parameters()), dist, cfg, grad_clip=1.0)
    return {"kind": eng.kind, "losses": train(eng, "dalle", dist, range(STEPS))}


def scaled_and_overflow(out: Path, dist, res: dict) -> None:
    """blocks.0 backpropagates at SCALE x and the loop unscales after backward; then one overflowed step."""
    from tessera.cluster.sharded import ShardedPowerSGDEngine

    model = make_model("mlp")
    model.blocks[0].grad_scale = SCALE
    scale = lambda fqn: SCALE if fqn.startswith("blocks.0.") else 1.0  # noqa: E731
    eng = ShardedPowerSGDEngine(model, make_opt, dist, ranks_per_node=2, powersgd_rank=LOW_RANK, grad_clip=1.0, grad_scale=scale)
    losses = []
    for step in range(STEPS):
        loss = loss_of("mlp", eng.module, global_batch("mlp", step), dist.rank, dist.world_size)
        eng.backward(loss)
        with torch.no_grad():
            for n, p in eng.module.named_parameters():
                p.grad.div_(scale(n))
        eng.step()
        losses.append(_mean(loss, dist.world_size))
    res["scaled/losses"] = losses
    torch.save(dict(eng.reducer.error_state()), out / f"scaled_errors_rank{dist.rank}.pt")
    # an overflow on one rank: the gradients turn non-finite everywhere and every error buffer is zeroed
    loss = loss_of("mlp", eng.module, global_batch("mlp", STEPS), dist.rank, dist.world_size)
    eng.backward(loss * (float("inf") if dist.rank == 3 else 1.0))
    finite = all(bool(torch.isfinite(p.grad.to_local()).all()) for p in eng.module.parameters())
    zeroed = all(float(e.abs().max()) == 0 for e in eng.reducer.error_state().values())
    eng.zero_grad()  # the loop skips the step
    loss = loss_of("mlp", eng.module, global_batch("mlp", STEPS), dist.rank, dist.world_size)
    eng.backward(loss)
    eng.step()
    refilled = all(float(e.abs().max()) > 0 for e in eng.reducer.error_state().values())
    res["overflow"] = {"grads_finite": finite, "errors_zeroed": zeroed, "refilled": refilled}


def ckpt_engine(dist):
    from tessera.cluster.sharded import ShardedPowerSGDEngine

    model = make_model("dalle")
    return ShardedPowerSGDEngine(model, make_opt, dist, ranks_per_node=2, powersgd_rank=LOW_RANK, grad_clip=1.0)


def checkpoint_first(out: Path, dist, res: dict) -> None:
    """Train to CKPT_AT, save, train on to STEPS: the reference continuation."""
    eng = ckpt_engine(dist)
    train(eng, "dalle", dist, range(CKPT_AT))
    torch.save({k: v.clone() for k, v in eng.reducer.error_state().items()}, out / f"errors_rank{dist.rank}.pt")
    eng.save_checkpoint(out / "ckpt", CKPT_AT, {"note": "hello"})
    res["ckpt/continued"] = train(eng, "dalle", dist, range(CKPT_AT, STEPS))


def checkpoint_resume(out: Path, dist) -> None:
    """A fresh set of processes: load, compare the error buffers, train on."""
    eng = ckpt_engine(dist)
    step, client = eng.load_checkpoint(out / "ckpt")
    torch.save({k: v.clone() for k, v in eng.reducer.error_state().items()}, out / f"resumed_errors_rank{dist.rank}.pt")
    losses = train(eng, "dalle", dist, range(step, STEPS))
    (out / f"resume_rank{dist.rank}.json").write_text(json.dumps({"step": step, "client": client, "losses": losses}))


def worker(out: Path, mode: str) -> None:
    from tessera.cluster.dist import discover, init, shutdown

    torch.set_num_threads(1)
    dist = discover()
    if dist.world_size > 1:
        dist = init(dist, backend="gloo")
    if mode == "curves":
        curves_worker(out, dist)
    else:
        checkpoint_resume(out, dist)
    shutdown(dist)


# -- launching ---------------------------------------------------------------------------------------------
def launch(out: Path, world: int, mode: str, timeout: float = 400) -> None:
    sys.path.insert(0, str(REPO / "tests" / "trainer"))
    from rank_workers import run_rank_workers

    run_rank_workers(__file__, [str(out), mode], world, f"sharded ({world} ranks, {mode})", timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for world in (1, 2, 4):
        d = tmp_path_factory.mktemp(f"sharded{world}")
        launch(d, world, "curves")
        out[world] = d
    launch(out[4], 4, "resume")
    return out


def _res(runs, world: int, rank: int = 0) -> dict:
    return json.loads((runs[world] / f"rank{rank}.json").read_text())


def _close(a: list[float], b: list[float], tol: float = 2e-5) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(a, b))


@pytest.mark.parametrize("name", ["mlp", "dalle"])
def test_layouts_agree_with_one_process(runs, name):
    ref = _res(runs, 1)[f"{name}/plain"]
    assert ref[-1] < 0.9 * ref[0], ref  # it learns
    curves = {
        "1x1": _res(runs, 1)[f"{name}/1x1/r0"],
        "1x2": _res(runs, 2)[f"{name}/1x2/r0"],
        "2x1": _res(runs, 2)[f"{name}/2x1/r0"],
        "2x2": _res(runs, 4)[f"{name}/2x2/r0"],
    }
    for layout, c in curves.items():
        assert c["kind"] == "sharded"
        assert _close(c["losses"], ref), (layout, c["losses"], ref)


@pytest.mark.parametrize("name", ["mlp", "dalle"])
def test_full_rank_powersgd_matches_uncompressed(runs, name):
    for world, layout in ((2, "2x1"), (4, "2x2")):
        res = _res(runs, world)
        full, dense = res[f"{name}/{layout}/r{FULL_RANK}"], res[f"{name}/{layout}/r0"]
        assert full["stats"]["inter_compressed_bytes"] > 0  # it really compressed
        assert _close(full["losses"], dense["losses"]), (layout, full["losses"], dense["losses"])


def test_build_engine_selects_the_sharded_layout(runs):
    got = _res(runs, 4)["dalle/build_engine"]
    assert got["kind"] == "sharded"
    assert _close(got["losses"], _res(runs, 4)[f"dalle/2x2/r{FULL_RANK}"]["losses"])


def test_parameters_sharded_within_group_and_identical_across(runs):
    res = _res(runs, 4)
    shapes = {r: _res(runs, 4, r)["mlp/2x2/r2"]["local_shapes"] for r in range(4)}
    model = make_model("mlp")
    for n, p in model.named_parameters():
        rows = math.ceil(p.shape[0] / 2)
        assert shapes[0][n][0] == rows and shapes[1][n][0] == p.shape[0] - rows, n  # ordinal 0 and 1 of group 0
        assert shapes[2][n] == shapes[0][n] and shapes[3][n] == shapes[1][n], n  # group 1 the same
    assert shapes[1]["head.weight"] == [2, 32]  # the uneven shard
    for key in ("mlp_2x2_r2", "dalle_2x2_r2", "dalle_2x2_r0"):
        w = [torch.load(runs[4] / f"{key}_rank{r}.pt", weights_only=True) for r in range(4)]
        assert set(w[0]) == set(make_model(key.split("_")[0]).state_dict())
        for k in w[0]:
            for r in (1, 2, 3):
                assert torch.equal(w[0][k], w[r][k]), (key, k, r)
    assert res["dalle/2x2/r2"]["grad_norm"] is not None and res["dalle/2x2/r2"]["grad_norm"] > 0


def _expected_inter_bytes(name: str, rank: int, k: int, ordinal: int) -> tuple[int, int]:
    """(compressed, uncompressed) bytes of one step, from the parameter shapes alone."""
    model = make_model(name)
    emb = {f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, torch.nn.Embedding)}
    comp = unc = 0
    for n, p in model.named_parameters():
        per = math.ceil(p.shape[0] / k)
        rows = max(0, min(per, p.shape[0] - ordinal * per))
        cols = p.numel() // p.shape[0]
        if p.dim() < 2 or n in emb:
            unc += rows * cols * 4
        elif rows:
            m, nn = min(rows, cols), max(rows, cols)
            comp += (m + nn) * min(rank, m) * 4
    return comp, unc


@pytest.mark.parametrize("name", ["mlp", "dalle"])
def test_low_rank_learns_and_sends_the_formula_bytes(runs, name):
    for rank in range(4):
        res = _res(runs, 4, rank)[f"{name}/2x2/r{LOW_RANK}"]
        comp, unc = _expected_inter_bytes(name, LOW_RANK, 2, rank % 2)
        st = res["stats"]
        assert (st["inter_compressed_bytes"], st["inter_uncompressed_bytes"]) == (comp, unc), (rank, st)
        assert res["expected"]["compressed"] == comp and res["expected"]["uncompressed"] == unc
        assert st["inter_bytes"] < 0.6 * st["inter_dense_bytes"]
        assert 0 < st["measured_compression_rate"] < 1
        assert st["paper_compression_rate"] == pytest.approx(1 - 5 * LOW_RANK / (8 * 32))
        # within the group: the padded unsharded gradient reduce-scattered, parameters gathered (forward, and backward for resblocks)
        model = make_model(name)
        padded = sum(math.ceil(p.shape[0] / 2) * 2 * (p.numel() // p.shape[0]) * 4 for p in model.parameters())
        assert st["intra_reduce_scatter_bytes"] == padded
        assert padded < st["intra_all_gather_bytes"] < 2 * padded
    losses = _res(runs, 4)[f"{name}/2x2/r{LOW_RANK}"]["losses"]
    assert losses[-1] < 0.95 * losses[0], losses
    # and differs from the uncompressed curve (it is compressed)
    assert not _close(losses, _res(runs, 4)[f"{name}/2x2/r0"]["losses"], 1e-4)


def test_one_group_sends_nothing_across(runs):
    st = _res(runs, 2)["mlp/1x2/r0"]["stats"]
    assert st["inter_bytes"] == 0 and st["intra_reduce_scatter_bytes"] > 0
    st = _res(runs, 2)["mlp/2x1/r0"]["stats"]
    assert st["intra_reduce_scatter_bytes"] == 0 and st["intra_all_gather_bytes"] == 0
    assert st["inter_bytes"] == st["inter_dense_bytes"] == sum(p.numel() for p in make_model("mlp").parameters()) * 4


def test_error_buffers_hold_unscaled_gradients_and_zero_on_overflow(runs):
    res = _res(runs, 4)
    # a resblock backpropagating at 8x, unscaled by the loop after backward, trains as the unscaled run does
    assert _close(res["scaled/losses"], res[f"mlp/2x2/r{LOW_RANK}"]["losses"]), (res["scaled/losses"], res[f"mlp/2x2/r{LOW_RANK}"])
    for r in range(4):
        scaled = torch.load(runs[4] / f"scaled_errors_rank{r}.pt", weights_only=True)
        plain = torch.load(runs[4] / f"mlp_2x2_r{LOW_RANK}_errors_rank{r}.pt", weights_only=True)
        assert set(scaled) == set(plain) and any(k.startswith("blocks.0.") for k in scaled)
        for k in plain:
            assert torch.allclose(scaled[k], plain[k], atol=1e-5, rtol=1e-3), k  # errors in unscaled units
    for r in range(4):
        assert _res(runs, 4, r)["overflow"] == {"grads_finite": False, "errors_zeroed": True, "refilled": True}, r


def test_checkpoint_resume_continues_identically(runs):
    d = runs[4]
    ref = _res(runs, 4)["ckpt/continued"]
    folder = d / "ckpt" / f"step_{CKPT_AT:08d}"
    assert (d / "ckpt" / "latest.sharded").read_text() == folder.name
    assert sorted(p.name for p in folder.iterdir()) == ["meta.pt", "ordinal_0000.pt", "ordinal_0001.pt"]
    assert not list((d / "ckpt").glob(".*tmp*"))
    errs = [torch.load(d / f"errors_rank{r}.pt", weights_only=True) for r in range(4)]
    resumed = [torch.load(d / f"resumed_errors_rank{r}.pt", weights_only=True) for r in range(4)]
    saved = [torch.load(folder / f"ordinal_{o:04d}.pt", weights_only=True)["error_sum"] for o in (0, 1)]
    assert errs[0] and any(float(e.abs().max()) > 0 for e in errs[0].values())
    for r in range(4):
        o = r % 2
        for k, e in errs[r].items():
            total = errs[o][k] + errs[o + 2][k]  # the same-ordinal ranks: r and r + 2
            assert torch.allclose(saved[o][k], total, atol=1e-6), k
            assert torch.allclose(resumed[r][k], total / 2, atol=1e-6), k
    for r in range(4):
        res = json.loads((d / f"resume_rank{r}.json").read_text())
        assert res["step"] == CKPT_AT and res["client"] == {"note": "hello"}
        assert _close(res["losses"], ref, 1e-5), (res["losses"], ref)


def test_topology_from_environment_and_refused():
    from tessera.cluster.sharded import Topology
    from tessera.core.errors import ConfigError

    t = Topology.discover(5, 8, env={"LOCAL_WORLD_SIZE": "4"})
    assert (t.n_groups, t.group, t.ordinal) == (2, 1, 1)
    assert Topology.discover(3, 8, env={"SLURM_NTASKS_PER_NODE": "2"}).group == 1
    assert Topology.discover(3, 8, env={"SLURM_TASKS_PER_NODE": "4(x2)"}).ranks_per_node == 4
    assert Topology.discover(3, 8, ranks_per_node=8, env={"LOCAL_WORLD_SIZE": "4"}).n_groups == 1  # config wins
    assert Topology.discover(0, 4, env={}).ranks_per_node == 4  # one node
    for k, world in ((3, 4), (8, 4)):
        with pytest.raises(ConfigError, match="ranks_per_node") as e:
            Topology(0, world, k)
        assert "\n" not in str(e.value) and str(world) in str(e.value)


def test_paper_rate_and_dense_names():
    from tessera.cluster.sharded import default_units, dense_parameter_names
    from tessera.cluster.sharded_powersgd import paper_compression_rate

    assert paper_compression_rate(8, 64) == pytest.approx(1 - 40 / 512)
    model = make_model("dalle")
    dense = dense_parameter_names(model)
    assert {"text_pos.weight", "image_row.weight", "blocks.0.ln_1.weight", "blocks.1.mlp.fc.bias"} <= dense
    assert not {"blocks.0.attn.qkv.weight", "text_head.weight"} & dense
    assert default_units(model) == list(model.blocks)


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    sys.path.insert(0, str(REPO))
    worker(Path(sys.argv[1]), sys.argv[2])
