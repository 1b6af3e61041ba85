"""tessera.trainer.token_data: token-shard manifests, records, and the resumable (text, image) batch stream.

Most tests use shards whose samples are identifiable: sample j's image codes spell j in base 16, so
a batch row tells which sample it came from (rank splits, shuffling, resume). The BPE-dropout test
uses token_fixtures.make_token_shards, which carries a real tokenizer.
"""

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from token_fixtures import make_token_shards, one_thread  # noqa: E402,F401

from tessera.core.errors import InputError  # noqa: E402
from tessera.trainer.token_data import TokenBatches, decode_record, iter_token_records, load_npy, load_token_set, read_manifest  # noqa: E402

GRID = 2  # 4 codes per image: up to 16**4 distinct samples
TEXT_VOCAB = 50
TEXT_LEN = 6


def sample_ids(j: int) -> list[int]:
    """Caption ids of sample j: 0..9 ids (some longer than TEXT_LEN), with an out-of-range id now and then."""
    ids = [(j * 7 + k) % TEXT_VOCAB for k in range(j % 10)]
    if j % 11 == 3:
        ids.insert(1, TEXT_VOCAB + 5)  # >= text_vocab: dropped by the reader
    if j % 13 == 4:
        ids.insert(0, -1)  # negative: dropped too
    return ids


def expected_text(j: int) -> list[int]:
    kept = [i for i in sample_ids(j) if 0 <= i < TEXT_VOCAB][:TEXT_LEN]
    return kept + [TEXT_VOCAB + p for p in range(len(kept), TEXT_LEN)]


def codes_of(j: int) -> np.ndarray:
    return np.array([(j >> (4 * k)) & 15 for k in range(GRID * GRID)], dtype=np.uint16).reshape(GRID, GRID)


def index_of(image_row: torch.Tensor) -> int:
    return sum(int(c) << (4 * k) for k, c in enumerate(image_row.tolist()))


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def _npy(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    np.save(b, a)
    return b.getvalue()


def write_shards(folder: Path, n: int, per_shard: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(0, n, per_shard):
        name = f"{s // per_shard:05d}.tar"
        shards.append(name)
        with tarfile.open(folder / name, "w") as tf:
            for j in range(s, min(s + per_shard, n)):
                key = f"{j:09d}"
                _add(tf, f"{key}.codes.npy", _npy(codes_of(j)))
                _add(tf, f"{key}.ids.npy", _npy(np.array(sample_ids(j), dtype=np.int32)))
                _add(tf, f"{key}.txt", f"sample {j}".encode())
    manifest = {
        "grid": GRID,
        "image_vocab": 16,
        "text_vocab": TEXT_VOCAB,
        "tokenizer": "bpe.model",
        "dvae": None,
        "count": n,
        "shards": shards,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("ids") / "tok", n=96, per_shard=24)  # 4 shards


def batches(spec, **kw):
    args = dict(text_len=TEXT_LEN, text_vocab=TEXT_VOCAB, grid=GRID, batch_size=12, shuffle_buffer=16)
    args.update(kw)
    return TokenBatches(str(spec), **args)


def take(tb, k):
    return [next(tb) for _ in range(k)]


def indices(batch) -> list[int]:
    return [index_of(row) for row in batch[1]]


# ---------------------------------------------------------------- manifest


def test_read_manifest(shards):
    m = read_manifest(shards)
    assert (m.grid, m.image_vocab, m.text_vocab, m.count) == (GRID, 16, TEXT_VOCAB, 96)
    assert m.shards == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"] and m.dvae is None
    assert m.folder == shards
    # a tar (or a comma list of tars) finds the manifest of its folder
    assert read_manifest(shards / "00002.tar").count == 96
    assert read_manifest(f"{shards / '00001.tar'},{shards / '00002.tar'}").folder == shards
    # paths named in the manifest resolve against its folder; absolute ones stay
    assert m.resolve(m.tokenizer) == str((shards / "bpe.model").absolute())
    assert m.resolve("/abs/dvae.pt") == "/abs/dvae.pt" and m.resolve(None) is None and m.resolve("") is None


def test_bad_manifests(tmp_path):
    folder = tmp_path / "t"
    folder.mkdir()
    with pytest.raises(InputError, match=f"no manifest.json in '{folder}'"):
        read_manifest(folder)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match=r"token manifest '.*manifest.json' is unreadable \(JSONDecodeError\)"):
        read_manifest(folder)
    (folder / "manifest.json").write_text(json.dumps({"grid": 4, "image_vocab": "16"}))
    with pytest.raises(InputError, match="missing or non-integer keys image_vocab, text_vocab$"):
        read_manifest(folder)
    with pytest.raises(InputError, match="reading the manifest from S3 is not supported"):
        read_manifest("s3://bucket/tokens")


# ---------------------------------------------------------------- batches


def test_batch_shapes_dtypes_and_padding(shards):
    text, image = next(batches(shards, batch_size=32))
    assert text.shape == (32, TEXT_LEN) and image.shape == (32, GRID * GRID)
    assert text.dtype == torch.long and image.dtype == torch.long
    for t, j in zip(text.tolist(), indices((text, image))):
        assert t == expected_text(j), j  # ids (out-of-range ones dropped), cut to text_len, then pad tokens V + position
    assert (image >= 0).all() and (image < 16).all()


def test_every_row_matches_its_sample_and_truncation_happens(shards):
    tb = batches(shards, batch_size=96, shuffle_buffer=1)
    text, image = next(tb)
    js = indices((text, image))
    assert sorted(js) == list(range(96))
    lengths = {j: len([i for i in sample_ids(j) if 0 <= i < TEXT_VOCAB]) for j in js}
    assert any(n > TEXT_LEN for n in lengths.values()) and any(n == 0 for n in lengths.values())
    empty = [row for row, j in zip(text.tolist(), js) if lengths[j] == 0]
    assert all(row == list(range(TEXT_VOCAB, TEXT_VOCAB + TEXT_LEN)) for row in empty)


def test_shuffling_is_deterministic_for_a_seed(shards):
    a = [indices(b) for b in take(batches(shards, seed=3), 10)]
    b = [indices(b) for b in take(batches(shards, seed=3), 10)]
    c = [indices(b) for b in take(batches(shards, seed=4), 10)]
    assert a == b
    assert a != c
    flat = [j for batch in a for j in batch]
    assert flat[:96] != sorted(flat[:96])  # shuffled
    assert sorted(flat[:96]) == list(range(96))  # an epoch is a permutation: each sample once


def test_epochs_cover_everything_in_a_new_order(shards):
    tb = batches(shards, batch_size=96)
    e0, e1 = indices(next(tb)), indices(next(tb))
    assert sorted(e0) == sorted(e1) == list(range(96))
    assert e0 != e1
    assert tb.state() == {"order": "global", "position": [1, 96], "batches": 2}


@pytest.mark.parametrize("world, n, per_shard", [(2, 96, 24), (4, 96, 24), (3, 48, 24)])
def test_ranks_split_the_global_batch(tmp_path, world, n, per_shard):
    """Each rank's rows are its contiguous slice of the one-rank global batch, whatever the number of shards."""
    spec = write_shards(tmp_path / "s", n=n, per_shard=per_shard)
    kw = dict(batch_size=12 * world, seed=1, caption_dropout=0.4)
    one = take(batches(spec, **kw), 4)
    ranks = [take(batches(spec, **kw, rank=r, world=world), 4) for r in range(world)]
    for b, (text, image) in enumerate(one):
        assert torch.equal(text, torch.cat([ranks[r][b][0] for r in range(world)]))  # caption dropout too: keyed by the sample
        assert torch.equal(image, torch.cat([ranks[r][b][1] for r in range(world)]))
        assert all(ranks[r][b][1].shape[0] == 12 for r in range(world))
    flat = [j for batch in one for j in indices(batch)]
    assert sorted(flat[:n]) == list(range(n))  # an epoch covers every sample once


def test_refuses_a_global_batch_the_ranks_cannot_split(shards):
    from tessera.core.errors import ConfigError

    with pytest.raises(ConfigError, match="global batch 10: expected a multiple of the world size 4"):
        batches(shards, batch_size=10, rank=0, world=4)


def test_resume_continues_the_same_sequence(shards):
    kw = dict(seed=5, rank=1, world=2, batch_size=20, caption_dropout=0.3)
    straight = take(batches(shards, **kw), 9)  # 180 samples of a 96-sample epoch: crosses into epoch 2
    for cut in (0, 3, 5):
        tb = batches(shards, **kw)
        take(tb, cut)
        state = json.loads(json.dumps(tb.state()))  # the state travels through a checkpoint
        resumed = take(batches(shards, **kw, state=state), 9 - cut)
        for (t0, i0), (t1, i1) in zip(straight[cut:], resumed):
            assert torch.equal(t0, t1) and torch.equal(i0, i1), cut
        # resumed at one rank: the global batches go on where the two ranks stopped
        whole = take(batches(shards, **{**kw, "rank": 0, "world": 1}, state=state), 9 - cut)
        for (t0, i0), (t1, i1) in zip(straight[cut:], whole):
            assert torch.equal(t0, t1[10:]) and torch.equal(i0, i1[10:]), cut
    # the caption dropout really happened, so the resumed randomness is checked too
    empty = torch.tensor(expected_text(0))  # sample 0 has no ids: all padding
    n_empty = sum(int((t == empty).all(dim=1).sum()) for t, _ in straight)
    assert n_empty > 10


def test_state_after_epoch_boundary(shards):
    tb = batches(shards, batch_size=60, world=2, rank=0)
    take(tb, 2)  # 120 samples of a 96-sample epoch
    assert tb.state() == {"order": "global", "position": [1, 24], "batches": 2}


def test_bpe_dropout_reencodes_the_caption(tmp_path):
    from tessera.dataprep.tokenizer import load_tokenizer

    folder = make_token_shards(tmp_path / "bpe", n=64, per_shard=32, dvae=False)
    m = read_manifest(folder)
    tok = load_tokenizer(m.tokenizer)
    stored = load_token_set(str(folder), 32, m.text_vocab, m.grid)  # room for a caption split into characters
    by_codes = {}
    for t, im, cap in zip(*stored):
        by_codes.setdefault(tuple(im.tolist()), set()).add(cap)
    kw = dict(text_len=32, text_vocab=m.text_vocab, grid=m.grid, batch_size=64, seed=2)
    plain = next(TokenBatches(str(folder), **kw, tokenizer=tok, bpe_dropout=0.0))
    drop = next(TokenBatches(str(folder), **kw, tokenizer=tok, bpe_dropout=0.5))
    assert torch.equal(plain[1], drop[1])  # same samples, same order
    stored_rows = {tuple(t.tolist()) for t in stored[0]}
    assert all(tuple(t.tolist()) in stored_rows for t in plain[0])  # without dropout: the stored ids
    changed = 0
    for t_plain, t_drop, im in zip(plain[0], drop[0], drop[1]):
        ids = [i for i in t_drop.tolist() if i < m.text_vocab]
        assert tok.decode(ids).strip() in by_codes[tuple(im.tolist())]  # a different segmentation of the same caption
        changed += not torch.equal(t_plain, t_drop)
    assert changed >= 16


# ---------------------------------------------------------------- records and the ordered pass


def test_load_token_set_is_ordered_and_limited(shards):
    text, image, caps = load_token_set(str(shards), TEXT_LEN, TEXT_VOCAB, GRID)
    assert [index_of(r) for r in image] == list(range(96))
    assert caps == [f"sample {j}" for j in range(96)]
    assert text.tolist() == [expected_text(j) for j in range(96)]
    text, image, caps = load_token_set(str(shards), TEXT_LEN, TEXT_VOCAB, GRID, limit=30)
    assert len(caps) == 30 and text.shape == (30, TEXT_LEN) and image.shape == (30, GRID * GRID)
    recs = list(iter_token_records(str(shards / "00001.tar"), GRID))
    assert [r[2] for r in recs] == [f"sample {j}" for j in range(24, 48)]
    ids, codes, _ = recs[0]
    assert ids.dtype == np.int64 and codes.dtype == np.int64 and codes.shape == (GRID * GRID,)


def test_empty_shard_has_no_samples(tmp_path):
    folder = tmp_path / "e"
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w"):
        pass
    with pytest.raises(InputError, match="no samples"):
        load_token_set(str(folder), TEXT_LEN, TEXT_VOCAB, GRID)


def _record(**parts):
    rec = {"__key__": "000000007", "__shard__": "/data/00000.tar"}
    rec.update(parts)
    return rec


def test_decode_record_errors_name_the_shard_and_sample():
    good = dict(codes=_npy(codes_of(7)), ids=_npy(np.array([1, 2], dtype=np.int32)))
    ids, codes, cap = decode_record(_record(**{"codes.npy": good["codes"], "ids.npy": good["ids"]}), GRID)
    assert ids.tolist() == [1, 2] and index_of(torch.from_numpy(codes)) == 7 and cap == ""  # no txt: empty caption
    where = "shard '/data/00000.tar': sample '000000007'"
    with pytest.raises(InputError) as e:
        decode_record(_record(**{"codes.npy": good["codes"]}), GRID)
    assert str(e.value) == f"{where} lacks ids.npy"
    with pytest.raises(InputError) as e:
        decode_record(_record(**{"codes.npy": b"garbage", "ids.npy": good["ids"]}), GRID)
    assert str(e.value).startswith(f"{where} has an unreadable .npy (")
    with pytest.raises(InputError) as e:
        decode_record(_record(**{"codes.npy": good["codes"], "ids.npy": good["ids"]}), 4)
    assert str(e.value) == f"{where}: codes have shape (2, 2), the manifest says grid 4"
    _, _, cap = decode_record(_record(**{"codes.npy": good["codes"], "ids.npy": good["ids"], "txt": b"caf\xe9"}), GRID)
    assert cap == "caf\ufffd"  # undecodable bytes are replaced, not fatal


def test_wrong_grid_stops_the_batches_with_the_sample_named(shards):
    with pytest.raises(InputError, match=r"shard '.*\.tar': sample '\d{9}': codes have shape \(2, 2\), the manifest says grid 3"):
        next(batches(shards, grid=3))


def test_load_npy_equals_np_load_and_refuses_a_body_its_header_does_not_describe():
    arrays = [codes_of(5), codes_of(9), np.array([3, 1, 4], dtype=np.int32), np.array([2, 7], dtype=np.int32), np.zeros(0, np.int32)]
    for _ in range(2):  # the second pass reads every header from the memo
        for a in arrays:
            got = load_npy(_npy(a))
            assert got.dtype == a.dtype and got.shape == a.shape and np.array_equal(got, a)
    raw = _npy(np.array([3, 1, 4], dtype=np.int32))
    with pytest.raises(ValueError):  # a known header, one element short
        load_npy(raw[:-4])
    rec = _record(**{"codes.npy": _npy(codes_of(7))[:-2], "ids.npy": raw})
    with pytest.raises(InputError, match=r"sample '000000007' has an unreadable \.npy \(ValueError\)"):
        decode_record(rec, GRID)
    with pytest.raises(ValueError):  # a pickled object array is refused, as np.load(allow_pickle=False) refuses it
        load_npy(_npy(np.array([{"a": 1}], dtype=object)))
