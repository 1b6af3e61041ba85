"""tessera.root_config: the root TesseraConfig (one section per stage) and the presets in configs/."""

import dataclasses
from pathlib import Path

import pytest

from tessera.cluster.config import DistConfig
from tessera.core import config as C
from tessera.core.errors import ConfigError
from tessera.core.root_config import TesseraConfig, from_run_dict, load_root
from tessera.dataprep.config import CrawlConfig, EncodeConfig, SyntheticConfig, TokenizerConfig
from tessera.trainer.config import ClipConfig, DVAEConfig, SampleConfig, TransformerConfig

PRESETS = sorted(p.stem for p in C.PRESET_DIR.glob("*.toml"))

SECTIONS = {
    "synthetic": SyntheticConfig,
    "crawl": CrawlConfig,
    "tokenizer": TokenizerConfig,
    "dvae": DVAEConfig,
    "encode": EncodeConfig,
    "transformer": TransformerConfig,
    "clip": ClipConfig,
    "sample": SampleConfig,
    "cluster": DistConfig,
}


def _dataclasses_under(cls, seen=None):
    seen = set() if seen is None else seen
    if cls in seen:
        return seen
    seen.add(cls)
    for f in dataclasses.fields(cls):
        tp = C._hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            _dataclasses_under(tp, seen)
    return seen


def test_sections_are_the_pipeline_stages():
    hints = C._hints(TesseraConfig)
    names = [f.name for f in dataclasses.fields(TesseraConfig)]
    assert names == ["name", "seed", *SECTIONS]
    for name, cls in SECTIONS.items():
        assert hints[name] is cls
    assert (hints["name"], hints["seed"]) == (str, int)
    assert TesseraConfig is TesseraConfig


def test_every_section_and_field_is_documented():
    classes = _dataclasses_under(TesseraConfig)
    assert set(SECTIONS.values()) <= classes and len(classes) >= 14
    for cls in classes:
        assert (cls.__doc__ or "").strip() and not cls.__doc__.startswith(cls.__name__ + "("), cls  # a written docstring
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc", "").strip(), f"{cls.__name__}.{f.name}"


def test_defaults_are_independent_instances():
    a, b = TesseraConfig(), TesseraConfig()
    assert a == b
    a.dvae.train.steps = 1
    a.crawl.allowed_schemes.append("ftp")
    assert b.dvae.train.steps == DVAEConfig().train.steps
    assert b.crawl.allowed_schemes == ["http", "https"]


def test_defaults_equal_an_empty_load():
    assert load_root() == TesseraConfig()
    assert from_run_dict({}) == TesseraConfig()


def test_unknown_section_lists_the_sections():
    with pytest.raises(ConfigError) as e:
        load_root(None, ["transfromer.model.n_layers=3"])
    msg = str(e.value)
    assert "unknown config key 'transfromer'" in msg and "(did you mean transformer?)" in msg
    assert "known keys under '<root>': clip, cluster, crawl, dvae, encode, name, sample, seed, synthetic, tokenizer, transformer" in msg


@pytest.mark.parametrize(
    "override, key",
    [
        ("cluster.zero_stage=4", "cluster.zero_stage"),
        ("clip.image_size=24", "clip.image_size"),
        ("sample.top_p=0", "sample.top_p"),
        ("tokenizer.vocab_size=4", "tokenizer.vocab_size"),
        ("crawl.shard_size=0", "crawl.shard_size"),
        ("synthetic.holdout_fraction=1.0", "synthetic.holdout_fraction"),
        ("dvae.model.n_hid=30", "dvae.model.n_hid"),
        ("transformer.model.conv_kernel=4", "transformer.model.conv_kernel"),
    ],
)
def test_each_section_is_validated_under_its_root_name(override, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        load_root(None, [override])


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_loads_validates_and_roundtrips(preset, tmp_path):
    cfg = load_root(preset)
    assert isinstance(cfg, TesseraConfig)
    assert cfg.name == preset  # each preset names itself
    # stages that must agree on the image: crawl output = dVAE input, dVAE grid = transformer grid
    assert cfg.crawl.image_size == cfg.dvae.model.image_size
    assert cfg.transformer.model.image_grid == cfg.dvae.model.grid_size
    assert cfg.transformer.model.d_model % cfg.transformer.model.n_heads == 0
    path = tmp_path / "p.toml"
    C.write_toml(cfg, path)
    assert load_root(path) == cfg


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_keys_are_all_known(preset):
    """A preset loads through from_dict, which rejects unknown keys: check none is silently a default."""
    data = C.load_preset(preset)
    assert "extends" not in data

    def leaves(d, prefix=""):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict):
                yield from leaves(v, key)
            else:
                yield key, v

    cfg = C.to_dict(load_root(preset))
    for key, value in leaves(data):
        cur = cfg
        for part in key.split("."):
            cur = cur[part]
        assert cur == value, key


def test_extends_inherits_and_overrides():
    demo, quick = load_root("demo"), load_root("demo-quick")
    raw_quick = C.load_toml(C.PRESET_DIR / "demo-quick.toml")
    assert raw_quick["extends"] == "demo"
    # what demo-quick sets wins
    assert quick.name == "demo-quick" and quick.sample.candidates == raw_quick["sample"]["candidates"] == 2
    assert quick.dvae.train.steps == raw_quick["dvae"]["train"]["steps"] != demo.dvae.train.steps
    assert quick.synthetic.num_train == 1200 and demo.synthetic.num_train == 4000
    # what it does not set comes from demo, not from the dataclass defaults
    assert raw_quick["transformer"]["model"] == {"image_grid": 8} and demo.transformer.model.image_grid == 16
    assert dataclasses.replace(quick.transformer.model, image_grid=16) == demo.transformer.model and quick.transformer.model.d_model == 128
    assert quick.transformer.model.text_len == demo.transformer.model.text_len == 16  # sibling of an overridden key
    assert quick.tokenizer == demo.tokenizer and quick.tokenizer.vocab_size == 256
    assert quick.dvae.train.ema_decay == demo.dvae.train.ema_decay == 0.95  # a key of the section demo-quick does not set
    assert quick.synthetic.source_size == demo.synthetic.source_size == 128  # sibling of an overridden key
    assert quick.sample.top_k == demo.sample.top_k == 32


def test_extends_chain_of_three_and_cli_on_top(tmp_path):
    (tmp_path / "a.toml").write_text('extends = "demo"\nseed = 7\n[clip]\nsteps = 11\n')
    (tmp_path / "b.toml").write_text(f'extends = "{tmp_path / "a.toml"}"\nname = "b"\n[clip]\nlr = 0.5\n')
    cfg = load_root(tmp_path / "b.toml", ["clip.lr=0.25"])
    assert (cfg.name, cfg.seed, cfg.clip.steps, cfg.clip.lr) == ("b", 7, 11, 0.25)
    assert cfg.clip.d_model == load_root("demo").clip.d_model == 64
    (tmp_path / "c.toml").write_text("extends = 3\n")
    with pytest.raises(ConfigError, match="'extends' expected str, got int"):
        load_root(tmp_path / "c.toml")


def test_dalle_12b_holds_the_paper_values():
    cfg = load_root("dalle-12b")
    d, t = cfg.dvae, cfg.transformer
    # App. A: 256x256 RGB -> 32x32 grid of 8192 codes
    assert (d.model.image_size, d.model.grid_size, d.model.vocab_size, d.model.n_groups) == (256, 32, 8192, 4)
    assert (d.train.lr, d.train.lr_min, d.train.lr_decay_steps, d.train.batch_size) == (1e-4, 1.25e-6, 1_200_000, 512)
    assert (d.train.temp_start, d.train.temp_end, d.train.logit_laplace_eps) == (1.0, 1 / 16, 0.1)
    # sec. 2 / App. B: 256 text + 1024 image tokens, 64 layers of width 3968, 62 heads of 64
    m = t.model
    assert (m.text_len, m.text_vocab, m.image_grid, m.image_vocab) == (256, 16384, 32, 8192)
    assert (m.n_layers, m.d_model, m.n_heads, m.d_model // m.n_heads) == (64, 3968, 62, 64)
    assert m.attention == "dalle" and m.mlp_ratio == 4.0
    assert (t.train.decay, t.train.image_loss_weight, t.train.bpe_dropout, t.train.precision) == ("plateau", 7.0, 0.1, "fp16")
    assert (t.train.batch_size, t.train.steps, t.train.eps) == (1024, 430_000, 1e-8)
    # the stages agree: vocabularies and grid
    assert m.text_vocab == cfg.tokenizer.vocab_size and m.image_vocab == d.model.vocab_size
    assert (cfg.tokenizer.dropout, cfg.tokenizer.lowercase) == (0.1, True)
    assert (cfg.crawl.image_size, cfg.crawl.filters.max_aspect_ratio) == (256, 2.0)
    assert cfg.sample.candidates == 512  # sec. 2.6: 512 samples reranked by CLIP


def test_paper_model_sections_are_the_dataclass_defaults():
    """trainer/config.py keeps the paper's architecture as its defaults; the preset spells it out."""
    cfg = load_root("dalle-12b")
    assert cfg.dvae.model == DVAEConfig().model
    assert cfg.transformer.model == TransformerConfig().model


def test_preset_dir_is_the_repositorys_configs():
    assert C.PRESET_DIR == Path(C.__file__).resolve().parents[2] / "configs"
    assert C.resolve_preset("dalle-12b") == C.PRESET_DIR / "dalle-12b.toml"
