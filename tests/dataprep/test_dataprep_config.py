"""tessera.dataprep.config: the data-preparation sections (synthetic, crawl + filters, tokenizer, encode).

Loaded through tessera.config as the root config's sections, so errors carry the dotted root key.
"""

import dataclasses

import pytest

from tessera.core import config as C
from tessera.core.errors import ConfigError
from tessera.core.root_config import load_root
from tessera.dataprep.config import CrawlConfig, EncodeConfig, FilterConfig, SyntheticConfig, TokenizerConfig

CLASSES = (SyntheticConfig, FilterConfig, CrawlConfig, TokenizerConfig, EncodeConfig)


def load(*overrides):
    return load_root(None, list(overrides))


@pytest.mark.parametrize("cls", CLASSES)
def test_every_field_is_documented(cls):
    assert (cls.__doc__ or "").strip()
    for f in dataclasses.fields(cls):
        assert f.metadata.get("doc", "").strip(), f"{cls.__name__}.{f.name}"


def test_defaults():
    c = CrawlConfig()
    assert (c.url_col, c.caption_col, c.image_size, c.resize, c.output_format) == ("url", "caption", 64, "center_crop", "jpg")
    assert c.allowed_schemes == ["http", "https"] and c.keep_cols == [] and c.s3_endpoint_url is None
    f = c.filters
    assert f == FilterConfig()
    assert (f.min_caption_chars, f.max_pixels, f.dedup_exact, f.dedup_near, f.similarity_threshold) == (1, 89_478_485, True, False, 0.0)
    t = TokenizerConfig()
    assert (t.kind, t.vocab_size, t.lowercase, t.dropout) == ("youtokentome", 16384, True, 0.0)  # the paper's vocabulary
    # mutable defaults are per instance
    a, b = CrawlConfig(), CrawlConfig()
    a.allowed_schemes.append("ftp")
    a.keep_cols.append("width")
    assert b.allowed_schemes == ["http", "https"] and b.keep_cols == []


def test_values_from_overrides_and_toml(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(
        '[crawl]\nkeep_cols = ["width", "height"]\nresize = "border"\ntimeout = 3\n[crawl.filters]\nsimilarity_model = "exports/clip"\n'
    )
    cfg = load_root(p, ["crawl.filters.near_dup_bits=6", "tokenizer.kind=sentencepiece", "encode.workers=3"])
    assert cfg.crawl.keep_cols == ["width", "height"] and cfg.crawl.resize == "border"
    assert cfg.crawl.timeout == 3.0 and isinstance(cfg.crawl.timeout, float)
    assert cfg.crawl.filters.similarity_model == "exports/clip" and cfg.crawl.filters.near_dup_bits == 6
    assert cfg.tokenizer.kind == "sentencepiece" and cfg.encode.workers == 3


@pytest.mark.parametrize(
    "override, message",
    [
        ("crawl.resize=stretch", "config key 'crawl.resize': expected one of 'center_crop', 'keep_ratio', 'border', got 'stretch'"),
        ("crawl.output_format=png", "config key 'crawl.output_format': expected one of 'jpg', 'webp', got 'png'"),
        ("crawl.keep_cols=width", "config key 'crawl.keep_cols': expected list of str, got str 'width'"),
        ("crawl.allowed_schemes=['http', 3]", "config key 'crawl.allowed_schemes[1]': expected str, got int 3"),
        ("crawl.threads=8.5", "config key 'crawl.threads': expected int, got float 8.5"),
        ("crawl.timeout=soon", "config key 'crawl.timeout': expected float, got str 'soon'"),
        ("crawl.filters.dedup_near=1", "config key 'crawl.filters.dedup_near': expected bool, got int 1"),
        ("crawl.filters.similarity_model=3", "config key 'crawl.filters.similarity_model': expected str or none, got int 3"),
        ("crawl.filters=3", "config key 'crawl.filters': expected table [FilterConfig], got int 3"),
        ("tokenizer.kind=bpe", "config key 'tokenizer.kind': expected one of 'sentencepiece', 'youtokentome', got 'bpe'"),
        ("tokenizer.lowercase=yes", "config key 'tokenizer.lowercase': expected bool, got str 'yes'"),
        ("synthetic.num_train=1e3", "config key 'synthetic.num_train': expected int, got float 1000.0"),
        ("encode.batch_size=true", "config key 'encode.batch_size': expected int, got bool True"),
    ],
)
def test_wrong_types_name_the_key_and_the_expected_type(override, message):
    with pytest.raises(ConfigError) as e:
        load(override)
    assert str(e.value) == message


@pytest.mark.parametrize(
    "override, section",
    [
        ("crawl.filters.min_size=3", "crawl.filters"),
        ("crawl.img_size=3", "crawl"),
        ("tokenizer.vocab=3", "tokenizer"),
        ("synthetic.count=3", "synthetic"),
        ("encode.shards=3", "encode"),
    ],
)
def test_unknown_keys_list_the_known_ones(override, section):
    key = override.split("=")[0]
    cls = {
        "crawl.filters": FilterConfig,
        "crawl": CrawlConfig,
        "tokenizer": TokenizerConfig,
        "synthetic": SyntheticConfig,
        "encode": EncodeConfig,
    }[section]
    with pytest.raises(ConfigError) as e:
        load(override)
    known = ", ".join(sorted(f.name for f in dataclasses.fields(cls)))
    assert str(e.value).startswith(f"unknown config key '{key}'")
    assert str(e.value).endswith(f"known keys under '{section}': {known}")


def test_unknown_key_suggests_near_names():
    with pytest.raises(ConfigError, match=r"unknown config key 'crawl.filters.dedup' \(did you mean dedup_exact, dedup_near\?\)"):
        load("crawl.filters.dedup=true")


@pytest.mark.parametrize(
    "override, message",
    [
        ("synthetic.num_train=0", "config key 'synthetic.num_train'/'synthetic.num_eval': expected >= 1"),
        ("synthetic.num_eval=-1", "config key 'synthetic.num_train'/'synthetic.num_eval': expected >= 1"),
        ("synthetic.holdout_fraction=1.0", "config key 'synthetic.holdout_fraction': expected in [0, 1), got 1.0"),
        ("synthetic.holdout_fraction=-0.1", "config key 'synthetic.holdout_fraction': expected in [0, 1), got -0.1"),
        ("crawl.image_size=0", "config key 'crawl.image_size': expected >= 1, got 0"),
        ("crawl.processes=0", "config key 'crawl.processes': expected >= 1, got 0"),
        ("crawl.threads=-2", "config key 'crawl.threads': expected >= 1, got -2"),
        ("crawl.shard_size=0", "config key 'crawl.shard_size': expected >= 1, got 0"),
        ("tokenizer.vocab_size=7", "config key 'tokenizer.vocab_size': expected >= 8, got 7"),
        ("tokenizer.dropout=1.0", "config key 'tokenizer.dropout': expected in [0, 1), got 1.0"),
        ("tokenizer.dropout=-0.5", "config key 'tokenizer.dropout': expected in [0, 1), got -0.5"),
    ],
)
def test_validate_ranges(override, message):
    with pytest.raises(ConfigError) as e:
        load(override)
    assert str(e.value) == message


@pytest.mark.parametrize(
    "overrides",
    [
        ["synthetic.num_train=1", "synthetic.num_eval=1", "synthetic.holdout_fraction=0.0"],
        ["synthetic.holdout_fraction=0.99"],
        ["crawl.image_size=1", "crawl.processes=1", "crawl.threads=1", "crawl.shard_size=1"],
        ["tokenizer.vocab_size=8", "tokenizer.dropout=0.0"],
        ["tokenizer.dropout=0.999"],
    ],
)
def test_validate_accepts_the_boundaries(overrides):
    load(*overrides)


def test_validate_runs_on_direct_construction_only_when_asked():
    """from_dict validates; a dataclass built in code is validated by calling validate()."""
    bad = CrawlConfig(processes=0)
    with pytest.raises(ConfigError, match="crawl.processes"):
        bad.validate()
    with pytest.raises(ConfigError, match="crawl.processes"):
        C.from_dict(CrawlConfig, {"processes": 0}, prefix="crawl")
