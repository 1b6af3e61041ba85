import json
import socket
import urllib.request

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tessera.cli import main
from tessera.core.errors import InputError
from tessera.dataprep import synthetic as S
from tessera.dataprep.config import SyntheticConfig


def test_tables_and_split_are_deterministic_and_cover_every_value():
    combos = S.all_combinations()
    n = len(S.SHAPES) * len(S.COLORS) * len(S.SIZES) * len(S.POSITIONS) * len(S.BACKGROUNDS)
    assert len(combos) == len(set(combos)) == n
    train, held = S.split_combinations(0.1, seed=3)
    train2, held2 = S.split_combinations(0.1, seed=3)
    assert train == train2 and held == held2
    assert len(held) == round(0.1 * n) and len(train) + len(held) == n
    assert not set(train) & set(held)
    assert S.split_combinations(0.1, seed=4)[1] != held
    for key, table in [
        ("shape", S.SHAPES),
        ("color", S.COLORS),
        ("size", S.SIZES),
        ("position", S.POSITIONS),
        ("background", S.BACKGROUNDS),
    ]:
        assert {getattr(c, key) for c in train} == set(table)
    assert S.split_combinations(0.0)[1] == []


def test_caption_template():
    a = S.Attrs("circle", "red", "small", "top left", "gray")
    assert S.caption(a) == "a small red circle at the top left on a gray background"
    assert S.caption({**a.as_dict(), "position": "center"}) == "a small red circle in the center on a gray background"
    with pytest.raises(InputError, match="color='teal'"):
        S.caption({**a.as_dict(), "color": "teal"})


def test_render_places_the_shape_in_its_colour():
    rng = np.random.default_rng(0)
    img = S.render(S.Attrs("square", "blue", "large", "bottom right", "white"), 128, rng)
    arr = np.asarray(img).astype(int)
    assert img.size == (128, 128) and arr.shape == (128, 128, 3)
    # the shape's centre pixel has the shape colour, the opposite corner the background colour
    cx, cy = int(0.73 * 128), int(0.73 * 128)
    assert np.abs(arr[cy, cx] - S.COLORS["blue"]).max() <= S.COLOR_JITTER + 2
    assert np.abs(arr[5, 5] - S.BACKGROUNDS["white"]).max() <= S.COLOR_JITTER + 2
    # antialiasing: some edge pixels lie strictly between the two colours
    blue_dist = np.linalg.norm(arr - np.array(S.COLORS["blue"]), axis=-1)
    bg_dist = np.linalg.norm(arr - np.array(S.BACKGROUNDS["white"]), axis=-1)
    assert ((blue_dist > 40) & (bg_dist > 40)).sum() > 10
    # jitter: two renders of the same attributes differ
    other = np.asarray(S.render(S.Attrs("square", "blue", "large", "bottom right", "white"), 128, rng))
    assert (other != np.asarray(img)).any()


def test_generate_writes_images_and_two_url_lists(tmp_path):
    cfg = SyntheticConfig(num_train=60, num_eval=12, source_size=96, holdout_fraction=0.1)
    summary = S.generate(tmp_path, cfg, seed=1, processes=1)
    assert summary["num_train"] == 60 and summary["num_eval"] == 12
    train = pq.read_table(tmp_path / "train.parquet").to_pylist()
    ev = pq.read_table(tmp_path / "eval.parquet").to_pylist()
    assert len(train) == 60 and len(ev) == 12
    assert set(train[0]) == {"url", "caption", "shape", "color", "size", "position", "background"}
    _, held = S.split_combinations(0.1, seed=1)
    held_set = {c.as_dict()["shape"] + c.color + c.size + c.position + c.background for c in held}
    key = lambda r: r["shape"] + r["color"] + r["size"] + r["position"] + r["background"]
    assert all(key(r) in held_set for r in ev)
    assert not any(key(r) in held_set for r in train)
    for r in train[:5] + ev[:5]:
        im = Image.open(tmp_path / r["url"])
        assert im.format == "JPEG" and im.size == (96, 96)
        assert r["caption"] == S.caption(r)
    meta = json.loads((tmp_path / "synthetic.json").read_text())
    assert len(meta["heldout_combinations"]) == len(held)
    assert not list(tmp_path.rglob(".*tmp*"))  # no temporary files left behind


def test_serve_and_absolute_url_lists(tmp_path):
    S.generate(tmp_path, SyntheticConfig(num_train=5, num_eval=3, source_size=64), seed=0, processes=1)
    server, base = S.serve(tmp_path)
    try:
        assert base.startswith("http://127.0.0.1:")
        lists = S.write_url_lists(tmp_path, base)
        rows = pq.read_table(lists["train"]).to_pylist()
        assert len(rows) == 5 and rows[0]["url"].startswith(base)
        with urllib.request.urlopen(rows[0]["url"], timeout=5) as resp:
            data = resp.read()
        assert data == (tmp_path / pq.read_table(tmp_path / "train.parquet").to_pylist()[0]["url"]).read_bytes()
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(base + "images/nope.jpg", timeout=5)
    finally:
        server.stop()
    with pytest.raises(InputError, match="does not exist"):
        S.serve(tmp_path / "missing")


def test_cli_with_overrides(tmp_path, capsys):
    out = tmp_path / "syn"
    code = main(
        [
            "prep",
            "synthetic",
            "--output",
            str(out),
            "--base-url",
            "http://example.invalid/data",
            "synthetic.num_train=20",
            "synthetic.num_eval=4",
        ]
    )
    assert code == 0
    assert len(list((out / "images" / "train").glob("*.jpg"))) == 20
    assert len(list((out / "images" / "eval").glob("*.jpg"))) == 4
    rows = pq.read_table(out / "eval_urls.parquet").to_pylist()
    assert rows[0]["url"].startswith("http://example.invalid/data/images/eval/")
    assert main(["prep", "synthetic", "--output", str(out), "synthetic.holdout_fraction=1.5"]) == 2
    assert "holdout_fraction" in capsys.readouterr().err


def test_file_server_takes_a_crawlers_burst_of_connections_while_busy(tmp_path):
    """The crawler opens processes x threads connections at once; the listen backlog must hold them all, or the kernel
    drops SYNs and each dropped client waits a second to retry (the demo's eval crawl: 1.2 s instead of 0.13 s)."""
    server = S.FileServer(("127.0.0.1", 0), S._QuietHandler)  # not serving yet: every connection waits in the backlog
    socks = []
    try:
        for _ in range(40):
            s = socket.socket()
            s.settimeout(0.5)
            s.connect(server.server_address)  # the handshake completes only while the backlog has room
            socks.append(s)
        assert len(socks) == 40
    finally:
        for s in socks:
            s.close()
        server.server_close()
