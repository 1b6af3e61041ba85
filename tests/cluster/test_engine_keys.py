"""Each `cluster.*` key of a DDP run takes effect through build_engine, on two real gloo ranks.

The worker (this file run as a script, two OS processes like torchrun) lets build_engine create the
process group, then reads back what reached torch: the group's backend and timeout, DDP's bucket cap
and buckets, and the bytes that really went through all-reduce, recorded by the torch profiler
(every c10d::allreduce_ call and its tensor size) with and without PowerSGD. The tests compare those
with numbers computed here from the parameter shapes.
"""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "trainer"))
from rank_workers import run_rank_workers  # noqa: E402

STEPS = 30
RANK, START = 2, 3  # PowerSGD rank and start_iter of the compressed run
TIMEOUT_S = 37.0


def make_model() -> torch.nn.Module:
    """About 2.1 MiB of fp32 parameters: more than one 1 MiB DDP bucket, and matrices that do and do not compress."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 512),
        torch.nn.GELU(),
        torch.nn.Linear(512, 512),
        torch.nn.GELU(),
        torch.nn.Linear(512, 512),
        torch.nn.GELU(),
        torch.nn.Linear(512, 4),
    )


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(32, 32, generator=g)
    return x, torch.tanh(x[:, :4] - 0.5 * x[:, 4:8])


def allreduce_bytes(prof, trace: Path) -> int:
    """Bytes handed to all-reduce, summed over the profiled c10d::allreduce_ calls (fp32 tensors only here).

    The tensor sizes of a TensorList argument are in the exported trace's "Input Dims", not in prof.events().
    """
    prof.export_chrome_trace(str(trace))
    total = 0
    for e in json.loads(trace.read_text())["traceEvents"]:
        if e.get("name") == "c10d::allreduce_":
            for shape in e["args"]["Input Dims"][0]:
                total += 4 * math.prod(shape)
    trace.unlink()
    return total


def train(eng, dist, profile_steps: tuple[int, ...], trace: Path) -> dict:
    from torch.profiler import ProfilerActivity, profile

    opt_losses, stats, measured = [], [], {}
    for step in range(STEPS):
        x, y = batch(dist.rank, step)
        if step in profile_steps:
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                loss = torch.nn.functional.mse_loss(eng(x), y)
                eng.backward(loss)
            measured[step] = allreduce_bytes(prof, trace)
        else:
            loss = torch.nn.functional.mse_loss(eng(x), y)
            eng.backward(loss)
        eng.step()
        stats.append(eng.comm_stats())
        t = loss.detach().clone()
        dist.all_reduce_mean(t)
        opt_losses.append(t.item())
    return {"losses": opt_losses, "stats": stats, "measured": measured}


def worker(out: Path) -> None:
    from tessera.cluster.config import DistConfig
    from tessera.cluster.dist import group_timeout_s, shutdown
    from tessera.cluster.engine import build_engine
    from tessera.core.errors import ConfigError

    res: dict = {"initialized_before": torch.distributed.is_initialized()}
    cfg = DistConfig(backend="gloo", timeout_s=TIMEOUT_S, bucket_mb=1)
    model = make_model()
    eng = build_engine(model, torch.optim.AdamW(model.parameters(), lr=1e-3), None, cfg)  # discovers the ranks, creates the group
    dist = eng.dist
    res.update(kind=eng.kind, backend=torch.distributed.get_backend(), timeout=group_timeout_s(), bucket_cap=eng.wrapped.bucket_bytes_cap)
    res["ddp"] = train(eng, dist, profile_steps=(5,), trace=out / f"trace{dist.rank}.json")
    res["buckets_1mb"] = eng.wrapped._get_ddp_logging_data().get("rebuilt_bucket_sizes", "")

    # the default bucket size on the same group: fewer, larger buckets
    model = make_model()
    eng25 = build_engine(model, torch.optim.AdamW(model.parameters(), lr=1e-3), dist, DistConfig(backend="gloo", timeout_s=TIMEOUT_S))
    train_steps = 3  # DDP rebuilds its buckets after the first steps and logs them from the third
    for step in range(train_steps):
        x, y = batch(dist.rank, step)
        eng25.backward(torch.nn.functional.mse_loss(eng25(x), y))
        eng25.step()
    res["bucket_cap_25"] = eng25.wrapped.bucket_bytes_cap
    res["buckets_25mb"] = eng25.wrapped._get_ddp_logging_data().get("rebuilt_bucket_sizes", "")

    # a config that disagrees with the existing group is refused by key
    errors = {}
    for key, bad in (
        ("backend", DistConfig(backend="nccl", timeout_s=TIMEOUT_S)),
        ("timeout_s", DistConfig(backend="gloo", timeout_s=99.0)),
    ):
        try:
            build_engine(make_model(), torch.optim.SGD(make_model().parameters(), lr=0.1), dist, bad)
            errors[key] = ""
        except ConfigError as e:
            errors[key] = str(e)
    res["errors"] = errors

    # PowerSGD on the same group: compressed after START steps, and it still trains
    model = make_model()
    psgd = DistConfig(backend="gloo", timeout_s=TIMEOUT_S, bucket_mb=1, powersgd_rank=RANK, powersgd_start_iter=START)
    eng_p = build_engine(model, torch.optim.AdamW(model.parameters(), lr=1e-3), dist, psgd)
    res["powersgd"] = train(eng_p, dist, profile_steps=(1, 5), trace=out / f"trace{dist.rank}.json")
    res["powersgd"]["reducer_steps"] = eng_p.reducer.step
    res["powersgd_weights_agree"] = _weights_agree(model)
    if dist.rank == 0:
        (out / "result.json").write_text(json.dumps(res))
    dist.barrier()
    shutdown(dist)


def _weights_agree(model: torch.nn.Module) -> bool:
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    other = flat.clone()
    torch.distributed.broadcast(other, src=0)
    return bool(torch.equal(flat, other))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine_keys")
    run_rank_workers(__file__, [str(out)], 2, "engine keys", timeout=240)
    return json.loads((out / "result.json").read_text())


def expected_bytes(model: torch.nn.Module, rank: int, min_rate: float = 2.0) -> tuple[int, int]:
    """(dense, compressed) fp32 bytes per step: a matrix [m, n] (n = the rest of its dims) sends P [m, r] and Q [n, r]
    when m*n >= min_rate * (m + n) * r with r = min(rank, m, n); everything else is all-reduced whole."""
    dense = compressed = 0
    for p in model.parameters():
        dense += p.numel()
        if p.dim() >= 2:
            m, n = p.shape[0], p.numel() // p.shape[0]
            r = min(rank, m, n)
            if m * n >= min_rate * (m + n) * r:
                compressed += (m + n) * r
                continue
        compressed += p.numel()
    return 4 * dense, 4 * compressed


def test_build_engine_creates_the_group_from_backend_and_timeout(run):
    assert run["initialized_before"] is False  # the worker did not create it; build_engine did
    assert run["kind"] == "ddp"
    assert run["backend"] == "gloo"
    assert run["timeout"] == pytest.approx(TIMEOUT_S)  # read back from the group's gloo backend options


def test_conflicting_group_is_a_one_line_error_naming_the_key(run):
    e = run["errors"]
    assert "\n" not in e["backend"] and "\n" not in e["timeout_s"]
    assert e["backend"].startswith("config key 'cluster.backend': the process group already exists with backend 'gloo', not 'nccl'")
    assert e["timeout_s"].startswith("config key 'cluster.timeout_s': the process group already exists with a 37 s timeout, not 99 s")


def test_bucket_mb_reaches_ddp(run):
    assert run["bucket_cap"] == 1 * 2**20 and run["bucket_cap_25"] == 25 * 2**20
    small = [int(b) for b in run["buckets_1mb"].split(", ")]
    large = [int(b) for b in run["buckets_25mb"].split(", ")]
    total = sum(p.numel() * 4 for p in make_model().parameters())
    assert sum(small) == sum(large) == total
    # buckets close once they pass the cap (one parameter may overshoot it): more buckets at 1 MiB than at 25
    assert len(small) > len(large) >= 1
    assert all(b < 2**20 + 512 * 512 * 4 for b in small)


def test_ddp_sends_every_gradient(run):
    dense, _ = expected_bytes(make_model(), RANK)
    ddp = run["ddp"]
    assert ddp["measured"]["5"] == dense  # what the profiler saw go through all-reduce in one backward pass
    assert all(s["bytes_sent"] == s["bytes_dense"] == dense for s in ddp["stats"])


def test_powersgd_sends_fewer_bytes_by_the_expected_factor(run):
    dense, compressed = expected_bytes(make_model(), RANK)
    assert dense / compressed > 10  # the shapes above: the 512x512 matrices dominate
    p = run["powersgd"]
    assert p["reducer_steps"] == STEPS  # one reducer step per backward pass, whatever the number of buckets
    # uncompressed for the first START steps, then P, Q and the uncompressed tensors only
    assert [s["bytes_sent"] for s in p["stats"]] == [dense] * START + [compressed] * (STEPS - START)
    assert all(s["bytes_dense"] == dense for s in p["stats"])
    assert p["stats"][-1]["compression"] == pytest.approx(dense / compressed)
    # the profiler's record of the real all-reduce calls agrees with the reducer's count
    assert p["measured"]["1"] == dense and p["measured"]["5"] == compressed


def test_powersgd_still_trains(run):
    for name in ("ddp", "powersgd"):
        losses = run[name]["losses"]
        assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:3]) / 3, (name, losses)
    assert run["powersgd_weights_agree"]


def test_backend_auto_and_nccl_without_cuda():
    from tessera.cluster.config import DistConfig
    from tessera.cluster.dist import DistState, init, resolve_backend
    from tessera.cluster.engine import build_engine
    from tessera.core.errors import ConfigError

    assert resolve_backend("gloo") == "gloo" and resolve_backend("nccl") == "nccl"
    assert resolve_backend("auto") == ("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: nccl is not refused")
    with pytest.raises(ConfigError) as e:
        init(DistState(0, 2, 0, "torchrun"), "nccl")
    assert str(e.value) == "config key 'cluster.backend': 'nccl' needs CUDA, and this machine has none; use 'gloo' or 'auto'"
    assert not torch.distributed.is_initialized()
    # one process at zero_stage 0 needs no group, whatever the backend
    model = make_model()
    eng = build_engine(model, torch.optim.SGD(model.parameters(), lr=0.1), DistState(), DistConfig(backend="nccl"))
    assert eng.kind == "plain" and eng.comm_stats() == {} and not torch.distributed.is_initialized()


def test_powersgd_rank_above_the_kernel_limit_is_refused():
    from tessera.cluster.config import DistConfig
    from tessera.cluster.dist import DistState
    from tessera.cluster.engine import build_engine
    from tessera.core.errors import ConfigError
    from tessera.kernels.powersgd import MAX_RANK

    model = make_model()
    with pytest.raises(ConfigError, match=f"config key 'cluster.powersgd_rank': expected <= {MAX_RANK}, got {MAX_RANK + 1}"):
        build_engine(model, torch.optim.SGD(model.parameters(), lr=0.1), DistState(), DistConfig(powersgd_rank=MAX_RANK + 1))


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    sys.path.insert(0, str(REPO))
    worker(Path(sys.argv[1]))
