"""The shard writer: keys, tar members in key order, parquet of every row, dedup index, stats last."""

from __future__ import annotations

import json
import tarfile

import pyarrow.parquet as pq

from tessera.dataprep.storage import LocalStorage
from tessera.dataprep.writer import make_key, read_dedup, write_shard


def test_keys():
    assert make_key(3, 7, 1000) == "000030007"
    assert make_key(3, 7, 100000) == "0000300007"


def test_write_shard(tmp_path):
    st = LocalStorage(tmp_path)
    samples = [
        {
            "key": make_key(1, i, 10),
            "image": b"img%d" % i,
            "caption": f"c{i}",
            "json": {"sha256": f"{i:064x}", "key": make_key(1, i, 10)},
            "phash": i or None,
        }
        for i in (0, 2)
    ]
    rows = [
        {
            "key": make_key(1, i, 10),
            "url": f"u{i}",
            "caption": f"c{i}",
            "status": "success" if i != 1 else "failed_to_download",
            "reason": None if i != 1 else "http_error",
            "error_message": None if i != 1 else "HTTP 404",
            "extra": {"src": i},
        }
        for i in range(3)
    ]
    stats = write_shard(st, 1, samples, rows, ["src"], "jpg", 0.0)
    assert stats["count"] == 3 and stats["successes"] == 2 and stats["reason_counts"] == {"http_error": 1}
    with tarfile.open(tmp_path / "00001.tar") as tar:
        names = tar.getnames()
        assert names == ["000010000.jpg", "000010000.txt", "000010000.json", "000010002.jpg", "000010002.txt", "000010002.json"]
        assert tar.extractfile("000010002.jpg").read() == b"img2"
    t = pq.read_table(tmp_path / "00001.parquet").to_pylist()
    assert [(r["key"], r["status"], r["src"]) for r in t] == [
        ("000010000", "success", 0),
        ("000010001", "failed_to_download", 1),
        ("000010002", "success", 2),
    ]
    keys, shas, ph = read_dedup((tmp_path / "00001_dedup.npz").read_bytes())
    assert keys == ["000010000", "000010002"] and ph == [None, 2] and shas[1] == f"{2:064x}"
    assert json.loads((tmp_path / "00001_stats.json").read_text())["status_counts"] == {"failed_to_download": 1, "success": 2}
    # byte-identical when written again (constant mtime): re-runs reproduce shards exactly
    a = (tmp_path / "00001.tar").read_bytes()
    write_shard(st, 1, samples, rows, ["src"], "jpg", 0.0)
    assert (tmp_path / "00001.tar").read_bytes() == a
