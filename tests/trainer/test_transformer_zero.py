"""The transformer trainer on DeepSpeed ZeRO (cluster.zero_stage > 0) with two real gloo ranks.

One pair of worker processes (this file run as a script) trains the tiny transformer three ways
on the same token shards: DDP for 8 updates; ZeRO-3 for 4 updates, then resumed to 8 from its
sharded checkpoint; ZeRO-2 with parameter EMA for 4 updates. The tests compare what they wrote:
ZeRO-3 (resumed) must land on the DDP weights, and `export` must consolidate the ZeRO shards into
an inference directory that loads without DeepSpeed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from rank_workers import run_rank_workers  # noqa: E402
from token_fixtures import make_token_shards, one_thread, tiny_root  # noqa: E402,F401

REPO = Path(__file__).resolve().parents[2]
STEPS = 8


def worker(out: Path) -> None:
    torch.set_num_threads(1)
    from tessera.trainer.transformer_train import train_transformer

    shards = str(out / "tokens")
    rank = int(os.environ["RANK"])
    res = {}
    res["ddp"] = train_transformer(tiny_root(steps=STEPS), shards, out / "ddp")
    zero3 = ("cluster.zero_stage=3",)
    res["zero3_half"] = train_transformer(tiny_root(zero3, steps=STEPS // 2, ckpt_every=STEPS // 2), shards, out / "zero3")
    res["zero3"] = train_transformer(tiny_root(zero3, steps=STEPS), shards, out / "zero3")
    res["zero2_ema"] = train_transformer(tiny_root(("cluster.zero_stage=2",), steps=STEPS // 2, ema_decay=0.5), shards, out / "zero2")
    (out / f"result{rank}.json").write_text(json.dumps(res, default=str))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero")
    make_token_shards(out / "tokens")
    run_rank_workers(__file__, [str(out)], 2, "ZeRO transformer", {"DS_ACCELERATOR": "cpu"})
    return out


def _consolidated(run: Path) -> dict[str, torch.Tensor]:
    from tessera.cluster.engine import consolidate_zero_checkpoint

    sd = consolidate_zero_checkpoint(run / "checkpoints" / "zero")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def test_zero3_sharded_checkpoint_and_resume_match_ddp(runs):
    from tessera.trainer.transformer_train import load_transformer

    res = json.loads((runs / "result0.json").read_text())
    assert res["zero3_half"]["steps"] == STEPS // 2 and res["zero3"]["steps"] == STEPS
    assert res["zero3"]["engine"] == "deepspeed-zero3" and res["ddp"]["engine"] == "ddp"
    assert res["zero3"]["parameters"] == res["ddp"]["parameters"] > 0
    zdir = runs / "zero3" / "checkpoints" / "zero"
    assert (zdir / "latest").read_text().strip() == f"step_{STEPS:08d}"
    tag = zdir / f"step_{STEPS:08d}"
    assert len([p for p in tag.iterdir() if "optim_states" in p.name]) == 2  # one optimizer shard per rank
    assert not (runs / "zero3" / "checkpoints" / "latest.pt").exists()
    ddp, _, _ = load_transformer(runs / "ddp", use_ema=False)
    ref = ddp.state_dict()
    sd = _consolidated(runs / "zero3")
    assert set(sd) == set(k for k, v in ref.items() if v.is_floating_point())
    init = tiny_root(steps=STEPS)  # the weights moved, and identically to DDP's (up to float reassociation)
    for k, v in sd.items():
        assert torch.allclose(v, ref[k], atol=2e-5, rtol=1e-4), (k, (v - ref[k]).abs().max())
    moved = max((sd[k] - v).abs().max().item() for k, v in _fresh_weights(init, runs).items() if k in sd)
    assert moved > 1e-3
    # the second rank trained too; the logged loss is the global batch's (the mean over ranks), the same on both
    res1 = json.loads((runs / "result1.json").read_text())
    assert res1["zero3"]["steps"] == STEPS and res1["zero3"]["final_loss"] == res["zero3"]["final_loss"]


def _fresh_weights(cfg, runs: Path) -> dict[str, torch.Tensor]:
    import dataclasses

    from tessera.trainer.token_data import read_manifest
    from tessera.trainer.transformer import DALLE
    from tessera.trainer.transformer_train import resolve_model_config

    mcfg = resolve_model_config(cfg.transformer.model, read_manifest(runs / "tokens"))
    torch.manual_seed(cfg.seed + 1000)
    return DALLE(dataclasses.replace(mcfg)).state_dict()


def test_export_consolidates_zero_shards_and_loads_without_deepspeed(runs, tmp_path):
    from tessera.trainer.export import export

    out = tmp_path / "export"
    export(runs / "zero3", out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["source"]["weights"] == "model" and cfg["source"]["step"] == STEPS
    code = (
        "import sys, json, torch\n"
        "from safetensors.torch import load_file\n"
        "from tessera.trainer.inference import load\n"
        f"p = load({str(out)!r})\n"
        "assert 'deepspeed' not in sys.modules\n"
        "imgs = p.generate(['a red circle', 'a blue square'], generator=torch.Generator().manual_seed(0))\n"
        "t = load_file(sys.argv[1] + '/model.safetensors')\n"
        "print(json.dumps({'shape': list(imgs.shape), 'n': len(t)}))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["shape"][0] == 2 and info["shape"][1] == 3
    from safetensors.torch import load_file

    t = load_file(str(out / "model.safetensors"))
    sd = _consolidated(runs / "zero3")
    for k, v in sd.items():
        assert torch.equal(t[f"transformer.{k}"].float(), v), k


def test_export_of_zero2_run_uses_its_ema(runs, tmp_path):
    from safetensors.torch import load_file

    from tessera.trainer.export import export

    out = tmp_path / "export"
    export(runs / "zero2", out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["source"]["weights"] == "ema"
    t = load_file(str(out / "model.safetensors"))
    raw = _consolidated(runs / "zero2")
    differs = [k for k, v in raw.items() if not torch.equal(t[f"transformer.{k}"].float(), v)]
    assert differs  # the EMA weights, not the last step's


def test_zero_config_refusals(tmp_path):
    from tessera.core.errors import CheckpointError, ConfigError
    from tessera.trainer.transformer_train import train_transformer

    shards = make_token_shards(tmp_path / "tokens", n=64, per_shard=64)
    cfg = tiny_root(("cluster.zero_stage=3",), steps=2, ema_decay=0.9)
    with pytest.raises(ConfigError, match="ema_decay"):
        train_transformer(cfg, str(shards), tmp_path / "run")
    # a plain run cannot be resumed as ZeRO (and the other way round): named, not silently restarted
    train_transformer(tiny_root(steps=2), str(shards), tmp_path / "plain")
    cfg = tiny_root(("cluster.zero_stage=2",), steps=4)
    with pytest.raises(CheckpointError, match="latest.pt"):
        train_transformer(cfg, str(shards), tmp_path / "plain")


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
