"""Local and S3 storage: atomic writes, hostile names, listing, against moto's real S3 server."""

from __future__ import annotations

import pytest

from tessera.core.errors import InputError
from tessera.dataprep.storage import LocalStorage, S3Storage, check_name, open_storage


@pytest.mark.parametrize("name", ["../x.tar", "/etc/passwd", "a/b.tar", ".hidden", "x..tar", ""])
def test_hostile_names_refused(name):
    with pytest.raises(InputError):
        check_name(name)


def test_local_atomic_and_temporaries(tmp_path):
    st = LocalStorage(tmp_path / "out")
    st.prepare()
    st.write_bytes("00000.tar", b"abc")
    assert st.read_bytes("00000.tar") == b"abc" and st.list() == ["00000.tar"]
    (tmp_path / "out" / ".00001.tar.tmp123").write_bytes(b"half")
    (tmp_path / "out" / ".00009.tar.tmp123").write_bytes(b"someone else's")
    assert st.clean_temporaries({"00001.tar"}) == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".00009.tar.tmp123", "00000.tar"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        LocalStorage(tmp_path / "file")


def test_s3_roundtrip(s3_server):
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="storage-test")
    st = open_storage("s3://storage-test/a/b", s3_server)
    assert isinstance(st, S3Storage)
    st.prepare()
    st.write_bytes("00000.tar", b"x" * 10)
    st.write_bytes("00000_stats.json", b"{}")
    assert st.list() == ["00000.tar", "00000_stats.json"]
    assert st.exists("00000.tar") and not st.exists("00001.tar")
    assert st.read_bytes("00000.tar") == b"x" * 10
    st.delete("00000.tar")
    assert st.list() == ["00000_stats.json"]
    with pytest.raises(InputError, match="not reachable"):
        open_storage("s3://no-such-bucket-here/x", s3_server).prepare()
    with pytest.raises(InputError, match=r"'\.\.'"):
        open_storage("s3://storage-test/a/../b", s3_server)
