import dataclasses
from typing import Literal, Optional

import pytest
import torch

from tessera.core import config as C
from tessera.core.errors import ConfigError
from tessera.core.root_config import TesseraConfig, load_root


@dataclasses.dataclass
class Inner:
    width: int = C.param(8, "width")
    ratio: float = C.param(0.5, "ratio")
    mode: Literal["a", "b"] = C.param("a", "mode")


@dataclasses.dataclass
class Outer:
    name: str = C.param("x", "name")
    flag: bool = C.param(False, "flag")
    maybe: Optional[str] = C.param(None, "maybe")
    sizes: list[int] = C.param(doc="sizes", factory=lambda: [1, 2])
    inner: Inner = C.param(doc="inner", factory=Inner)


def test_defaults_then_toml_then_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('name = "from-toml"\n[inner]\nwidth = 16\nratio = 2\n')
    cfg = C.load(Outer, p, ["inner.width=32", "flag=true", "sizes=[3,4,5]", "maybe=hello"])
    assert cfg.name == "from-toml"  # TOML beats default
    assert cfg.inner.width == 32  # CLI beats TOML
    assert cfg.inner.ratio == 2.0 and isinstance(cfg.inner.ratio, float)  # int accepted for float
    assert cfg.inner.mode == "a"  # default kept
    assert cfg.flag is True and cfg.sizes == [3, 4, 5] and cfg.maybe == "hello"


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("inner.widht=3", "unknown config key 'inner.widht'"),
        ("inner.width=abc", "config key 'inner.width': expected int, got str 'abc'"),
        ("inner.width=1.5", "config key 'inner.width': expected int"),
        ("flag=1", "config key 'flag': expected bool"),
        ("inner.mode=c", "config key 'inner.mode': expected one of 'a', 'b'"),
        ("sizes=[1,'x']", "config key 'sizes[1]': expected int"),
        ("inner=3", "config key 'inner': expected table"),
        ("nokey", "not of the form key.sub=value"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        C.load(Outer, None, [override])
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_key_in_toml_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[inner]\nwidht = 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'inner.widht'"):
        C.load(Outer, p)


def test_invalid_toml_and_missing_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("name = [unclosed\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        C.load(Outer, p)
    with pytest.raises(ConfigError, match="does not exist"):
        C.load(Outer, tmp_path / "missing.toml")


def test_roundtrip_through_toml_text(tmp_path):
    cfg = C.load(Outer, None, ["inner.width=5", "sizes=[9]"])
    path = tmp_path / "out.toml"
    C.write_toml(cfg, path)
    again = C.load(Outer, path)
    assert again == cfg
    assert not list(tmp_path.glob("*.tmp"))


def test_presets_load_and_roundtrip(tmp_path):
    for preset in ("demo", "dalle-12b"):
        cfg = load_root(preset)
        path = tmp_path / f"{preset}.toml"
        C.write_toml(cfg, path)
        assert load_root(path) == cfg


def test_paper_preset_holds_paper_values():
    cfg = load_root("dalle-12b")
    assert cfg.tokenizer.vocab_size == 16384
    assert (cfg.dvae.model.vocab_size, cfg.dvae.model.image_size, cfg.dvae.model.grid_size) == (8192, 256, 32)
    assert cfg.dvae.train.kl_weight == 6.6 and cfg.dvae.train.kl_warmup_steps == 5000
    assert cfg.dvae.train.temp_end == 1 / 16 and cfg.dvae.train.temp_anneal_steps == 150000
    m = cfg.transformer.model
    assert (m.n_layers, m.d_model, m.n_heads, m.text_len, m.conv_kernel) == (64, 3968, 62, 256, 11)
    t = cfg.transformer.train
    assert (t.lr, t.warmup_steps, t.beta2, t.weight_decay, t.grad_clip) == (4.5e-4, 5000, 0.96, 4.5e-2, 4.0)


def test_validation_hooks_reject_bad_combinations():
    with pytest.raises(ConfigError, match="dvae.model.image_size"):
        load_root(None, ["dvae.model.image_size=60", "dvae.model.n_groups=4"])
    with pytest.raises(ConfigError, match="transformer.model.d_model"):
        load_root(None, ["transformer.model.d_model=100", "transformer.model.n_heads=3"])


def test_every_field_is_documented():
    rows = C.describe(TesseraConfig)
    assert len(rows) > 60
    undocumented = [key for key, _, _, doc in rows if not doc.strip()]
    assert undocumented == []


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match="presets: .*demo"):
        C.resolve_preset("no-such-preset")


def test_preset_extends_another(tmp_path):
    base = tmp_path / "base.toml"
    base.write_text('name = "base"\nseed = 3\n[dvae.train]\nsteps = 10\nlr = 0.5\n')
    child = tmp_path / "child.toml"
    child.write_text(f'extends = "{base}"\nname = "child"\n[dvae.train]\nsteps = 20\n')
    cfg = load_root(child, ["seed=4"])
    assert (cfg.name, cfg.seed, cfg.dvae.train.steps, cfg.dvae.train.lr) == ("child", 4, 20, 0.5)
    quick = load_root("demo-quick")
    demo = load_root("demo")
    # demo-quick sets only the dVAE's depth (8x8 tokens) of the model section; the rest comes from demo
    assert dataclasses.replace(quick.dvae.model, n_groups=demo.dvae.model.n_groups) == demo.dvae.model
    assert (quick.dvae.model.n_groups, demo.dvae.model.n_groups) == (4, 3) and quick.dvae.train.steps < demo.dvae.train.steps


@pytest.mark.parametrize("preset", ["demo", "demo-quick"])
def test_every_demo_stage_is_bound_by_its_steps_in_fp32(preset):
    """Issue 17: one seed, the same model on every machine. Time limits are safety stops (a failure in the report),
    and nothing picks its precision by the CPU ("fast" would be bf16 on some machines, fp32 on others)."""
    from tessera.trainer.precision import resolve_precision

    cfg = load_root(preset)
    for name, train in (("dvae", cfg.dvae.train), ("transformer", cfg.transformer.train), ("clip", cfg.clip)):
        assert train.time_budget_mode == "safety", (preset, name)
        assert resolve_precision(train.precision, torch.device("cpu")) == "fp32", (preset, name, train.precision)
        assert train.precision != "fast", (preset, name)


def test_extends_cycle_is_rejected(tmp_path):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text(f'extends = "{b}"\n')
    b.write_text(f'extends = "{a}"\n')
    with pytest.raises(ConfigError, match="cycle"):
        load_root(a)
