"""End-to-end crawler tests against real local servers: faults, layout, webdataset, parts, resume
after kill -9, S3 output, CLI errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tessera.core.errors import InputError
from tessera.dataprep import crawl_worker
from tessera.dataprep.config import CrawlConfig, FilterConfig
from tessera.dataprep.crawl import crawl

REPO = Path(__file__).resolve().parents[2]


def write_list(path: Path, urls: list[str], captions: list, **extra) -> Path:
    cols = {"url": urls, "caption": captions, **extra}
    pq.write_table(pa.table(cols), path)
    return path


def read_samples(out: Path) -> dict[str, tuple[bytes, str, dict]]:
    """key -> (image bytes, caption, json) over every tar of a local output."""
    samples = {}
    for t in sorted(out.glob("*.tar")):
        with tarfile.open(t) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in members:
            if name.endswith(".json"):
                key = name[:-5]
                j = json.loads(members[name])
                samples[key] = (members[f"{key}.jpg"], members[f"{key}.txt"].decode(), j)
    return samples


def all_rows(out: Path) -> list[dict]:
    rows = []
    for p in sorted(out.glob("*.parquet")):
        rows.extend(pq.read_table(p).to_pylist())
    return rows


def fast_cfg(**kw) -> CrawlConfig:
    base = dict(processes=1, threads=8, shard_size=10, timeout=1.0, retries=2, retry_backoff=0.05, max_bytes=1_000_000, image_size=32)
    base.update(kw)
    return CrawlConfig(**base)


FAULTS = {
    "/404": ("failed_to_download", "http_error"),
    "/flaky/101.jpg": ("success", None),
    "/slow": ("failed_to_download", "timeout"),
    "/truncated.jpg": ("failed_to_decode", "not_an_image"),
    "/html.jpg": ("failed_to_decode", "not_an_image"),
    "/bomb.png": ("failed_to_decode", "decompression_bomb"),
    "/loop/a": ("failed_to_download", "too_many_redirects"),
    "/alias/102.jpg": ("filtered", "duplicate"),
    "/big.jpg": ("failed_to_download", "too_large"),
    "/noai/103.jpg": ("failed_to_download", "robots_noai"),
    "/gone": ("failed_to_download", "connection_error"),
    "/redirect/104.jpg": ("success", None),
    "/img/10 7.jpg": ("failed_to_download", "http_error"),  # quoted to /img/10%207.jpg: no such route
}


def test_faults_each_row_one_status(tmp_path, fault_server):
    s = fault_server
    urls = (
        [s.url("/img/102.jpg")]
        + [s.url(p) for p in FAULTS]
        + ["ftp://127.0.0.1/x.jpg", "", s.url("/img/105.jpg"), s.url("/img/106.jpg"), "http://exa mple/x.jpg"]
    )
    caps = ["dup source"] + [f"fault {p}" for p in FAULTS] + ["ftp", "empty url", "", b"caf\xe9 latin-1", "bad host"]
    inp = tmp_path / "faults.csv"
    # A CSV written by hand so that one caption is really not UTF-8.
    with open(inp, "wb") as f:
        f.write(b"url,caption\n")
        for u, c in zip(urls, caps):
            c = c if isinstance(c, bytes) else c.encode()
            f.write(u.encode() + b',"' + c + b'"\n')
    t0 = time.time()
    stats = crawl(inp, tmp_path / "out", fast_cfg(processes=2, threads=4, shard_size=6), progress=False)
    assert time.time() - t0 < 30  # nothing hangs: the slow response costs one timeout
    rows = all_rows(tmp_path / "out")
    assert len(rows) == len(urls) == stats["rows"]
    by_url = {}
    for r in rows:
        assert r["status"] in ("success", "failed_to_download", "failed_to_decode", "filtered")
        assert (r["status"] == "success") == (r["error_message"] is None)
        by_url.setdefault(r["url"], []).append(r)
    for path, (status, reason) in FAULTS.items():
        (r,) = by_url[s.url(path)]
        assert (r["status"], r["reason"]) == (status, reason), (path, r)
    assert by_url["ftp://127.0.0.1/x.jpg"][0]["reason"] == "scheme_not_allowed"
    assert by_url[""][0]["reason"] == "invalid_url"
    assert by_url[s.url("/img/105.jpg")][0]["reason"] == "caption_empty"
    assert by_url[s.url("/img/106.jpg")][0]["reason"] == "caption_not_utf8"
    assert by_url["http://exa mple/x.jpg"][0]["reason"] == "invalid_url"
    assert s.hits["/flaky/101.jpg"] >= 2  # failed once with 500, then succeeded on retry
    assert s.hits.get("/img/105.jpg", 0) == 0  # rejected captions are not downloaded
    # the stats files agree with the parquet files
    counts = {}
    for p in (tmp_path / "out").glob("*_stats.json"):
        for k, v in json.loads(p.read_text())["status_counts"].items():
            counts[k] = counts.get(k, 0) + v
    assert counts == stats["status_counts"]
    assert counts["success"] == 3 == len(read_samples(tmp_path / "out"))


def test_one_shard_is_crawled_in_this_process_whatever_the_processes(tmp_path, fault_server):
    s = fault_server
    inp = tmp_path / "one.csv"
    inp.write_text("url,caption\n" + "".join(f"{s.url(f'/img/{i}.jpg')},shape {i}\n" for i in (111, 112, 113)))
    crawl_worker._W.clear()
    stats = crawl(inp, tmp_path / "out", fast_cfg(processes=4, threads=2), progress=False)
    # no worker process was spawned for the single shard: its worker state was set up here, with one process
    assert crawl_worker._W["cfg"].processes == 1 and crawl_worker._W["parent"] == os.getppid()
    assert stats["status_counts"] == {"success": 3} and len(read_samples(tmp_path / "out")) == 3
    crawl_worker._W.clear()


def test_layout_and_webdataset_reads_shards(tmp_path, fault_server):
    wds = pytest.importorskip("webdataset")
    s = fault_server
    n = 23
    inp = write_list(
        tmp_path / "l.parquet",
        [s.url(f"/img/{i}.jpg") for i in range(n)],
        [f"a photo number {i}" for i in range(n)],
        source=[f"src{i}" for i in range(n)],
        score=[i * 0.5 for i in range(n)],
    )
    cfg = fast_cfg(keep_cols=["source", "score"], resize="keep_ratio")
    stats = crawl(inp, tmp_path / "out", cfg, progress=False)
    assert stats["successes"] == n and stats["shards_written"] == 3
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    for k in range(3):
        st = json.loads((out / f"{k:05d}_stats.json").read_text())
        assert st["count"] == (10 if k < 2 else 3) and st["successes"] == st["count"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left
    ds = wds.WebDataset([str(p) for p in sorted(out.glob("*.tar"))], shardshuffle=False).decode("pil")
    seen = []
    for sample in ds:
        j = sample["json"]
        assert sample["txt"] == j["caption"]
        assert j["source"] == f"src{int(j['url'].rsplit('/', 1)[1][:-4])}"
        assert sample["jpg"].size == (j["width"], j["height"])
        assert min(sample["jpg"].size) == 32 and (j["original_width"], j["original_height"]) == (96, 72)
        assert len(j["sha256"]) == 64
        seen.append(sample["__key__"])
    assert seen == [f"{k // 10:05d}{k % 10:04d}" for k in range(n)]


def test_dedup_exact_and_near_across_shards(tmp_path, fault_server):
    s = fault_server
    urls = [s.url(f"/img/{i}.jpg") for i in range(10)] + [s.url("/alias/3.jpg"), s.url("/redirect/4.jpg"), s.url("/img/3.jpg")]
    inp = write_list(tmp_path / "l.parquet", urls, [f"c{i}" for i in range(len(urls))])
    stats = crawl(inp, tmp_path / "out", fast_cfg(shard_size=5), progress=False)
    assert stats["reason_counts"] == {"duplicate": 3}
    rows = {r["url"]: r for r in all_rows(tmp_path / "out") if r["status"] == "filtered"}
    assert rows[s.url("/alias/3.jpg")]["error_message"] == "duplicate of 000000003"
    # turning exact dedup off keeps them; near dedup with a generous radius still catches them
    st2 = crawl(inp, tmp_path / "o2", fast_cfg(shard_size=5, filters=FilterConfig(dedup_exact=False)), progress=False)
    assert st2["successes"] == 13
    st3 = crawl(
        inp,
        tmp_path / "o3",
        fast_cfg(shard_size=5, filters=FilterConfig(dedup_exact=False, dedup_near=True, near_dup_bits=2)),
        progress=False,
    )
    assert st3["reason_counts"].get("near_duplicate") == 3 and st3["successes"] == 10


def test_parts_equal_single_run(tmp_path, fault_server):
    s = fault_server
    urls = [s.url(f"/img/{200 + i}.jpg") for i in range(36)] + [
        s.url("/alias/201.jpg"),
        s.url("/alias/230.jpg"),
        s.url("/404"),
        s.url("/alias/235.jpg"),
    ]
    urls += [s.url("/alias/210.jpg")]
    inp = write_list(tmp_path / "l.parquet", urls, [f"caption {i}" for i in range(len(urls))])
    cfg = fast_cfg(shard_size=4)
    single = crawl(inp, tmp_path / "single", cfg, progress=False)
    seen_shards = []
    for i in range(4):
        st = crawl(inp, tmp_path / "parts", cfg, part=f"{i}/4", progress=False)
        seen_shards.append(st["shards"])
    assert sum(seen_shards) == single["shards"] == 11
    a, b = read_samples(tmp_path / "single"), read_samples(tmp_path / "parts")
    assert a == b and len(a) == 36
    key = lambda r: r["key"]  # noqa: E731
    ra = sorted(all_rows(tmp_path / "single"), key=key)
    rb = sorted(all_rows(tmp_path / "parts"), key=key)
    assert [(r["key"], r["status"], r["reason"]) for r in ra] == [(r["key"], r["status"], r["reason"]) for r in rb]
    assert sum(r["reason"] == "duplicate" for r in ra) == 4  # two of them across parts


def _run_cli(args: list[str], **kw) -> subprocess.Popen:
    env = dict(os.environ, TESSERA_PROGRESS="0", PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-m", "tessera.cli", "prep", "crawl", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )


def test_resume_after_kill_9_gives_the_same_samples(tmp_path, fault_server):
    s = fault_server
    n = 90
    urls = [s.url(f"/delay/{300 + i}.jpg") for i in range(n)]
    urls[40] = s.url("/alias/305.jpg")  # a duplicate whose twin lives in an earlier shard
    urls[77] = s.url("/404")
    inp = write_list(tmp_path / "l.parquet", urls, [f"item {i}" for i in range(n)])
    args = ["--input", str(inp), "--image-size", "32", "--shard-size", "6", "--processes", "2", "--threads", "3", "--timeout", "2"]
    ref = crawl(inp, tmp_path / "ref", fast_cfg(shard_size=6, threads=3, timeout=2.0), progress=False)
    out = tmp_path / "out"
    kills = 0
    for wait_for in (2, 7):  # kill -9 once a few shards are complete, twice
        p = _run_cli(args + ["--output", str(out)])
        deadline = time.time() + 60
        while time.time() < deadline and len(list(out.glob("*_stats.json"))) < wait_for and p.poll() is None:
            time.sleep(0.02)
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            kills += 1
        p.wait()
        p.stdout.close(), p.stderr.close()
    assert kills >= 1
    done_before = len(list(out.glob("*_stats.json")))
    assert done_before < 15
    p = _run_cli(args + ["--output", str(out)])
    o, e = p.communicate(timeout=120)
    assert p.returncode == 0, e.decode()
    assert "already complete" in o.decode()
    assert read_samples(out) == read_samples(tmp_path / "ref")
    assert len(read_samples(out)) == ref["successes"] == n - 2
    assert sorted((r["key"], r["status"], r["reason"]) for r in all_rows(out)) == sorted(
        (r["key"], r["status"], r["reason"]) for r in all_rows(tmp_path / "ref")
    )
    assert not [x for x in out.iterdir() if x.name.startswith(".")]


def test_s3_output_and_resume(tmp_path, fault_server, s3_server):
    import boto3

    s = fault_server
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket="tessera-test")
    inp = write_list(tmp_path / "l.parquet", [s.url(f"/img/{400 + i}.jpg") for i in range(12)], [f"s3 caption {i}" for i in range(12)])
    cfg = fast_cfg(shard_size=5, s3_endpoint_url=s3_server)
    st = crawl(inp, "s3://tessera-test/crawl/v1", cfg, progress=False)
    assert st["successes"] == 12 and st["shards_written"] == 3
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="tessera-test", Prefix="crawl/v1/")["Contents"])
    assert keys == sorted(
        ["crawl/v1/crawl.json"] + [f"crawl/v1/{k:05d}{suf}" for k in range(3) for suf in (".parquet", ".tar", "_dedup.npz", "_stats.json")]
    )
    body = client.get_object(Bucket="tessera-test", Key="crawl/v1/00002.tar")["Body"].read()
    local = tmp_path / "00002.tar"
    local.write_bytes(body)
    with tarfile.open(local) as tar:
        assert sorted(m.name for m in tar.getmembers()) == [f"00002{i:04d}.{e}" for i in range(2) for e in ("jpg", "json", "txt")]
    # A shard without its final marker is redone; complete ones are skipped.
    client.delete_object(Bucket="tessera-test", Key="crawl/v1/00001_stats.json")
    st2 = crawl(inp, "s3://tessera-test/crawl/v1", cfg, progress=False)
    assert (st2["shards_written"], st2["shards_skipped"], st2["successes"]) == (1, 2, 12)


def test_settings_mismatch_and_overwrite(tmp_path, fault_server):
    s = fault_server
    inp = write_list(tmp_path / "l.parquet", [s.url(f"/img/{i}.jpg") for i in range(4)], ["c"] * 4)
    crawl(inp, tmp_path / "out", fast_cfg(), progress=False)
    with pytest.raises(InputError, match="image_size"):
        crawl(inp, tmp_path / "out", fast_cfg(image_size=16), progress=False)
    st = crawl(inp, tmp_path / "out", fast_cfg(image_size=16), overwrite=True, progress=False)
    assert st["shards_written"] == 1
    assert all(j["width"] == 16 for _, _, j in read_samples(tmp_path / "out").values())


def test_cli_config_overrides_and_flags(tmp_path, fault_server):
    import argparse

    from tessera.cli.prep import add_crawl, config_from_args

    parser = argparse.ArgumentParser()
    add_crawl(parser)
    args = parser.parse_args(
        [
            "--input",
            "x",
            "--output",
            "y",
            "--config",
            "demo",
            "--threads",
            "5",
            "crawl.shard_size=7",
            "filters.min_image_size=20",
            "--dedup-near",
            "--keep-cols",
            "a, b",
        ]
    )
    cfg = config_from_args(args)
    assert (cfg.threads, cfg.shard_size, cfg.image_size, cfg.filters.min_image_size, cfg.filters.dedup_near, cfg.keep_cols) == (
        5,
        7,
        64,
        20,
        True,
        ["a", "b"],
    )
    args = parser.parse_args(["--input", "x", "--output", "y", "--config", "demo", "--threads", "5", "crawl.threads=9"])
    assert config_from_args(args).threads == 5  # explicit flags win over overrides


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("nocol", "no column 'url'"),
        ("empty", "no usable rows"),
        ("badpart", "--part"),
    ],
)
def test_cli_bad_input_one_line_exit_2(tmp_path, case, message):
    inp = tmp_path / "list.csv"
    if case == "nocol":
        inp.write_text("link,caption\nhttp://x/a.jpg,a\n")
    elif case in ("empty", "badpart"):
        inp.write_text("url,caption\n,a\n" if case == "empty" else "url,caption\nhttp://127.0.0.1:9/a.jpg,a\n")
    out = tmp_path / "out"
    extra = ["--part", "4/4"] if case == "badpart" else []
    r = subprocess.run(
        [sys.executable, "-m", "tessera.cli", "prep", "crawl", "--input", str(inp), "--output", str(out), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tessera: error:") and message in lines[0], r.stderr
    assert not out.exists()  # nothing half-written
