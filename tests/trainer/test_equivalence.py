"""The data order is a function of the global batch, not of the number of ranks (tessera.trainer.data): the same
training run at 1, 2 and 4 real gloo ranks, through every engine, logs the same loss curve.

This file, run as a script under RANK/WORLD_SIZE/..., is the worker: it trains the tiny transformer of
token_fixtures (caption dropout 0.1 on, so the per-sample randomness is checked too) for STEPS updates of a global
batch of 16 in each layout its world size allows (DDP, DDP + PowerSGD at full rank, DeepSpeed ZeRO 1, 2 and 3, the
sharded layout of groups x ranks, with PowerSGD at full rank across groups), and a tiny dVAE with DDP (per-row gumbel
noise, and the demo's diversity term of the global batch and squared-error term), and writes rank 0's logged losses
(the global batch's: the mean over ranks). The tests compare every curve with the one-process curve, within RTOL
(float reassociation of the reductions, nothing more). The 4-rank runs (about a minute on 2 cores) are marked slow.
A run checkpointed at 1 rank and resumed at 2 continues the one-process curve.

Full rank: PowerSGD's rank (64) is at least the smaller side of every matrix, so P Q^T is the gradient itself;
powersgd_min_compression_rate is lowered so that every matrix is compressed anyway, from the first step.
"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from rank_workers import run_rank_workers  # noqa: E402
from token_fixtures import make_token_shards, one_thread, tiny_root  # noqa: E402,F401

STEPS = 8
RTOL = 1e-4
FULL = ("cluster.powersgd_rank=64", "cluster.powersgd_start_iter=0", "cluster.powersgd_min_compression_rate=0.01")
DVAE = [
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
    "dvae.train.shuffle_buffer=8",
    "dvae.train.eval_samples=8",
    "dvae.train.time_budget_s=0",
    "dvae.train.log_every=1",
    "dvae.train.eval_every=0",
    "dvae.train.sample_every=0",
    "dvae.train.ckpt_every=0",
    f"dvae.train.steps={STEPS}",
]


def layouts(world: int) -> dict[str, tuple[str, ...]]:
    """name -> cluster overrides of the transformer runs at this world size."""
    out: dict[str, tuple[str, ...]] = {"ddp": ()}
    if world == 1:
        return {**out, "ddp_other_order": ("transformer.train.shuffle_buffer=8",)}
    if world == 2:  # at 4 ranks only the 2x2 sharded layout is new (ZeRO and PowerSGD under DDP: as at 2; 4 ranks cost 2 cores ~2x)
        out["ddp_powersgd_full"] = FULL
        out.update({f"zero{z}": (f"cluster.zero_stage={z}",) for z in (1, 2, 3)})
    groups = {2: [(1, 2), (2, 1)], 4: [(2, 2)]}[world]  # (groups, ranks per group)
    for g, k in groups:
        sharded = ("cluster.sharded=true", f"cluster.ranks_per_node={k}")
        out[f"sharded_{g}x{k}"] = sharded
        if g > 1:
            out[f"sharded_{g}x{k}_powersgd_full"] = sharded + ("cluster.powersgd_rank=64",)
    return out


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def worker(out: Path) -> None:
    import torch

    torch.set_num_threads(1)
    from tessera.cluster.dist import discover, init, shutdown
    from tessera.core.root_config import load_root
    from tessera.trainer.dvae_train import train_dvae
    from tessera.trainer.transformer_train import train_transformer

    dist = discover()
    world = dist.world_size
    if world > 1:
        dist = init(dist, backend="gloo")
    res = {}
    for name, extra in layouts(world).items():
        run = out / f"w{world}" / name
        s = train_transformer(tiny_root(extra, steps=STEPS, log_every=1), str(out / "tokens"), run)
        res[name] = {"losses": losses(run) if dist.rank == 0 else None, "engine": s["engine"], "world": s["world_size"]}
    if world <= 2:  # a run checkpointed at 1 rank after half its updates, resumed at 2 ranks to the end
        steps = STEPS // 2 if world == 1 else STEPS  # the first half lies in the warm-up: the same lr whatever the horizon
        s = train_transformer(tiny_root(steps=steps, log_every=1), str(out / "tokens"), out / "resumed")
        res[f"resumed_at_{world}"] = {"losses": losses(out / "resumed") if dist.rank == 0 else None, "engine": s["engine"], "world": world}
    run = out / f"w{world}" / "dvae"
    s = train_dvae(load_root("demo", DVAE), str(out / "images"), None, run, dist)
    res["dvae"] = {"losses": losses(run) if dist.rank == 0 else None, "engine": s["engine"], "world": s["world_size"]}
    if dist.rank == 0:
        (out / f"w{world}.json").write_text(json.dumps(res))
    shutdown(dist)


def launch(out: Path, world: int, timeout: float = 300) -> None:
    run_rank_workers(__file__, [str(out)], world, f"equivalence ({world} ranks)", {"DS_ACCELERATOR": "cpu"}, timeout)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from dvae_shapes import write_shape_shards

    out = tmp_path_factory.mktemp("equivalence")
    make_token_shards(out / "tokens")
    write_shape_shards(out / "images", n_shards=3, per_shard=16, size=16, seed=5)
    return out


@pytest.fixture(scope="module")
def curves(data):
    """world -> the curves of its runs, each world launched once, when a test first asks for it."""

    class Lazy(dict):
        def __missing__(self, world: int) -> dict:
            launch(data, world)
            self[world] = json.loads((data / f"w{world}.json").read_text())
            return self[world]

    return Lazy()


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) == STEPS and all(abs(x - y) <= RTOL * abs(y) for x, y in zip(a, b))


def _check_world(curves, world: int, engines: set[str]) -> None:
    ref = curves[1]["ddp"]
    assert ref["engine"] == "plain" and ref["losses"][-1] < 0.9 * ref["losses"][0]  # it learns
    seen = set()
    for name, run in curves[world].items():
        assert run["world"] == world
        seen.add(run["engine"])
        assert _close(run["losses"], curves[1]["dvae" if name == "dvae" else "ddp"]["losses"]), (world, name, run["losses"])
    assert seen == engines and set(curves[world]) >= set(layouts(world)) | {"dvae"}
    for name, run in curves[world].items():  # PowerSGD at full rank: the uncompressed curve of the same layout
        if name.endswith("_powersgd_full"):
            assert _close(run["losses"], curves[world][name.removesuffix("_powersgd_full")]["losses"]), (world, name)


ENGINES = {"ddp", "deepspeed-zero1", "deepspeed-zero2", "deepspeed-zero3", "sharded"}


def test_two_ranks_log_the_one_process_curve_in_every_layout(curves):
    """DDP (+ PowerSGD at full rank), ZeRO 1-3, sharded 1x2 and 2x1 (+ PowerSGD at full rank across the groups), the dVAE with DDP."""
    _check_world(curves, 2, ENGINES)
    assert curves[1]["dvae"]["losses"][-1] < curves[1]["dvae"]["losses"][0]


def test_a_run_resumed_at_another_world_size_goes_on_exactly(curves):
    """Checkpointed after STEPS / 2 updates at 1 rank, resumed at 2: the rest of the one-process curve."""
    assert len(curves[1]["resumed_at_1"]["losses"]) == STEPS // 2
    assert _close(curves[2]["resumed_at_2"]["losses"], curves[1]["ddp"]["losses"]), curves[2]["resumed_at_2"]


@pytest.mark.slow
def test_four_ranks_log_the_one_process_curve_in_every_layout(curves):
    """DDP, sharded 2x2 (+ PowerSGD at full rank across the groups), the dVAE with DDP."""
    _check_world(curves, 4, {"ddp", "sharded"})


def test_another_data_order_leaves_the_tolerance(curves):
    """Not vacuous: a run that differs only in its data order (another shuffle buffer) does not pass as equal."""
    ref = curves[1]["ddp"]["losses"]
    other = curves[1]["ddp_other_order"]["losses"]
    assert not _close(other, ref) and max(abs(x - y) / y for x, y in zip(other, ref)) > 10 * RTOL


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
