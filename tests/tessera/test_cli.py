import subprocess
import sys

import pytest

from tessera import cli


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tessera.cli", *args], capture_output=True, text=True, timeout=120)


def test_top_level_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for words in cli.COMMANDS:
        assert " ".join(words) in out


@pytest.mark.parametrize("words", sorted(cli.COMMANDS))
def test_every_subcommand_has_help(words, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*words, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tessera " + " ".join(words))


def test_unknown_command_exits_2(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert cli.main(["prep", "bogus"]) == 2


def test_config_error_is_one_line_exit_2_no_traceback():
    r = run_cli("config", "--config", "demo", "dvae.model.widthh=3")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert "unknown config key 'dvae.model.widthh'" in r.stderr
    assert "Traceback" not in r.stderr


def test_config_prints_resolved_toml_with_overrides():
    r = run_cli("config", "--config", "demo", "dvae.train.steps=7")
    assert r.returncode == 0, r.stderr
    assert "steps = 7" in r.stdout
    assert 'name = "demo"' in r.stdout
