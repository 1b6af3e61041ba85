import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
from dvae_shapes import write_shape_shards  # noqa: E402

from tessera.cli import main as cli_main  # noqa: E402
from tessera.core import config as C  # noqa: E402
from tessera.core.errors import InputError  # noqa: E402
from tessera.core.files import save_checkpoint  # noqa: E402
from tessera.dataprep.encode import encode_shards, parse_part  # noqa: E402
from tessera.dataprep.shards import decode_image, iter_samples  # noqa: E402
from tessera.trainer.config import DVAEModelConfig  # noqa: E402
from tessera.trainer.dvae import DVAE  # noqa: E402

CFG = DVAEModelConfig(image_size=16, n_hid=8, n_groups=3, n_blk_per_group=1, vocab_size=300, n_init=16)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tessera.dataprep.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("enc")
    write_shape_shards(d / "img", n_shards=3, per_shard=10, size=16, seed=4)
    caps = [s["txt"].decode() for p in sorted((d / "img").glob("*.tar")) for s in iter_samples(str(p))]
    tok = train_tokenizer(caps * 3, d / "tok" / "bpe.model", vocab_size=60)
    torch.manual_seed(0)
    model = DVAE(CFG)
    sd = model.state_dict()
    save_checkpoint(d / "dvae.pt", "dvae", {"step": 0, "model": sd, "ema": sd, "model_cfg": C.to_dict(CFG)})
    return d, tok, model.eval()


def _read(tar: Path) -> dict[str, bytes]:
    with tarfile.open(tar) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf}


def test_encode_writes_codes_ids_and_manifest(setup):
    d, tok, model = setup
    m = encode_shards(d / "dvae.pt", d / "tok" / "bpe.model", str(d / "img"), d / "one", batch_size=4)
    assert m["count"] == 30 and m["grid"] == 4 and m["image_vocab"] == 300 and m["text_vocab"] == tok.vocab_size
    assert m["shards"] == ["00000.tar", "00001.tar", "00002.tar"]
    assert json.loads((d / "one" / "manifest.json").read_text()) == m
    files = _read(d / "one" / "00001.tar")
    src = list(iter_samples(str(d / "img" / "00001.tar")))
    assert len(files) == 30
    for s in src[:5]:
        codes = np.load(io.BytesIO(files[f"{s['__key__']}.codes.npy"]))
        ids = np.load(io.BytesIO(files[f"{s['__key__']}.ids.npy"]))
        assert codes.dtype == np.uint16 and codes.shape == (4, 4)
        expect = model.get_codes(decode_image(s, 16)[None])[0].numpy()
        assert np.array_equal(codes, expect)
        cap = s["txt"].decode()
        assert ids.dtype == np.int32 and ids.tolist() == tok.encode(cap.lower()) and len(ids) > 0
        assert files[f"{s['__key__']}.txt"].decode() == cap
    assert not list((d / "one").glob(".*tmp*"))


def test_parts_never_collide_and_equal_one_run(setup):
    d, _, _ = setup
    one = encode_shards(d / "dvae.pt", d / "tok" / "bpe.model", str(d / "img"), d / "one2", batch_size=8)
    first = encode_shards(d / "dvae.pt", d / "tok" / "bpe.model", str(d / "img"), d / "parts", batch_size=3, part="1/2")
    assert [e["name"] for e in first["entries"]] == ["00001.tar"] and not (d / "parts" / "manifest.json").exists()
    code = cli_main(
        [
            "prep",
            "encode",
            "--dvae",
            str(d / "dvae.pt"),
            "--tokenizer",
            str(d / "tok" / "bpe.model"),
            "--input",
            str(d / "img"),
            "--output",
            str(d / "parts"),
            "--part",
            "0/2",
        ]
    )
    assert code == 0
    full = json.loads((d / "parts" / "manifest.json").read_text())
    assert full == one
    for name in one["shards"]:
        assert (d / "parts" / name).read_bytes() == (d / "one2" / name).read_bytes()  # byte-identical tars


def test_bad_inputs_give_one_line_errors(setup, tmp_path, capsys):
    d, _, _ = setup
    with pytest.raises(InputError, match="3/2"):
        parse_part("3/2")
    code = cli_main(
        [
            "prep",
            "encode",
            "--dvae",
            str(tmp_path / "none.pt"),
            "--tokenizer",
            str(d / "tok" / "bpe.model"),
            "--input",
            str(d / "img"),
            "--output",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "none.pt" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(InputError, match="nothing"):
        encode_shards(d / "dvae.pt", d / "tok" / "bpe.model", str(tmp_path / "nothing"), tmp_path / "o")


def test_encode_from_s3_equals_the_local_run(setup, tmp_path, s3_server, monkeypatch):
    """`prep encode --input s3://...` against moto's S3 server writes the same token tars as from the local copy."""
    import boto3

    d, _, _ = setup
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="encode-test")
    for p in sorted((d / "img").glob("*.tar")):
        s3.upload_file(str(p), "encode-test", f"img/{p.name}")
    local = encode_shards(d / "dvae.pt", d / "tok" / "bpe.model", str(d / "img"), tmp_path / "local", batch_size=4)
    remote = encode_shards(d / "dvae.pt", d / "tok" / "bpe.model", "s3://encode-test/img/{00000..00002}.tar", tmp_path / "s3", batch_size=7)
    assert remote["count"] == local["count"] == 30 and remote["shards"] == local["shards"]
    for name in local["shards"]:
        assert (tmp_path / "s3" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
