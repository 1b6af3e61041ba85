"""Checkpoints with a manifest of checksums (tessera.core.files): a corrupt or partial latest checkpoint is found on
resume, moved aside (corrupt.<name>) with one warning line on stderr naming it, and the previous one is used; training
then goes on on the same loss curve. Plain (in this process), DeepSpeed ZeRO-2 and the sharded layout (this file run as
a script, one rank); each corruption is a truncation or one flipped bit. Checkpoints without a manifest still load;
when none is intact the error is one line and nothing is moved."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import prefork  # noqa: E402
from token_fixtures import make_token_shards, one_thread, tiny_root  # noqa: E402,F401

from tessera.core.errors import CheckpointError  # noqa: E402
from tessera.core.files import MANIFEST, file_digest, load_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
LOOP = dict(log_every=1, ckpt_every=3)
EMA = "transformer.train.ema_decay=0.9"
LAYOUTS = {
    "zero2": ("cluster.zero_stage=2", EMA),
    "sharded": ("cluster.sharded=true", "cluster.ranks_per_node=1", "cluster.powersgd_rank=1", EMA),  # its EMA: in ordinal_0000.pt
}


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def losses(run: Path) -> dict[int, float]:
    """The last logged loss of each step (a resumed run logs the steps after its checkpoint again)."""
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def train(tokens: Path, run: Path, steps: int, extra: tuple[str, ...] = ()) -> dict:
    from tessera.trainer.transformer_train import train_transformer

    return train_transformer(tiny_root(extra, steps=steps, **LOOP), str(tokens), run)


def corrupt_and_resume(tokens: Path, run: Path, extra: tuple[str, ...], victims: list[tuple[str, str]]) -> list[dict]:
    """Train 6 steps; then for each (file of the latest checkpoint, "truncate" | "flip"): damage it, train 3 more."""
    out, steps = [train(tokens, run, 6, extra)], 6
    for rel, how in victims:
        path = Path(out[-1]["checkpoint"]) / rel if rel else Path(out[-1]["checkpoint"])
        (truncate if how == "truncate" else flip_bit)(path)
        steps += 3
        out.append(train(tokens, run, steps, extra))
    return out


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return make_token_shards(tmp_path_factory.mktemp("manifest") / "tokens", n=128, per_shard=64)


def check_warnings(err: str, run: Path, names: list[str], whats: list[str]) -> None:
    lines = [x for x in err.splitlines() if x.startswith("tessera: warning:")]
    assert len(lines) == len(names), err[-3000:]
    for line, name, what in zip(lines, names, whats):
        assert f"{name}' {what}" in line and f"corrupt.{name}" in line, line


def test_plain_truncated_then_bit_flipped_latest_falls_back_and_trains_on(tokens, tmp_path, capsys):
    ref = train(tokens, tmp_path / "ref", 12, (EMA,))
    run = tmp_path / "run"
    out = corrupt_and_resume(tokens, run, (EMA,), [("", "truncate"), ("", "flip")])
    ck = run / "checkpoints"
    check_warnings(capsys.readouterr().err, ck, ["step_00000006.pt", "step_00000009.pt"], ["is truncated", "is corrupt"])
    assert [s["resumed_from"] for s in out] == [0, 3, 6] and out[-1]["steps"] == 12
    assert (ck / "corrupt.step_00000006.pt").exists() and (ck / "corrupt.step_00000009.pt").exists()
    assert losses(run) == pytest.approx(losses(tmp_path / "ref"), rel=1e-6)
    assert ref["steps"] == 12
    manifest = json.loads((ck / MANIFEST).read_text())
    assert [e["name"] for e in manifest["checkpoints"]] == ["step_00000009.pt", "step_00000012.pt"]
    for e in manifest["checkpoints"]:
        assert e["files"][e["name"]] == file_digest(ck / e["name"])
    assert file_digest(ck / "latest.pt") == file_digest(ck / "step_00000012.pt")
    assert load_checkpoint(run, "transformer")["step"] == 12


def test_partial_save_and_corrupt_copy_are_found(tokens, tmp_path, capsys):
    """A step file the manifest does not list (killed before the manifest was written) is a save that did not finish;
    a latest.pt that is not the verified checkpoint's copy is made one again (silently: the step file is intact)."""
    run = tmp_path / "run"
    train(tokens, run, 6)
    ck = run / "checkpoints"
    (ck / "step_00000007.pt").write_bytes((ck / "step_00000006.pt").read_bytes())
    s = train(tokens, run, 7)
    err = capsys.readouterr().err
    assert s["resumed_from"] == 6, err
    check_warnings(err, ck, ["step_00000007.pt"], ["did not finish saving"])
    assert load_checkpoint(ck / "latest.pt", "transformer")["step"] == 7

    from tessera.cluster.engine import build_engine

    model = torch.nn.Linear(3, 2)
    eng = build_engine(model, torch.optim.AdamW(model.parameters()))
    for step in (1, 2):
        eng.save_checkpoint(tmp_path / "eng", step)
    flip_bit(tmp_path / "eng" / "latest.pt")
    assert eng.load_checkpoint(tmp_path / "eng")[0] == 2 and not capsys.readouterr().err
    assert file_digest(tmp_path / "eng" / "latest.pt") == file_digest(tmp_path / "eng" / "step_00000002.pt")


def test_without_manifest_it_loads_as_before_and_none_intact_is_one_line(tokens, tmp_path):
    run = tmp_path / "run"
    train(tokens, run, 6)
    ck = run / "checkpoints"
    (ck / MANIFEST).unlink()
    assert train(tokens, run, 7)["resumed_from"] == 6  # a run written before the manifest existed
    assert json.loads((ck / MANIFEST).read_text())["checkpoints"][-1]["name"] == "step_00000007.pt"
    truncate(ck / "step_00000007.pt")
    flip_bit(ck / "step_00000006.pt")
    with pytest.raises(CheckpointError) as e:
        train(tokens, run, 8)
    msg = str(e.value)
    assert (
        "\n" not in msg
        and "no intact checkpoint" in msg
        and "step_00000007.pt is truncated" in msg
        and "step_00000006.pt is corrupt" in msg
    )
    assert not list(ck.glob("corrupt.*")) and len(list(ck.glob("step_*.pt"))) == 2  # nothing moved: the user decides


def test_readers_of_a_damaged_run_load_the_newest_intact_checkpoint_and_move_nothing(tokens, tmp_path, capsys):
    """export / sample / encode read a run dir through load_checkpoint: a damaged latest.pt (or newest step file) is
    found against the manifest and the newest intact checkpoint loaded, with one warning line; unlike resume, a
    reader renames nothing."""
    from tessera.trainer.transformer_train import load_transformer

    run = tmp_path / "run"
    train(tokens, run, 6)
    ck = run / "checkpoints"
    listing = sorted(p.name for p in ck.iterdir())
    capsys.readouterr()
    assert load_checkpoint(run, "transformer")["step"] == 6 and not capsys.readouterr().err  # intact: latest.pt, silently

    flip_bit(ck / "latest.pt")
    assert load_checkpoint(run, "transformer")["step"] == 6  # from step_00000006.pt
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "latest.pt' differs from step_00000006.pt" in err and "loading step_00000006.pt" in err, err

    truncate(ck / "step_00000006.pt")
    model, _, ck3 = load_transformer(run)
    err = capsys.readouterr().err.strip()
    assert ck3["step"] == 3 and len(err.splitlines()) == 1 and "loading step_00000003.pt" in err, err
    want = load_checkpoint(ck / "step_00000003.pt", "transformer")["model"]
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items() if k in want)
    assert sorted(p.name for p in ck.iterdir()) == listing  # nothing moved aside or rewritten by a reader

    truncate(ck / "step_00000003.pt")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        load_checkpoint(run, "transformer")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_zero2_and_sharded_corrupt_latest_falls_back(layout, tokens, tmp_path):
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TESSERA_PROGRESS="0")
    from tessera.cluster.dist import free_port

    env["MASTER_PORT"] = str(free_port())
    p = prefork.popen([sys.executable, __file__, layout, str(tokens), str(tmp_path)], env, REPO)
    log = p.communicate(timeout=300)[0]
    assert p.returncode == 0, log[-6000:]
    out = json.loads((tmp_path / "result.json").read_text())
    ck = tmp_path / "run" / "checkpoints" / ("zero" if layout == "zero2" else "")
    check_warnings(log, ck, ["step_00000006", "step_00000009"], ["is truncated", "is corrupt"])
    assert [s["resumed_from"] for s in out] == [0, 3, 6] and out[-1]["steps"] == 12
    assert sorted(p.name for p in ck.glob("corrupt.*")) == ["corrupt.step_00000006", "corrupt.step_00000009"]
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000009", "step_00000012"]
    latest = (ck / ("latest" if layout == "zero2" else "latest.sharded")).read_text().strip()
    assert latest == "step_00000012"
    assert losses(tmp_path / "run") == pytest.approx(losses(tmp_path / "ref"), rel=1e-5)


VICTIMS = {
    "zero2": [("mp_rank_00_model_states.pt", "truncate"), ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "flip")],
    "sharded": [("ordinal_0000.pt", "truncate"), ("meta.pt", "flip")],
}

if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    layout, tokens_dir, out_dir = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    train(tokens_dir, out_dir / "ref", 12, LAYOUTS[layout])
    res = corrupt_and_resume(tokens_dir, out_dir / "run", LAYOUTS[layout], VICTIMS[layout])
    (out_dir / "result.json").write_text(json.dumps(res, default=str))
