"""tessera.dataprep.shards: the one shard lister and reader, for local folders, tars, globs, brace patterns and
s3:// (moto's real S3-protocol server on 127.0.0.1), and the stages it serves: the dVAE stream, the CLIP
(`train clip --data s3://...`), evaluation. Damaged shards (truncated, hostile member names) give one line
naming the shard. The tokenizer's and the encode job's S3 tests are in test_tokenizer.py and test_encode.py."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import tarfile
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch

from tessera.cli import main
from tessera.core.errors import InputError
from tessera.core.files import load_checkpoint
from tessera.dataprep import synthetic as S
from tessera.dataprep.shards import iter_all_samples, iter_members, iter_samples, list_shards, read_pairs
from tessera.dataprep.tokenizer import read_captions, train_tokenizer
from tessera.trainer.clip_train import train_clip
from tessera.trainer.config import ClipConfig
from tessera.trainer.data import ImageStream, iter_image_batches
from tessera.trainer.evaluate import load_images

BUCKET = "tessera-shards"
PER_SHARD = 6


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _tar_bytes(entries: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _entries(shard: int, size: int = 24) -> list[tuple[str, bytes]]:
    combos = S.all_combinations()
    rng = np.random.default_rng(shard)
    out = []
    for i in range(PER_SHARD):
        a = combos[(shard * PER_SHARD + i) * 7 % len(combos)]
        key = f"{shard:03d}{i:03d}"
        cap = S.caption(a)
        out += [
            (f"{key}.png", _png(S.render(a, size, rng))),
            (f"{key}.txt", cap.encode()),
            (f"{key}.json", json.dumps({"caption": cap}).encode()),
        ]
    return out


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Path:
    """data-000.tar .. data-003.tar, a parquet file beside them and a tar one folder deeper (neither is a shard of the folder)."""
    d = tmp_path_factory.mktemp("shards")
    for s in range(4):
        (d / f"data-{s:03d}.tar").write_bytes(_tar_bytes(_entries(s)))
    (d / "notes.parquet").write_bytes(b"not a shard")
    (d / "deeper").mkdir()
    (d / "deeper" / "data-009.tar").write_bytes(_tar_bytes(_entries(9)))
    return d


@pytest.fixture()
def s3(s3_server, local, monkeypatch) -> str:
    """The same files under s3://tessera-shards/train/; the shard reader finds the server through AWS_ENDPOINT_URL."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    client = boto3.client("s3", endpoint_url=s3_server)
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
        for p in sorted(local.rglob("*")):
            if p.is_file():
                client.upload_file(str(p), BUCKET, f"train/{p.relative_to(local).as_posix()}")
    return f"s3://{BUCKET}/train"


def _names(paths: list[str]) -> list[str]:
    return [p.rsplit("/", 1)[-1] for p in paths]


def _strip(samples):
    return [{k: v for k, v in s.items() if k != "__shard__"} for s in samples]


# ---------------------------------------------------------------- listing


def test_list_shards_local_forms(local):
    four = [f"data-{i:03d}.tar" for i in range(4)]
    assert list_shards(str(local)) == [str(local / n) for n in four]  # sorted; not the parquet, not deeper/
    assert list_shards(local) == list_shards(f"{local}/")
    assert list_shards(local / "data-002.tar") == [str(local / "data-002.tar")]
    assert _names(list_shards(f"{local}/data-00[12].tar")) == four[1:3]
    assert _names(list_shards(f"{local}/*/*.tar")) == ["data-009.tar"]
    assert _names(list_shards(f"{local}/data-{{001..003}}.tar")) == four[1:]
    assert _names(list_shards(f"{local}/data-003.tar,{local}/data-000.tar,{local}/data-{{000,003}}.tar")) == [four[0], four[3]]
    assert list_shards([str(local / "deeper"), str(local / "data-001.tar")]) == sorted(
        [str(local / "deeper" / "data-009.tar"), str(local / "data-001.tar")]
    )


def test_list_shards_errors_name_the_spec(local, tmp_path):
    cases = [
        (str(tmp_path / "nope.tar"), f"shards '{tmp_path / 'nope.tar'}' matches no file"),
        (f"{local}/data-{{002..005}}.tar", f"shards '{local}/data-{{002..005}}.tar': '{local}/data-004.tar' matches no file"),
        (f"{local}/*.tgz", f"shards '{local}/*.tgz': no *.tar files found"),
        ("", "shards: no shard spec given"),
        (" , ", "shards: no shard spec given"),
        ([], "shards: no shard spec given"),
        (f"{local}/data-{{001..002.tar", f"shards '{local}/data-{{001..002.tar': unbalanced braces"),
    ]
    (tmp_path / "empty").mkdir()
    cases.append((str(tmp_path / "empty"), f"shards '{tmp_path / 'empty'}': no *.tar files found"))
    for spec, message in cases:
        with pytest.raises(InputError) as e:
            list_shards(spec)
        assert str(e.value).startswith(message) and "\n" not in str(e.value), spec


def test_list_shards_s3_forms(s3, local):
    four = [f"{s3}/data-{i:03d}.tar" for i in range(4)]
    assert list_shards(s3) == four == list_shards(s3 + "/")  # the prefix's tars: not the parquet, not deeper/
    assert list_shards(f"{s3}/data-002.tar") == [four[2]]
    assert list_shards(f"{s3}/data-00[12].tar") == four[1:3]
    assert list_shards(f"{s3}/*.tar") == four  # a glob's * stays inside one part of the key, as on a file system
    assert list_shards(f"{s3}/*/*.tar") == [f"{s3}/deeper/data-009.tar"]
    assert list_shards(f"{s3}/data-{{001..003}}.tar") == four[1:]
    assert list_shards(f"{s3}/deeper,{local}/data-000.tar") == sorted([str(local / "data-000.tar"), f"{s3}/deeper/data-009.tar"])
    assert len(list_shards(f"s3://{BUCKET}/train/deeper/")) == 1


def test_list_shards_s3_errors_name_the_spec(s3):
    cases = [
        (f"s3://{BUCKET}/nothing", f"shards 's3://{BUCKET}/nothing' matches no file"),
        (f"{s3}/data-{{003..004}}.tar", f"shards '{s3}/data-{{003..004}}.tar': '{s3}/data-004.tar' matches no file"),
        (f"{s3}/*.tgz", f"shards '{s3}/*.tgz': no *.tar files found"),
        (f"s3://{BUCKET}", f"shards 's3://{BUCKET}': no *.tar files found"),  # only "folders" at the bucket's root
        ("s3://no-such-bucket-x/train", "shards 's3://no-such-bucket-x/train': cannot list the S3 prefix (NoSuchBucket: "),
        ("s3:///train", "shards 's3:///train' names no bucket"),
    ]
    for spec, message in cases:
        with pytest.raises(InputError) as e:
            list_shards(spec)
        assert str(e.value).startswith(message) and "\n" not in str(e.value), spec
    with pytest.raises(InputError, match=f"shard '{s3}/gone.tar': cannot read \\(NoSuchKey"):
        list(iter_samples(f"{s3}/gone.tar"))


# ---------------------------------------------------------------- reading


def test_stream_reader_equals_tarfile_and_unpacks_compressed_tars(local, tmp_path):
    path = local / "data-001.tar"
    with tarfile.open(path) as tf:  # random access, as a reference
        expect = [(m.name, tf.extractfile(m).read()) for m in tf]
    assert list(iter_members(str(path))) == expect and len(expect) == 3 * PER_SHARD
    raw = path.read_bytes()
    for suffix, pack in ((".tar.gz", gzip.compress), (".tar.bz2", bz2.compress), (".tar.xz", lzma.compress)):
        (tmp_path / f"c{suffix}").write_bytes(pack(raw))
        assert list(iter_members(str(tmp_path / f"c{suffix}"))) == expect, suffix
    samples = list(iter_samples(str(path)))
    assert [s["__key__"] for s in samples] == [f"001{i:03d}" for i in range(PER_SHARD)]
    assert all(sorted(s) == ["__key__", "__shard__", "json", "png", "txt"] for s in samples)
    assert [s["txt"] for s in samples] == [d for n, d in expect if n.endswith(".txt")]
    first8 = [f"000{i:03d}" for i in range(PER_SHARD)] + ["001000", "001001"]
    assert [s["__key__"] for s in iter_all_samples(list_shards(local), limit=8)] == first8


def test_s3_reads_equal_local_reads(s3, local):
    for url, path in zip(list_shards(s3), list_shards(local)):
        assert _strip(iter_samples(url)) == _strip(iter_samples(path))
    imgs, caps = read_pairs(s3, 16)
    limgs, lcaps = read_pairs(local, 16)
    assert imgs.shape == (4 * PER_SHARD, 3, 16, 16) and torch.equal(imgs, limgs) and caps == lcaps
    assert read_pairs(f"{s3}/data-{{001..002}}.tar", 16, limit=7)[1] == lcaps[PER_SHARD : PER_SHARD + 7]
    assert list(read_captions(s3)) == [c.decode() for c in (s["txt"] for s in iter_all_samples(list_shards(local)))]
    s_imgs, s_caps = load_images(s3)  # evaluation: shards at their own size
    l_imgs, l_caps = load_images(str(local), 20, limit=5)
    assert s_imgs.shape == (4 * PER_SHARD, 3, 24, 24) and s_caps == lcaps
    assert torch.equal(load_images(s3, 20, limit=5)[0], l_imgs) and l_caps == lcaps[:5]
    kw = dict(image_size=16, batch_size=5, seed=3, shuffle_buffer=4)
    a, b = ImageStream(s3, **kw), ImageStream(str(local), **kw)  # the dVAE's stream: the same batches
    for _ in range(6):  # more than one epoch (24 samples)
        assert torch.equal(next(a), next(b))
    a, b = ImageStream(s3, **kw, workers=2), ImageStream(str(local), **kw, workers=2)  # forked data-loader workers
    for _ in range(3):
        assert torch.equal(next(a), next(b))
    s_batches = [x for x, _ in iter_image_batches(s3, 16, 10)]
    assert [len(x) for x in s_batches] == [10, 10, 4]
    assert torch.equal(torch.cat(s_batches), torch.cat([x for x, _ in iter_image_batches(str(local), 16, 10)]))


def _damaged(kind: str) -> bytes:
    """A shard of 3 samples (9 members of 1024 bytes: a header and one data block each, then the end blocks), damaged."""
    png = _png(S.render(S.all_combinations()[0], 8))
    assert len(png) <= 512
    data = _tar_bytes([(f"k{i}.{ext}", png if ext == "png" else bytes([65 + i]) * 100) for i in range(3) for ext in ("png", "txt", "json")])
    return {
        "inside-data": data[: 4 * 1024 + 512 + 50],
        "inside-header": data[: 7 * 1024 + 200],
        "at-a-member-boundary": data[: 6 * 1024],
        "trailing-garbage": data + b"garbage" * 10,
    }[kind]


@pytest.mark.parametrize("kind", ["inside-data", "inside-header", "at-a-member-boundary", "trailing-garbage"])
def test_damaged_shards_name_the_shard(kind, tmp_path, s3):
    path = tmp_path / "bad.tar"
    path.write_bytes(_damaged(kind))
    boto3.client("s3").put_object(Bucket=BUCKET, Key=f"damaged/{kind}.tar", Body=path.read_bytes())
    for url in (str(path), f"s3://{BUCKET}/damaged/{kind}.tar"):
        for read in (lambda u: list(iter_samples(u)), lambda u: read_pairs(u, 8), lambda u: list(read_captions(u))):
            with pytest.raises(InputError) as e:
                read(url)
            msg = str(e.value)
            assert msg.startswith(f"shard '{url}' is ") and "\n" not in msg, msg
            assert ("not a readable tar file (ReadError)" in msg) if kind == "inside-data" else ("is truncated" in msg), msg


@pytest.mark.parametrize("name", ["../evil.txt", "/etc/evil.txt", "k/../../evil.txt", "..\\evil.txt"])
def test_hostile_member_names_are_refused(name, tmp_path):
    path = tmp_path / "hostile.tar"
    path.write_bytes(_tar_bytes([("k0.png", _png(S.render(S.all_combinations()[0], 8))), ("k0.txt", b"fine"), (name, b"escape")]))
    for read in (lambda u: list(iter_samples(u)), lambda u: read_pairs(u, 8), lambda u: list(read_captions(u))):
        with pytest.raises(InputError) as e:
            read(str(path))
        assert str(e.value) == f"shard '{path}': member '{name}' has an unsafe path (absolute or with '..')"
    # folders and ./ are fine: the key is the file name
    path.write_bytes(_tar_bytes([("./a/k0.txt", b"one"), ("a/b/k1.txt", b"two")]))
    assert [(s["__key__"], s["txt"]) for s in iter_samples(str(path))] == [("k0", b"one"), ("k1", b"two")]


# ---------------------------------------------------------------- the CLIP from S3

TINY_CLIP = dict(
    d_model=32,
    n_layers=1,
    n_heads=2,
    image_width=8,
    image_size=16,
    embed_dim=16,
    text_len=16,
    batch_size=8,
    steps=3,
    warmup_steps=1,
    log_every=1,
    eval_every=0,
    ckpt_every=0,
    eval_samples=8,
)


@pytest.fixture()
def clip_tokenizer(s3, tmp_path) -> Path:
    tok = tmp_path / "bpe.model"
    train_tokenizer(read_captions(s3), tok, "youtokentome", 120)
    return tok


def test_train_clip_from_s3_reads_the_local_pairs(s3, local, tmp_path, clip_tokenizer):
    """The library call on S3 and on the local copy: the same pairs, so the same run."""
    cfg = ClipConfig(**TINY_CLIP)
    m_s3 = train_clip(cfg, s3, clip_tokenizer, tmp_path / "s3", eval_data=f"{s3}/data-003.tar")
    m_local = train_clip(cfg, str(local), clip_tokenizer, tmp_path / "local", eval_data=str(local / "data-003.tar"))
    assert m_s3["step"] == m_local["step"] == 3 and m_s3["n_images"] == PER_SHARD and np.isfinite(m_s3["loss"])
    assert m_s3["loss"] == m_local["loss"] and m_s3["i2t_top1"] == m_local["i2t_top1"]
    ck = load_checkpoint(tmp_path / "s3", "clip")
    assert ck["step"] == 3 and (tmp_path / "s3" / "checkpoints" / "step_00000003.pt").is_file()
    assert ck["metrics"]["loss"] == m_s3["loss"]


def test_cli_train_clip_data_s3(s3, tmp_path, clip_tokenizer):
    """`tessera train clip --data s3://... --tokenizer ...` with a tiny config given as overrides."""
    run = tmp_path / "cli"
    over = [f"clip.{k}={v}" for k, v in TINY_CLIP.items()]
    args = ["train", "clip", "--data", s3, "--tokenizer", str(clip_tokenizer), "--output", str(run), "--eval-data", f"{s3}/data-003.tar"]
    assert main(args + over) == 0
    ck = load_checkpoint(run, "clip")
    assert ck["step"] == 3 and ck["metrics"]["n_images"] == PER_SHARD and (run / "checkpoints" / "step_00000003.pt").is_file()
    lib = train_clip(ClipConfig(**TINY_CLIP), s3, clip_tokenizer, tmp_path / "lib", eval_data=f"{s3}/data-003.tar")
    assert ck["metrics"]["loss"] == pytest.approx(lib["loss"])
