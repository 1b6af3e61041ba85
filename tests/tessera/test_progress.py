"""tessera.progress: tqdm bars on stderr with count, rate and ETA, silenced by TESSERA_PROGRESS=0."""

import re

import pytest

from tessera.core import progress


@pytest.mark.parametrize(
    "value, on",
    [(None, True), ("1", True), ("0", False), ("", True), ("yes", True)],
)
def test_enabled_only_zero_disables(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv("TESSERA_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("TESSERA_PROGRESS", value)
    assert progress.enabled() is on


def test_silent_with_progress_zero(monkeypatch, capsys):
    monkeypatch.setenv("TESSERA_PROGRESS", "0")
    with progress.bar(10, "encode", "img") as b:
        assert b.disable
        for _ in range(10):
            b.update(1)
        b.set_postfix(loss="0.5")
    out, err = capsys.readouterr()
    assert (out, err) == ("", "")


def test_bar_shows_count_rate_eta_and_postfix_on_stderr(monkeypatch, capsys):
    monkeypatch.setenv("TESSERA_PROGRESS", "1")
    with progress.bar(10, "encode", "img") as b:
        assert not b.disable
        b.update(4)
        b.set_postfix(loss="0.500")
    out, err = capsys.readouterr()
    assert out == ""
    final = err.replace("\r", "\n").strip().splitlines()[-1]
    assert final.startswith("encode:  40%")
    # count, then [elapsed<ETA, rate unit/s, postfix]
    assert re.search(r"4/10 \[\d\d:\d\d<\d\d:\d\d, [\d.]+(img/s|s/img), loss=0\.500\]", final), final


def test_bar_without_total_shows_count_and_rate(monkeypatch, capsys):
    monkeypatch.setenv("TESSERA_PROGRESS", "1")
    with progress.bar(desc="crawl", unit="row") as b:
        b.update(3)
    final = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert re.fullmatch(r"crawl: 3row \[\d\d:\d\d, [\d.]+(row/s|s/row)\]", final.strip()), final


def test_extra_keywords_reach_tqdm(monkeypatch, capsys):
    """`initial` is how a resumed trainer (clip_train) starts its bar at the checkpoint's step."""
    monkeypatch.setenv("TESSERA_PROGRESS", "1")
    with progress.bar(10, "clip", "step", initial=5) as b:
        assert b.n == 5
        b.update(2)
        assert b.n == 7
    final = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "7/10" in final and final.startswith("clip:  70%")


def test_bar_reads_the_environment_at_creation(monkeypatch, capsys):
    monkeypatch.setenv("TESSERA_PROGRESS", "1")
    loud = progress.bar(2, "a")
    monkeypatch.setenv("TESSERA_PROGRESS", "0")
    quiet = progress.bar(2, "b")
    loud.update(2)
    quiet.update(2)
    loud.close()
    quiet.close()
    err = capsys.readouterr().err
    assert "a: 100%" in err and "b:" not in err
