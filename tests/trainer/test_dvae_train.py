import json
import os

import pytest
import torch
from dvae_shapes import write_shape_shards
from rank_workers import spawn_ranks

from tessera.cli import main as cli_main
from tessera.cluster import dist as D
from tessera.core.errors import CheckpointError
from tessera.core.files import load_checkpoint, save_checkpoint
from tessera.core.root_config import load_root
from tessera.trainer.data import global_batches, global_stream, list_shards
from tessera.trainer.dvae import load_dvae
from tessera.trainer.dvae_train import kmeans_centroids, train_dvae

# The paper's objective (the demo preset adds a diversity term, a squared-error term and a k-means
# warm start, tested on their own below).
TINY = [
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
    "dvae.train.ema_decay=0.8",
    "dvae.train.shuffle_buffer=8",
    "dvae.train.eval_samples=16",
    "dvae.train.time_budget_s=0",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("dvae_data")
    write_shape_shards(d / "train", n_shards=4, per_shard=16, size=16, seed=5)
    write_shape_shards(d / "eval", n_shards=1, per_shard=16, size=16, seed=6)
    return d


def cfg(*extra):
    return load_root("demo", TINY + list(extra))


def test_training_lowers_the_loss_and_writes_the_run(data, tmp_path):
    out = tmp_path / "run"
    s = train_dvae(
        cfg(
            "dvae.train.steps=150",
            "dvae.train.log_every=30",
            "dvae.train.eval_every=75",
            "dvae.train.sample_every=75",
            "dvae.train.ckpt_every=75",
        ),
        str(data / "train"),
        str(data / "eval"),
        out,
    )
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_psnr" in r]
    assert [r["step"] for r in train] == [30, 60, 90, 120, 150]
    assert min(r["rec_nll"] for r in train[-2:]) < train[0]["rec_nll"] - 30  # nats per 16x16x3 image
    assert all({"kl", "rec_nll", "temp", "kl_weight", "lr", "images_per_s"} <= set(r) for r in train)
    assert train[0]["temp"] > train[-1]["temp"] and train[0]["kl_weight"] < train[-1]["kl_weight"]
    assert [r["step"] for r in evals] == [75, 150] and evals[-1]["eval_psnr"] > 10.0
    assert 1.0 <= evals[-1]["perplexity"] <= 32 and 0 <= evals[-1]["unused_codes"] < 32
    assert s["steps"] == 150 and s["eval_psnr"] == pytest.approx(evals[-1]["eval_psnr"]) and s["eval_on"] == "eval"
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step_00000075.png", "step_00000150.png"]
    assert list((out / "tb").glob("events.*")) and (out / "summary.json").exists()
    model, mc = load_dvae(out)  # EMA weights
    ck = load_checkpoint(out, "dvae")
    assert ck["step"] == 150 and all(torch.equal(model.state_dict()[k], ck["ema"][k]) for k in ck["ema"])
    assert model.get_codes(torch.rand(2, 3, 16, 16)).shape == (2, 4, 4)


def test_resume_is_exact(data, tmp_path):
    base = ("dvae.train.log_every=100", "dvae.train.eval_every=1000", "dvae.train.sample_every=1000", "dvae.train.ckpt_every=1000")
    a = train_dvae(cfg("dvae.train.steps=10", *base), str(data / "train"), None, tmp_path / "a")
    b1 = train_dvae(cfg("dvae.train.steps=4", *base), str(data / "train"), None, tmp_path / "b")
    b2 = train_dvae(cfg("dvae.train.steps=10", *base), str(data / "train"), None, tmp_path / "b")
    assert b1["steps"] == 4 and b2["resumed_from"] == 4 and b2["steps"] == 10
    ca, cb = load_checkpoint(tmp_path / "a", "dvae"), load_checkpoint(tmp_path / "b", "dvae")
    for part in ("model", "ema"):
        assert all(torch.equal(ca[part][k], cb[part][k]) for k in ca[part]), part
    assert torch.equal(ca["optimizer"]["state"][0]["exp_avg_sq"], cb["optimizer"]["state"][0]["exp_avg_sq"])
    assert ca["data"] == cb["data"] and a["weights_sha256"] == b2["weights_sha256"]


def test_bad_inputs_are_one_line_errors(data, tmp_path, capsys):
    run = tmp_path / "wrong"
    save_checkpoint(run / "checkpoints" / "latest.pt", "transformer", {"step": 3})
    with pytest.raises(CheckpointError, match="'transformer' checkpoint"):
        train_dvae(cfg("dvae.train.steps=2"), str(data / "train"), None, run)
    code = cli_main(["train", "dvae", "--config", "demo", "--data", str(tmp_path / "missing"), "--output", str(tmp_path / "r"), *TINY])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "missing" in err and len(err.splitlines()) == 1
    trunc = tmp_path / "trunc"
    (trunc / "checkpoints").mkdir(parents=True)
    (trunc / "checkpoints" / "latest.pt").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        train_dvae(cfg("dvae.train.steps=2"), str(data / "train"), None, trunc)


WARM = ("dvae.train.codebook_init=kmeans", "dvae.train.init_images=24", "dvae.train.init_iters=5", "dvae.train.mse_weight=100")


def test_kmeans_warm_start_then_the_gumbel_objective(data, tmp_path):
    out = tmp_path / "warm"
    base = ("dvae.train.log_every=10", "dvae.train.eval_every=1000", "dvae.train.sample_every=1000", "dvae.train.ckpt_every=1000")
    train_dvae(cfg(*WARM, "dvae.train.init_steps=40", "dvae.train.steps=60", *base), str(data / "train"), None, out)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and rows[0]["kmeans_images"] == 24 and rows[0]["kmeans_time_s"] >= 0
    train = {r["step"]: r for r in rows if "loss" in r}
    warm, main = [train[s] for s in (10, 20, 30, 40)], [train[s] for s in (50, 60)]
    # warm start: the encoder learns the k-means codes (cross-entropy falls from ~log 32), no KL, temperature held
    assert all("init_ce" in r and r["kl"] == 0 and r["temp"] == 1.0 and r["kl_weight"] == 0 for r in warm)
    assert warm[-1]["init_ce"] < warm[0]["init_ce"] - 0.5 and warm[-1]["init_acc"] > warm[0]["init_acc"]
    # then the paper's objective, with its schedules counted from the end of the warm start
    assert all("init_ce" not in r and r["kl"] > 0 and r["temp"] < 1.0 for r in main)
    assert all("mse" in r for r in warm + main)


def test_resume_inside_the_warm_start_is_exact(data, tmp_path):
    base = (
        *WARM,
        "dvae.train.init_steps=6",
        "dvae.train.log_every=100",
        "dvae.train.eval_every=1000",
        "dvae.train.sample_every=1000",
        "dvae.train.ckpt_every=1000",
    )
    train_dvae(cfg("dvae.train.steps=10", *base), str(data / "train"), None, tmp_path / "a")
    train_dvae(cfg("dvae.train.steps=3", *base), str(data / "train"), None, tmp_path / "b")
    ck = load_checkpoint(tmp_path / "b", "dvae")
    assert ck["kmeans_centroids"].shape == (32, 3 * 4 * 4)  # kept while the warm start is unfinished
    b = train_dvae(cfg("dvae.train.steps=10", *base), str(data / "train"), None, tmp_path / "b")
    assert b["resumed_from"] == 3
    ca, cb = load_checkpoint(tmp_path / "a", "dvae"), load_checkpoint(tmp_path / "b", "dvae")
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    assert "kmeans_centroids" not in ca  # past the warm start the centroids are no longer needed


def _rank_main(rank, world, port, data_dir, out_dir, result_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    state = D.init(D.DistState(rank=rank, world_size=world, local_rank=rank, source="test"), backend="gloo")
    try:
        # rank 0 clusters, the others receive its centroids
        c, _ = kmeans_centroids(cfg(*WARM, "dvae.train.init_steps=2", f"dvae.train.train_data={data_dir}"), state, torch.device("cpu"))
        torch.save(c, os.path.join(result_dir, f"centroids{rank}.pt"))
        s = train_dvae(
            cfg(
                "dvae.train.steps=6",
                "dvae.train.log_every=3",
                "dvae.train.eval_every=1000",
                "dvae.train.sample_every=1000",
                "dvae.train.ckpt_every=1000",
            ),
            data_dir,
            None,
            out_dir,
            state,
        )
    finally:
        D.shutdown(state)
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(s, f)


def test_two_gloo_ranks_split_the_global_batch_end_identical_and_match_one_process(data, tmp_path):
    port = D.free_port()
    spawn_ranks(_rank_main, (2, port, str(data / "train"), str(tmp_path / "run"), str(tmp_path)), 2)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world_size"] == 2 and r0["steps"] == r1["steps"] == 6
    assert r0["weights_sha256"] == r1["weights_sha256"]  # gradients were averaged: same weights on both ranks
    c0, c1 = (torch.load(tmp_path / f"centroids{r}.pt") for r in (0, 1))
    assert c0.shape == (32, 48) and c0.abs().sum() > 0 and torch.equal(c0, c1)
    ck = load_checkpoint(tmp_path / "run", "dvae")
    assert [s["position"] for s in ck["data"]] == [[0, 48], [0, 48]]  # 6 global batches of 8, first epoch: one position
    shards = list_shards(str(data / "train"))
    seen = []
    for rank in (0, 1):
        it = global_batches(global_stream(shards, seed=0, shuffle_buffer=8), batch_size=8, rank=rank, world=2)
        seen.append({rec["__key__"] for _ in range(6) for rec, _ in next(it)[0]})
    assert len(seen[0]) == len(seen[1]) == 24 and not seen[0] & seen[1]  # each rank its own half of every global batch
    # a single process on the same global batches ends where the two ranks did (the logged loss is the global batch's)
    single = train_dvae(
        cfg(
            "dvae.train.steps=6",
            "dvae.train.log_every=3",
            "dvae.train.eval_every=1000",
            "dvae.train.sample_every=1000",
            "dvae.train.ckpt_every=1000",
        ),
        str(data / "train"),
        None,
        tmp_path / "single",
    )
    assert r0["final_loss"] == r1["final_loss"] and abs(single["final_loss"] - r0["final_loss"]) <= 1e-4 * abs(r0["final_loss"])


def test_code_diversity_gap_is_zero_only_for_confident_diverse_codes():
    import math

    import torch

    from tessera.trainer.dvae_train import code_diversity_gap

    V = 8
    # every position confident, the batch using all 8 codes equally: gap ~ 0
    codes = torch.arange(V).repeat(2).view(2, 2, 4)  # (B, G, G) covering each code twice
    diverse = torch.nn.functional.one_hot(codes, V).permute(0, 3, 1, 2).float() * 50.0
    assert code_diversity_gap(diverse).item() < 1e-3
    # confident but collapsed onto one code: gap = log V
    collapsed = torch.zeros(2, V, 2, 4)
    collapsed[:, 3] = 50.0
    assert abs(code_diversity_gap(collapsed).item() - math.log(V)) < 1e-3
    # unconfident (uniform q everywhere): aggregate entropy is maximal but each position's is too: gap = log V
    assert abs(code_diversity_gap(torch.zeros(2, V, 2, 4)).item() - math.log(V)) < 1e-4
