"""`tessera config` (tessera.config_cli): the resolved config as TOML, or every key with type, default and doc."""

import dataclasses
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from tessera import cli
from tessera.core import config as C
from tessera.core.root_config import TesseraConfig, load_root


def run_config(capsys, *args):
    code = cli.main(["config", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _drop_none(d):
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    return d


def test_keys_lists_every_key_with_type_default_and_doc(capsys):
    code, out, err = run_config(capsys, "--keys")
    assert code == 0 and err == ""
    lines = out.splitlines()
    rows = C.describe(TesseraConfig)
    assert len(lines) == 2 * len(rows)
    for i, (key, tp, default, doc) in enumerate(rows):
        assert lines[2 * i] == f"{key} ({tp}, default {default!r})"
        assert lines[2 * i + 1] == f"    {doc}" and doc.strip(), key
    for want in (
        "dvae.model.vocab_size (int, default 8192)",
        "transformer.model.attention (one of 'dalle', 'dense', default 'dalle')",
        "transformer.train.lr (float, default 0.00045)",
        "crawl.keep_cols (list of str, default [])",
        "crawl.allowed_schemes (list of str, default ['http', 'https'])",
        "clip.checkpoint (str or none, default None)",
        "sample.use_kv_cache (bool, default True)",
        "cluster.zero_stage (int, default 0)",
    ):
        assert want in lines, want
    i = lines.index("dvae.train.kl_weight (float, default 6.6)")
    assert "KL" in lines[i + 1]


def test_unknown_preset_exits_2_and_lists_the_presets(capsys):
    code, out, err = run_config(capsys, "--config", "no-such-preset")
    assert code == 2 and out == ""
    presets = sorted(p.stem for p in C.PRESET_DIR.glob("*.toml"))
    assert err.strip() == f"tessera: error: config 'no-such-preset' is neither a file nor a preset; presets: {', '.join(presets)}"
    assert {"demo", "demo-quick", "dalle-12b"} <= set(presets)


def test_missing_toml_file_exits_2(tmp_path, capsys):
    missing = tmp_path / "nope.toml"
    code, out, err = run_config(capsys, "--config", str(missing))
    assert code == 2 and out == ""
    assert err.strip() == f"tessera: error: config file '{missing}' does not exist"


def test_wrong_type_in_a_toml_file_names_the_key(tmp_path, capsys):
    p = tmp_path / "c.toml"
    p.write_text('[transformer.model]\nn_layers = "many"\n')
    code, out, err = run_config(capsys, "--config", str(p))
    assert code == 2 and out == ""
    assert "config key 'transformer.model.n_layers': expected int, got str 'many'" in err


def test_defaults_print_as_toml(capsys):
    code, out, err = run_config(capsys)
    assert code == 0 and err == ""
    printed = tomllib.loads(out)
    assert printed == _drop_none(dataclasses.asdict(TesseraConfig()))
    assert "checkpoint" not in printed["clip"]  # None (the default) is left out


def test_resolved_preset_with_overrides_reloads_to_the_same_config(tmp_path, capsys):
    code, out, _ = run_config(capsys, "--config", "demo-quick", "transformer.train.steps=9", "sample.top_k=5", "name=x")
    assert code == 0
    printed = tomllib.loads(out)
    assert printed["name"] == "x" and printed["transformer"]["train"]["steps"] == 9 and printed["sample"]["top_k"] == 5
    quick_raw = tomllib.loads((Path(__file__).resolve().parents[2] / "configs" / "demo-quick.toml").read_text())
    assert printed["dvae"]["train"]["steps"] == quick_raw["dvae"]["train"]["steps"] != 1000  # from demo-quick, not demo
    assert printed["transformer"]["model"]["d_model"] == 128  # from demo, which demo-quick extends
    assert "extends" not in printed
    path = tmp_path / "resolved.toml"
    path.write_text(out)
    expected = load_root("demo-quick", ["transformer.train.steps=9", "sample.top_k=5", "name=x"])
    assert load_root(path) == expected
    code, again, _ = run_config(capsys, "--config", str(path))
    assert code == 0 and again == out
