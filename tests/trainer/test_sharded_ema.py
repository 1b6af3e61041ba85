"""Parameter EMA on the sharded layout (FSDP2 within a group), two real gloo ranks in one group (1 x 2: every parameter and
its EMA split over the ranks). This file run as a script is the worker: it trains the tiny transformer of token_fixtures
with ema_decay 0.9 and an evaluation every 3 updates for STEPS updates, and once more checkpointed after STEPS / 2 updates
(inside the warm-up, so the same learning rates whatever the horizon) and resumed to STEPS. The tests compare with the
same run in one process (the same data order): the evaluated and the exported EMA weights are the whole EMA, within float
rounding, and the resumed run's EMA is the uninterrupted one's."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from rank_workers import run_rank_workers  # noqa: E402
from token_fixtures import make_token_shards, one_thread, tiny_root  # noqa: E402,F401

STEPS = 6
SHARDED = ("cluster.sharded=true", "cluster.ranks_per_node=2")


def root(tokens: Path, steps: int, extra: tuple[str, ...] = ()):
    return tiny_root((*extra, f"transformer.train.eval_data={tokens}"), steps=steps, ema_decay=0.9, eval_every=3, log_every=1)


def worker(out: Path) -> None:
    torch.set_num_threads(1)
    from tessera.trainer.transformer_train import train_transformer

    tokens = out / "tokens"
    res = {"sharded": train_transformer(root(tokens, STEPS, SHARDED), str(tokens), out / "sharded")}
    res["half"] = train_transformer(root(tokens, STEPS // 2, SHARDED), str(tokens), out / "resumed")
    res["resumed"] = train_transformer(root(tokens, STEPS, SHARDED), str(tokens), out / "resumed")
    (out / f"result{os.environ['RANK']}.json").write_text(json.dumps(res, default=str))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tessera.trainer.transformer_train import train_transformer

    out = tmp_path_factory.mktemp("sharded_ema")
    make_token_shards(out / "tokens")
    run_rank_workers(__file__, [str(out)], 2, "sharded EMA")
    one = train_transformer(root(out / "tokens", STEPS), str(out / "tokens"), out / "one")  # this process: the plain engine
    return out, json.loads((out / "result0.json").read_text()), one


def exported(run: Path, dest: Path, use_ema: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    from tessera.trainer.export import export

    export(run, dest, use_ema=use_ema)
    tensors = load_file(str(dest / "model.safetensors"))
    cfg = json.loads((dest / "config.json").read_text())
    return {k: v for k, v in tensors.items() if k.startswith("transformer.")}, cfg


def test_sharded_run_with_ema_finishes_and_evaluates_the_whole_ema(runs):
    out, res, one = runs
    s = res["sharded"]
    assert s["engine"] == "sharded" and s["world_size"] == 2 and s["steps"] == STEPS and one["engine"] == "plain"
    # the final evaluation ran on rank 0's plain copy with the gathered EMA: the one-process run's EMA evaluates the same
    assert s["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5) and s["eval_image_ce"] == pytest.approx(
        one["eval_image_ce"], rel=1e-5
    )
    evals = [r for r in map(json.loads, (out / "sharded" / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]  # and the periodic one, after which training went on


def test_export_of_a_sharded_run_is_the_whole_ema_of_the_one_process_run(runs, tmp_path):
    from tessera.core.files import load_checkpoint

    out, _, _ = runs
    ema, cfg = exported(out / "sharded", tmp_path / "sharded")
    ref, ref_cfg = exported(out / "one", tmp_path / "one")
    raw, raw_cfg = exported(out / "sharded", tmp_path / "raw", use_ema=False)
    assert cfg["source"]["weights"] == ref_cfg["source"]["weights"] == "ema" and raw_cfg["source"]["weights"] == "model"
    assert cfg["source"]["step"] == STEPS and set(ema) == set(ref)
    for k in ref:
        torch.testing.assert_close(ema[k], ref[k], atol=1e-6, rtol=1e-4, msg=k)
    assert max(float((ema[k] - raw[k]).abs().max()) for k in raw) > 1e-3  # the EMA, not the last step's weights
    # each rank checkpointed its own half of the EMA (ordinal files), not a whole copy on rank 0 (meta.pt)
    folder = out / "sharded" / "checkpoints" / f"step_{STEPS:08d}"
    assert load_checkpoint(folder / "meta.pt", "transformer")["client"]["ema"] == {}
    halves = [load_checkpoint(folder / f"ordinal_{o:04d}.pt", "transformer")["client_shards"] for o in (0, 1)]
    whole = {rec["path"][1]: rec["shape"] for rec in halves[0]}
    assert sorted(f"transformer.{k}" for k in whole) == sorted(ref)
    for a, b in zip(*halves):
        assert a["path"] == b["path"] and a["local"].shape[0] + b["local"].shape[0] == a["shape"][0]
    from tessera.cluster.sharded import consolidate_sharded_checkpoint
    from tessera.core.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no 'latest.sharded' file") as e:
        consolidate_sharded_checkpoint(out / "one" / "checkpoints", "transformer")  # a plain run's
    assert "\n" not in str(e.value)


def test_a_resumed_sharded_run_keeps_its_ema(runs, tmp_path):
    out, res, _ = runs
    assert res["half"]["steps"] == STEPS // 2 and res["resumed"]["resumed_from"] == STEPS // 2 and res["resumed"]["steps"] == STEPS
    resumed, _ = exported(out / "resumed", tmp_path / "resumed")
    straight, _ = exported(out / "sharded", tmp_path / "straight")
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], atol=1e-6, rtol=1e-5, msg=k)
    assert res["resumed"]["eval_loss"] == pytest.approx(res["sharded"]["eval_loss"], rel=1e-6)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
