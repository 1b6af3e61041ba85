"""URL-list reading: every format, gzip, folders, column selection, bad lists."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tessera.core.errors import InputError
from tessera.dataprep.readers import read_url_list

ROWS = [("http://h/1.jpg", "one", "a"), ("http://h/2.jpg", "two, with comma", "b"), ("http://h/3.jpg", "three", "c")]


def _write(path, fmt, gz=False, url_col="url"):
    if fmt == "parquet":
        pq.write_table(pa.table({url_col: [r[0] for r in ROWS], "caption": [r[1] for r in ROWS], "src": [r[2] for r in ROWS]}), path)
        if gz:
            data = path.read_bytes()
            path.write_bytes(gzip.compress(data))
        return path
    if fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        text = f"{url_col}{sep}caption{sep}src\n" + "".join(f'{u}{sep}"{c}"{sep}{s}\n' for u, c, s in ROWS)
    else:
        text = "".join(json.dumps({url_col: u, "caption": c, "src": s}) + "\n" for u, c, s in ROWS)
    data = text.encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl"])
@pytest.mark.parametrize("gz", [False, True])
def test_formats(tmp_path, fmt, gz):
    p = _write(tmp_path / (f"list.{fmt}" + (".gz" if gz else "")), fmt, gz, url_col="link")
    ul = read_url_list(p, url_col="link", keep_cols=["src"])
    assert ul.num_rows == 3
    rows = ul.rows(0, 3)
    assert [(r[0], r[1], r[2].decode(), r[3]["src"]) for r in rows] == [(i, u, c, s) for i, (u, c, s) in enumerate(ROWS)]


def test_folder_in_name_order(tmp_path):
    d = tmp_path / "lists"
    d.mkdir()
    _write(d / "b.csv", "csv")
    _write(d / "a.jsonl.gz", "jsonl", gz=True)
    (d / "notes.txt").write_text("ignored")
    ul = read_url_list(d)
    assert ul.num_rows == 6 and [r[0] for r in ul.rows(2, 5)] == [2, 3, 4]
    assert [f.name for f in ul.files] == ["a.jsonl.gz", "b.csv"]


def test_non_utf8_caption_costs_one_row_not_the_file(tmp_path):
    p = tmp_path / "l.csv"
    p.write_bytes(b"url,caption\nhttp://h/1.jpg,caf\xe9\nhttp://h/2.jpg,fine\n")
    rows = read_url_list(p).rows(0, 2)
    assert rows[0][2] == b"caf\xe9" and rows[1][2] == b"fine"
    j = tmp_path / "l.jsonl"
    j.write_bytes(b'{"url": "http://h/1.jpg", "caption": "caf\xe9"}\n{"url": "http://h/2.jpg", "caption": null}\n')
    rows = read_url_list(j).rows(0, 2)
    assert rows[0][2] == b"caf\xe9" and rows[1][2] is None


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_text("link,caption\nhttp://h/a.jpg,x\n"), "no column 'url'"),
        (lambda p: p.write_text("url,caption\n,x\n ,y\n"), "no usable rows"),
        (lambda p: p.write_text(""), "is empty"),
    ],
)
def test_bad_lists(tmp_path, setup, message):
    p = tmp_path / "list.csv"
    setup(p)
    with pytest.raises(InputError, match=message) as e:
        read_url_list(p)
    assert "list.csv" in str(e.value) and "\n" not in str(e.value)


def test_bad_jsonl_line_and_unknown_format(tmp_path):
    p = tmp_path / "l.jsonl"
    p.write_text('{"url": "http://h/a.jpg", "caption": "x"}\n{not json\n')
    with pytest.raises(InputError, match="line 2"):
        read_url_list(p)
    q = tmp_path / "l.xlsx"
    q.write_text("x")
    with pytest.raises(InputError, match="unknown format"):
        read_url_list(q)
    with pytest.raises(InputError, match="no column 'nope'"):
        read_url_list(_write(tmp_path / "k.parquet", "parquet"), keep_cols=["nope"])
