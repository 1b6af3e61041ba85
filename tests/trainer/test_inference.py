"""tessera.trainer.inference: loading an export directory, encoding prompts, generating images, bad exports.

The export is made as tests/trainer/test_export.py makes it (tessera.trainer.export.export), from a tiny
untrained transformer checkpoint written directly, to keep the module fast.
"""

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from token_fixtures import IMAGE_VOCAB, make_token_shards, one_thread  # noqa: E402,F401

from tessera.cli import main  # noqa: E402
from tessera.core.errors import CheckpointError, ConfigError, InputError  # noqa: E402
from tessera.trainer.config import SampleConfig, TransformerModelConfig  # noqa: E402
from tessera.trainer.inference import REQUIRED_FILES, Pipeline, load, rerank_scores  # noqa: E402

TEXT_LEN = 6


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    from tessera.core.files import save_checkpoint
    from tessera.trainer.export import export
    from tessera.trainer.token_data import read_manifest
    from tessera.trainer.transformer import DALLE

    root = tmp_path_factory.mktemp("inf")
    tokens = make_token_shards(root / "tokens", n=32, per_shard=32)
    m = read_manifest(tokens)
    mcfg = TransformerModelConfig(
        text_len=TEXT_LEN,
        text_vocab=m.text_vocab,
        image_grid=m.grid,
        image_vocab=m.image_vocab,
        d_model=32,
        n_layers=2,
        n_heads=2,
        conv_kernel=3,
    )
    torch.manual_seed(0)
    model = DALLE(mcfg)
    ck = root / "transformer.pt"
    save_checkpoint(
        ck,
        "transformer",
        {"model": model.state_dict(), "model_cfg": dataclasses.asdict(mcfg), "dvae": m.dvae, "tokenizer": m.tokenizer, "step": 3},
    )
    export(ck, root / "export")
    return root / "export"


@pytest.fixture(scope="module")
def pipe(export_dir):
    return load(export_dir)


@pytest.fixture
def copy(export_dir, tmp_path):
    """A scratch copy of the export to damage."""
    dst = tmp_path / "export"
    shutil.copytree(export_dir, dst)
    return dst


def test_load_builds_the_pipeline_from_the_files(export_dir, pipe):
    from safetensors.torch import load_file

    cfg = json.loads((export_dir / "config.json").read_text())
    assert isinstance(pipe, Pipeline) and pipe.device == torch.device("cpu") and pipe.clip is None
    assert dataclasses.asdict(pipe.transformer.cfg) == cfg["transformer"]
    assert pipe.transformer.cfg.text_len == TEXT_LEN and pipe.transformer.cfg.image_grid == 4
    assert not pipe.transformer.training and not pipe.dvae.training
    assert pipe.dvae.encoder is None  # decoding only
    assert pipe.tokenizer.vocab_size == cfg["tokenizer"]["vocab_size"] <= pipe.transformer.cfg.text_vocab
    tensors = load_file(str(export_dir / "model.safetensors"))
    for k, v in pipe.transformer.state_dict().items():
        assert torch.equal(v, tensors[f"transformer.{k}"]), k
    for k, v in pipe.dvae.decoder.state_dict().items():
        assert torch.equal(v, tensors[f"dvae_decoder.{k}"]), k
    assert pipe.default_sample_config == SampleConfig()  # the checkpoint had no run config.toml: defaults


def test_encode_prompts_pads_and_truncates(pipe):
    V = pipe.transformer.cfg.text_vocab
    short = pipe.tokenizer.encode("a red circle")
    long = pipe.tokenizer.encode("a red square a red square a red square")
    assert 0 < len(short) < TEXT_LEN < len(long)
    text = pipe.encode_prompts(["a red circle", "A RED CIRCLE", "a red square a red square a red square", ""])
    assert text.shape == (4, TEXT_LEN) and text.dtype == torch.long
    assert text[0].tolist() == short + [V + i for i in range(len(short), TEXT_LEN)]  # pad token V + position
    assert torch.equal(text[0], text[1])  # the tokenizer lower-cases
    assert text[2].tolist() == long[:TEXT_LEN]  # cut to text_len
    assert text[3].tolist() == [V + i for i in range(TEXT_LEN)]  # the empty caption


def test_encode_prompts_drops_ids_outside_the_text_vocabulary(pipe):
    V = pipe.transformer.cfg.text_vocab

    class Wild:
        def encode(self, text):
            return [3, V, -1, 4, V + 7]

    p = dataclasses.replace(pipe, tokenizer=Wild())
    assert p.encode_prompts(["x"]).tolist() == [[3, 4] + [V + i for i in range(2, TEXT_LEN)]]


def test_generate_shapes_range_and_determinism(pipe):
    scfg = SampleConfig(top_k=8, batch_size=3)
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    a = pipe.generate(["a red circle", "a blue square"], 3, scfg, generator=g(0))
    b = pipe.generate(["a red circle", "a blue square"], 3, scfg, generator=g(0))
    c = pipe.generate(["a red circle", "a blue square"], 3, scfg, generator=g(1))
    assert a.shape == (6, 3, 16, 16) and a.dtype == torch.float32
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    one = pipe.generate("a red circle", 2, scfg, generator=g(0))  # a single string is one prompt
    assert one.shape == (2, 3, 16, 16)


def test_generate_codes_groups_rows_by_prompt(pipe):
    greedy = SampleConfig(top_k=1, batch_size=16)
    codes = pipe.generate_codes(["a red circle", "a blue square"], 3, greedy)
    assert codes.shape == (6, 4, 4) and codes.dtype == torch.long
    assert ((codes >= 0) & (codes < IMAGE_VOCAB)).all()
    first = pipe.generate_codes(["a red circle"], 1, greedy)
    second = pipe.generate_codes(["a blue square"], 1, greedy)
    for i in range(3):
        assert torch.equal(codes[i], first[0]) and torch.equal(codes[3 + i], second[0])
    # decoding in batches of any size gives the same rows
    chunked = pipe.generate_codes(["a red circle", "a blue square"], 3, dataclasses.replace(greedy, batch_size=2))
    assert torch.equal(chunked, codes)
    images = pipe.decode(codes, batch=4)
    assert torch.allclose(images, pipe.decode(codes, batch=64))


def test_candidates_without_a_clip_are_ignored(pipe):
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    one = pipe.generate(["a green circle"], 2, SampleConfig(top_k=4, candidates=1), generator=g())
    many = pipe.generate(["a green circle"], 2, SampleConfig(top_k=4, candidates=5), generator=g())
    assert many.shape == (2, 3, 16, 16) and torch.equal(one, many)


@pytest.mark.parametrize(
    "scfg",
    [
        SampleConfig(top_k=4, temperature=0.7, batch_size=4),
        SampleConfig(top_k=0, guidance_scale=2.0, batch_size=8),
        SampleConfig(top_k=4, use_kv_cache=False, batch_size=8),
    ],
)
def test_sampled_log_likelihood_equals_a_full_pass(pipe, scfg):
    """The log-likelihood kept while sampling is the model's, given the caption: that of one full pass over
    the finished codes, whatever temperature, truncation and guidance chose them."""
    import torch.nn.functional as F

    prompts = ["a red circle", "a blue square"]
    codes, logp = pipe.generate_codes(prompts, 3, scfg, torch.Generator().manual_seed(5), with_logp=True)
    assert logp.shape == (6,) and torch.isfinite(logp).all() and (logp < 0).all()
    text = pipe.encode_prompts(prompts).repeat_interleave(3, dim=0)
    img = codes.view(6, -1)
    with torch.no_grad():
        _, logits = pipe.transformer(text, img)
    full = -F.cross_entropy(logits.float().transpose(1, 2), img, reduction="none").sum(1)
    assert torch.allclose(logp, full, atol=1e-3, rtol=1e-5)
    # the codes are those generate_codes returns without the log-likelihoods
    assert torch.equal(codes, pipe.generate_codes(prompts, 3, scfg, torch.Generator().manual_seed(5)))


def test_logp_reranking_without_a_clip_keeps_the_most_likely_candidates(pipe):
    scfg = SampleConfig(top_k=8, candidates=4, rerank="logp", batch_size=8)
    kept = pipe.generate(["a green circle", "a red square"], 2, scfg, generator=torch.Generator().manual_seed(2))
    codes, logp = pipe.generate_codes(["a green circle", "a red square"], 8, scfg, torch.Generator().manual_seed(2), with_logp=True)
    images = pipe.decode(codes)
    expect = torch.cat([images[i * 8 : (i + 1) * 8][logp[i * 8 : (i + 1) * 8].argsort(descending=True)[:2]] for i in range(2)])
    assert torch.equal(kept, expect)
    # and it is a choice: the kept pair differs from the first two candidates of some prompt
    assert not torch.equal(kept, torch.cat([images[0:2], images[8:10]]))


def test_rerank_scores_standardise_and_add():
    clip = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logp = torch.tensor([-40.0, -10.0, -30.0, -20.0])
    both = rerank_scores(clip, logp)
    z = lambda x: (x.double() - x.double().mean()) / x.double().std()  # noqa: E731
    assert torch.allclose(both, z(clip) + z(logp))
    assert both.argsort(descending=True).tolist() == [3, 1, 2, 0]
    assert torch.equal(rerank_scores(clip, None), clip.double()) and torch.equal(rerank_scores(None, logp), logp.double())
    assert torch.isfinite(rerank_scores(torch.ones(3), logp[:3])).all()  # equal scores do not divide by zero
    with pytest.raises(ValueError, match=r"\(4,\) CLIP scores but \(3,\) log-likelihoods"):
        rerank_scores(clip, logp[:3])
    with pytest.raises(ValueError, match="expected CLIP scores, log-likelihoods or both"):
        rerank_scores(None, None)


@pytest.mark.parametrize("prompts, n", [([], 1), (["a red circle"], 0)])
def test_generate_rejects_no_prompts_or_n_below_one(pipe, prompts, n):
    with pytest.raises(InputError, match=f"expected at least one prompt and n >= 1, got {len(prompts)} prompts, n={n}"):
        pipe.generate(prompts, n)


def test_default_sample_config_comes_from_the_export(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["sample"] = {"top_k": 7, "guidance_scale": 2.5, "from_a_newer_version": 1}
    (copy / "config.json").write_text(json.dumps(cfg))
    assert load(copy).default_sample_config == SampleConfig(top_k=7, guidance_scale=2.5)  # unknown keys ignored
    cfg["sample"] = {"temperature": 0}
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="config key 'sample.temperature': expected > 0"):
        _ = load(copy).default_sample_config


# ---------------------------------------------------------------- damaged exports


def test_corrupt_config_json_is_a_one_line_error(copy, tmp_path, capsys):
    (copy / "config.json").write_text('{"transformer": {"text_len": 6,')
    with pytest.raises(CheckpointError) as e:
        load(copy)
    assert str(e.value) == f"export '{copy}': config.json is unreadable (JSONDecodeError)"
    assert main(["sample", "--model", str(copy), "--prompt", "a red circle", "-n", "1", "--output", str(tmp_path / "out")]) == 2
    out, err = capsys.readouterr()
    assert err == f"tessera: error: export '{copy}': config.json is unreadable (JSONDecodeError)\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", REQUIRED_FILES)
def test_each_required_file_is_checked(copy, name):
    (copy / name).unlink()
    with pytest.raises(InputError) as e:
        load(copy)
    assert str(e.value) == f"export '{copy}' is missing {name}"


@pytest.mark.parametrize("section", ["transformer", "dvae", "tokenizer"])
def test_missing_config_section(copy, section):
    cfg = json.loads((copy / "config.json").read_text())
    del cfg[section]
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"config.json has no '{section}' section"):
        load(copy)


def test_config_that_disagrees_with_the_tensors(copy):
    cfg = json.loads((copy / "config.json").read_text())
    good = json.dumps(cfg)
    cfg["transformer"]["d_model"] = 64
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"transformer tensors do not match config.json \(Error"):
        load(copy)
    cfg = json.loads(good)
    cfg["dvae"]["n_hid"] = 16
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="dVAE decoder tensors do not match config.json"):
        load(copy)
    cfg = json.loads(good)
    cfg["transformer"]["n_layer"] = 2
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unknown config key 'transformer.model.n_layer'"):
        load(copy)


def test_clip_entry_without_its_tokenizer(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["clip"] = {"config": {"d_model": 32, "n_layers": 1, "n_heads": 2}, "vocab_size": 40, "tokenizer": "clip_tokenizer.model"}
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError) as e:
        load(copy)
    assert str(e.value) == f"export '{copy}' is missing clip_tokenizer.model"


def test_not_a_directory(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(InputError, match=r"is not a directory \(expected the output of 'tessera export'\)"):
        load(f)
