"""Transformer training on token shards: learning, exact resume, checkpoints, CLI, bad input."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from token_fixtures import make_token_shards, one_thread, tiny_root  # noqa: E402,F401

from tessera.cli import main  # noqa: E402
from tessera.core.errors import CheckpointError, InputError  # noqa: E402
from tessera.core.files import save_checkpoint  # noqa: E402
from tessera.trainer.precision import resolve_precision  # noqa: E402
from tessera.trainer.token_data import TokenBatches, read_manifest  # noqa: E402
from tessera.trainer.transformer_train import load_transformer, train_transformer  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_token_shards(tmp_path_factory.mktemp("tokens"))


def test_loss_falls_and_run_dir_is_complete(shards, tmp_path):
    cfg = tiny_root(steps=60, caption_dropout=0.1, ema_decay=0.9, bpe_dropout=0.1)
    s = train_transformer(cfg, str(shards), tmp_path / "run")
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(5, 61, 5))
    assert rows[-1]["image_ce"] < 0.6 * rows[0]["image_ce"], (rows[0], rows[-1])
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert s["steps"] == 60 and s["stop_reason"] == "steps"
    assert (tmp_path / "run" / "checkpoints" / "latest.pt").exists()
    assert (tmp_path / "run" / "config.toml").exists() and any((tmp_path / "run" / "tb").iterdir())
    # warm-up then cosine: lr rises to the peak then decays
    lrs = [r["lr"] for r in rows]
    assert lrs[0] == pytest.approx(3e-3) and lrs[-1] < 0.1 * 3e-3
    model, mcfg, ck = load_transformer(tmp_path / "run")
    assert mcfg.text_vocab == read_manifest(shards).text_vocab and mcfg.image_grid == 4
    assert ck["ema"] is not None and ck["step"] == 60


def test_fast_precision_trains_and_is_recorded(shards, tmp_path):
    s = train_transformer(tiny_root(steps=40, precision="fast"), str(shards), tmp_path / "run")
    assert s["precision"] == resolve_precision("fast", torch.device("cpu"))
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["image_ce"] < 0.7 * rows[0]["image_ce"], (rows[0], rows[-1])
    assert train_transformer(tiny_root(steps=5), str(shards), tmp_path / "fp32")["precision"] == "fp32"


def test_resume_is_exact(shards, tmp_path):
    cfg = tiny_root(steps=8, caption_dropout=0.2, ema_decay=0.9)
    train_transformer(cfg, str(shards), tmp_path / "straight")
    half = tiny_root(steps=4, caption_dropout=0.2, ema_decay=0.9)
    train_transformer(half, str(shards), tmp_path / "resumed")
    s = train_transformer(cfg, str(shards), tmp_path / "resumed")  # picks up latest.pt at step 4
    assert s["steps"] == 8
    a, _, cka = load_transformer(tmp_path / "straight", use_ema=False)
    b, _, ckb = load_transformer(tmp_path / "resumed", use_ema=False)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert all(torch.equal(cka["ema"][k], ckb["ema"][k]) for k in cka["ema"])
    assert cka["data"] == ckb["data"]


def test_plateau_decay_runs(shards, tmp_path):
    s = train_transformer(tiny_root(steps=10, decay="plateau"), str(shards), tmp_path / "run")
    assert s["steps"] == 10


def test_batches_caption_dropout_and_resume_state(shards):
    m = read_manifest(shards)
    tb = TokenBatches(str(shards), text_len=8, text_vocab=m.text_vocab, grid=4, batch_size=32, caption_dropout=0.5, shuffle_buffer=16)
    text, image = next(tb)
    assert text.shape == (32, 8) and image.shape == (32, 16) and image.dtype == torch.long
    empty = (text == m.text_vocab + torch.arange(8)).all(dim=1)
    assert 4 <= int(empty.sum()) <= 28  # about half are the empty caption
    state = tb.state()
    nxt = next(tb)
    tb2 = TokenBatches(
        str(shards), text_len=8, text_vocab=m.text_vocab, grid=4, batch_size=32, caption_dropout=0.5, shuffle_buffer=16, state=state
    )
    again = next(tb2)
    assert torch.equal(nxt[0], again[0]) and torch.equal(nxt[1], again[1])


def test_cli_and_bad_inputs(shards, tmp_path, capsys):
    over = [
        "transformer.model.text_len=8",
        "transformer.model.d_model=32",
        "transformer.model.n_layers=2",
        "transformer.model.n_heads=2",
        "transformer.model.conv_kernel=3",
        "transformer.train.steps=3",
        "transformer.train.batch_size=8",
        "transformer.train.sample_every=2",
        "transformer.train.time_budget_s=0",
        "transformer.train.log_every=1",
        "sample.batch_size=8",
    ]
    assert main(["train", "transformer", "--data", str(shards), "--output", str(tmp_path / "cli")] + over) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3
    assert sorted(p.name for p in (tmp_path / "cli" / "samples").iterdir()) == [
        "step_00000002.png",
        "step_00000003.png",
    ]  # decoded via the manifest's dVAE
    # no manifest
    assert main(["train", "transformer", "--data", str(tmp_path), "--output", str(tmp_path / "x")] + over) == 2
    assert "manifest.json" in capsys.readouterr().err
    # truncated checkpoint
    ck = tmp_path / "cli" / "checkpoints" / "latest.pt"
    ck.write_bytes(ck.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_transformer(ck)
    # wrong kind
    save_checkpoint(tmp_path / "d.pt", "dvae", {"model": {}})
    with pytest.raises(CheckpointError, match="'dvae' checkpoint"):
        load_transformer(tmp_path / "d.pt")
    with pytest.raises(InputError, match="does not exist"):
        load_transformer(tmp_path / "nope.pt")


def test_time_budget_fixes_the_cosine_horizon(shards, tmp_path):
    s = train_transformer(tiny_root(steps=100000, time_budget_s=10.0, batch_size=8), str(shards), tmp_path / "run")
    assert s["stop_reason"] == "time_budget"
    assert 25 <= s["horizon"] < 100000  # measured after 5 + 20 updates, then fitted to the budget
    assert s["time_s"] < 10.0 + 5.0
