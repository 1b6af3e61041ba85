"""tessera.errors: user errors reach the user as one line through `tessera.cli.main`, exit code 2.

One real command per error class (ConfigError, InputError, CheckpointError), then a stand-in
command for the edges of the contract (multi-line and empty messages, TESSERA_DEBUG, other errors).
"""

import sys
import types

import pytest

from tessera import cli
from tessera.core import errors
from tessera.core.errors import CheckpointError, ConfigError, InputError, TesseraError


def one_error_line(capsys) -> str:
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("tessera: error: ")
    return lines[0][len("tessera: error: ") :]


def test_hierarchy_and_docs():
    for cls in (ConfigError, InputError, CheckpointError):
        assert issubclass(cls, TesseraError) and cls.__doc__.strip()
        others = {ConfigError, InputError, CheckpointError} - {cls}
        assert not any(issubclass(cls, o) for o in others)
    assert issubclass(TesseraError, Exception) and not issubclass(TesseraError, (ValueError, OSError, RuntimeError))
    assert "exit code 2" in errors.TesseraError.__doc__


def test_config_error_through_the_cli(capsys):
    assert cli.main(["config", "dvae.train.steps=abc"]) == 2
    assert one_error_line(capsys) == "config key 'dvae.train.steps': expected int, got str 'abc'"


def test_input_error_through_the_cli(tmp_path, capsys):
    missing = tmp_path / "no-run"
    assert cli.main(["export", str(missing), "--output", str(tmp_path / "e")]) == 2
    assert one_error_line(capsys) == f"run '{missing}' does not exist"
    assert not (tmp_path / "e").exists()


def test_checkpoint_error_through_the_cli(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage, not a torch checkpoint" * 10)
    assert cli.main(["export", str(bad), "--output", str(tmp_path / "e")]) == 2
    msg = one_error_line(capsys)
    assert msg.startswith(f"checkpoint '{bad}'") and "corrupt" in msg


# ---------------------------------------------------------------- the contract's edges, with a stand-in command


@pytest.fixture
def fake_command(monkeypatch):
    """`tessera boom`: its run() does whatever the test puts in `action`."""
    mod = types.ModuleType("tessera_test_fake_command")
    state = {"action": lambda: 0}
    mod.add_boom = lambda parser: parser.add_argument("--x", default=None)
    mod.run_boom = lambda args: state["action"]()
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(cli.COMMANDS, ("boom",), (mod.__name__, "boom", "a stand-in command"))
    monkeypatch.delenv("TESSERA_DEBUG", raising=False)

    def set_action(fn):
        state["action"] = fn

    return set_action


def _raise(e):
    def f():
        raise e

    return f


@pytest.mark.parametrize("cls", [TesseraError, ConfigError, InputError, CheckpointError])
def test_only_the_first_line_is_printed(fake_command, capsys, cls):
    fake_command(_raise(cls("the first line\n  and a second one\nand a third")))
    assert cli.main(["boom"]) == 2
    assert one_error_line(capsys) == "the first line"


def test_an_empty_message_prints_the_class_name(fake_command, capsys):
    fake_command(_raise(CheckpointError()))
    assert cli.main(["boom"]) == 2
    assert one_error_line(capsys) == "CheckpointError"


def test_tessera_debug_reraises_with_the_traceback(fake_command, monkeypatch):
    fake_command(_raise(InputError("bad input")))
    monkeypatch.setenv("TESSERA_DEBUG", "1")
    with pytest.raises(InputError, match="bad input"):
        cli.main(["boom"])


def test_other_exceptions_are_not_turned_into_user_errors(fake_command):
    """A bug (not the user's input) keeps its traceback."""
    fake_command(_raise(ZeroDivisionError("division by zero")))
    with pytest.raises(ZeroDivisionError):
        cli.main(["boom"])


def test_interrupt_and_return_codes(fake_command, capsys):
    fake_command(_raise(KeyboardInterrupt()))
    assert cli.main(["boom"]) == 130
    assert capsys.readouterr().err.strip() == "tessera: interrupted"
    fake_command(lambda: None)
    assert cli.main(["boom"]) == 0
    fake_command(lambda: 3)
    assert cli.main(["boom"]) == 3
    assert capsys.readouterr().err == ""
