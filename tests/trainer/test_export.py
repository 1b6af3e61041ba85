"""Export: a self-contained inference dir (safetensors, no pickle, no training code), loading, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from token_fixtures import make_token_shards, one_thread, tiny_root  # noqa: E402,F401

from tessera.cli import main  # noqa: E402
from tessera.core.errors import CheckpointError, InputError, TesseraError  # noqa: E402
from tessera.trainer.config import SampleConfig  # noqa: E402
from tessera.trainer.export import export  # noqa: E402
from tessera.trainer.inference import load  # noqa: E402
from tessera.trainer.transformer_train import load_transformer, train_transformer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    shards = make_token_shards(root / "tokens")
    train_transformer(tiny_root(steps=6, ema_decay=0.9), str(shards), root / "run")
    return root


@pytest.fixture(scope="module")
def clip_ckpt(trained):
    from tessera.core.files import save_checkpoint
    from tessera.dataprep.tokenizer import load_tokenizer
    from tessera.trainer.clip import CLIP, checkpoint_state
    from tessera.trainer.config import ClipConfig

    tok_path = trained / "tokens" / "bpe.model"
    cfg = ClipConfig(d_model=32, n_layers=1, n_heads=2, image_width=8, image_size=16, embed_dim=16, text_len=8)
    torch.manual_seed(0)
    model = CLIP(cfg, load_tokenizer(tok_path).vocab_size)
    path = trained / "clip.pt"
    save_checkpoint(path, "clip", checkpoint_state(model, tok_path))
    return path


def test_export_files_and_fresh_process_load(trained, tmp_path):
    out = tmp_path / "export"
    s = export(trained / "run", out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model", "tokenizer.model.json"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["transformer"]["image_grid"] == 4 and cfg["dvae"]["vocab_size"] == 16 and cfg["clip"] is None
    assert cfg["source"]["weights"] == "ema" and cfg["version"]
    from safetensors.torch import load_file

    t = load_file(str(out / "model.safetensors"))
    assert any(k.startswith("transformer.") for k in t) and any(k.startswith("dvae_decoder.") for k in t)
    assert not any(k.startswith("dvae_encoder.") for k in t)
    model, _, _ = load_transformer(trained / "run")  # EMA weights
    assert torch.equal(t["transformer.image_head.weight"], model.image_head.weight.detach())
    assert s["tensors"] == len(t)
    # the run's [sample] settings travel with the export (the demo preset's guidance and top-k)
    d = load(out).default_sample_config  # the demo preset's values, which differ from SampleConfig's defaults
    assert (d.top_k, d.candidates, d.guidance_scale) == (32, 16, 1.0) and cfg["sample"]["top_k"] == 32
    code = (
        "import sys, torch\n"
        "from tessera.trainer.inference import load\n"
        "from tessera.trainer.config import SampleConfig\n"
        f"p = load({str(out)!r})\n"
        "imgs = p.generate(['a red square', 'a blue circle'], 2, SampleConfig(top_k=4, guidance_scale=2.0), generator=torch.Generator().manual_seed(0))\n"
        "assert imgs.shape == (4, 3, 16, 16), imgs.shape\n"
        "assert 0 <= float(imgs.min()) and float(imgs.max()) <= 1\n"
        "bad = [m for m in sys.modules if m.startswith('deepspeed') or m == 'tessera.trainer.transformer_train' or m == 'tessera.trainer.export']\n"
        "print('BAD', bad)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "BAD []" in r.stdout


def test_fp16_export_matches_fp32_closely(trained, tmp_path):
    export(trained / "run", tmp_path / "e16", dtype="fp16")
    export(trained / "run", tmp_path / "e32")
    assert (tmp_path / "e16" / "model.safetensors").stat().st_size < 0.6 * (tmp_path / "e32" / "model.safetensors").stat().st_size
    p16, p32 = load(tmp_path / "e16"), load(tmp_path / "e32")
    text = p32.encode_prompts(["a green circle"])
    image = torch.zeros(1, 16, dtype=torch.long)
    with torch.no_grad():
        a, b = p16.transformer(text, image)[1], p32.transformer(text, image)[1]
    assert torch.allclose(a, b, atol=2e-2)  # fp16 storage rounding only (weights are cast back to fp32)


def test_clip_reranking_keeps_the_best_candidates(trained, clip_ckpt, tmp_path):
    out = tmp_path / "withclip"
    export(trained / "run", out, clip=clip_ckpt)
    assert (out / "clip_tokenizer.model").exists()
    pipe = load(out)
    assert pipe.clip is not None
    scfg = SampleConfig(candidates=3, top_k=8, batch_size=8)
    best = pipe.generate(["a red square"], 2, scfg, generator=torch.Generator().manual_seed(1))
    all6 = pipe.decode(pipe.generate_codes(["a red square"], 6, scfg, generator=torch.Generator().manual_seed(1)))
    scores = pipe.clip.score(all6, ["a red square"] * 6)
    assert torch.allclose(best, all6[scores.argsort(descending=True)[:2]])


def test_clip_plus_logp_reranking_keeps_the_best_combined_score(trained, clip_ckpt, tmp_path):
    from tessera.trainer.inference import rerank_scores

    out = tmp_path / "withclip"
    export(trained / "run", out, clip=clip_ckpt)
    pipe = load(out)
    scfg = SampleConfig(candidates=4, top_k=8, batch_size=8, rerank="clip+logp")
    best = pipe.generate(["a red square"], 2, scfg, generator=torch.Generator().manual_seed(1))
    codes, logp = pipe.generate_codes(["a red square"], 8, scfg, generator=torch.Generator().manual_seed(1), with_logp=True)
    all8 = pipe.decode(codes)
    clip = pipe.clip.score(all8, ["a red square"] * 8)
    combined = rerank_scores(clip, logp)
    assert torch.allclose(best, all8[combined.argsort(descending=True)[:2]])
    # the two rankings disagree somewhere on these candidates, so the combination is a choice of its own
    assert clip.argsort(descending=True).tolist() != logp.argsort(descending=True).tolist()


def test_sample_cli_with_prompts_file(trained, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(trained / "run"), "--output", str(out)]) == 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na red square\n\na blue circle\n")
    assert (
        main(["sample", "--model", str(out), "--prompts", str(prompts), "-n", "2", "--output", str(tmp_path / "s"), "sample.top_k=4"]) == 0
    )
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names == ["000_00.png", "000_01.png", "001_00.png", "001_01.png", "grid.png", "prompts.txt"]
    capsys.readouterr()
    assert main(["sample", "--model", str(out), "--prompts", str(tmp_path / "missing.txt"), "--output", str(tmp_path / "s2")]) == 2
    assert "prompts file" in capsys.readouterr().err
    paper = REPO / "configs" / "prompts" / "paper_eval.txt"
    from tessera.trainer.sample import read_prompts

    assert len(read_prompts(paper)) == 6


def test_bad_exports_and_runs(trained, tmp_path):
    out = tmp_path / "export"
    export(trained / "run", out)
    (out / "tokenizer.model.json").unlink()
    with pytest.raises(InputError, match="missing tokenizer.model.json"):
        load(out)
    export(trained / "run", out)
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load(out)
    with pytest.raises(InputError, match="not a directory"):
        load(tmp_path / "nothing")
    with pytest.raises(TesseraError):
        export(tmp_path / "no-run", tmp_path / "e")
    (tmp_path / "emptyrun").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        export(tmp_path / "emptyrun", tmp_path / "e")
