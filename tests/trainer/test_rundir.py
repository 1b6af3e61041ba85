import json

import pytest
import torch

from tessera.core.errors import CheckpointError, InputError
from tessera.core.files import load_checkpoint, save_checkpoint
from tessera.core.root_config import load_root
from tessera.dataprep.imaging import save_image_grid
from tessera.trainer.rundir import RunDir


def test_run_dir_layout_metrics_and_checkpoints(tmp_path):
    cfg = load_root("demo", ["dvae.train.steps=3"])
    run = RunDir(tmp_path / "run", cfg)
    run.metrics.log(1, loss=2.5, lr=torch.tensor(0.1))
    run.metrics.log(2, loss=1.5)
    for step in (1, 2, 3):
        run.save_checkpoint("dvae", step, {"step": step, "model": {"w": torch.full((2,), float(step))}}, keep_last=2)
    run.close()
    p = tmp_path / "run"
    assert load_root(p / "config.toml").dvae.train.steps == 3
    rows = [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["lr"] == pytest.approx(0.1)
    assert list((p / "tb").glob("events.out.tfevents.*"))
    assert sorted(x.name for x in (p / "checkpoints").glob("step_*.pt")) == ["step_00000002.pt", "step_00000003.pt"]
    ck = load_checkpoint(p, "dvae")  # a run dir resolves to checkpoints/latest.pt
    assert ck["step"] == 3 and torch.equal(ck["model"]["w"], torch.full((2,), 3.0))


def test_checkpoint_errors_name_the_file(tmp_path):
    path = tmp_path / "a.pt"
    save_checkpoint(path, "dvae", {"model": {"w": torch.zeros(1000)}})
    with pytest.raises(CheckpointError, match=r"a\.pt' is a 'dvae' checkpoint, expected 'transformer'"):
        load_checkpoint(path, "transformer")
    data = path.read_bytes()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"trunc\.pt' is truncated or corrupt"):
        load_checkpoint(trunc, "dvae")
    with pytest.raises(InputError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt", "dvae")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_checkpoint(tmp_path, "dvae")
    # a pickled module is refused (weights_only) rather than executed
    evil = tmp_path / "evil.pt"
    torch.save({"kind": "dvae", "model": torch.nn.Linear(2, 2)}, evil)
    with pytest.raises(CheckpointError):
        load_checkpoint(evil, "dvae")


def test_image_grid_png(tmp_path):
    from PIL import Image

    imgs = torch.zeros(5, 3, 8, 8)
    imgs[1, 0] = 1.0
    save_image_grid(imgs, tmp_path / "g.png", nrow=3, pad=2)
    im = Image.open(tmp_path / "g.png")
    assert im.size == (3 * 10 + 2, 2 * 10 + 2)
    assert im.getpixel((12 + 3, 2 + 3)) == (255, 0, 0)  # second tile is red
    assert im.getpixel((2 + 3, 2 + 3)) == (0, 0, 0)
