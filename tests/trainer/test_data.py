"""tessera.trainer.data: the global order (the same global batches at any world size and worker count), each rank's
slice of it, deterministic shuffling, exact resume (also at another world size), ordered evaluation batches.
Listing and reading shards (local and s3://) are tested with tessera.dataprep.shards in tests/dataprep/test_shards.py."""

import pytest
import torch
from dvae_shapes import write_shape_shards

from tessera.core.errors import ConfigError
from tessera.dataprep.shards import decode_image, iter_all_samples, list_shards
from tessera.trainer.data import (
    DecodedImages,
    ImageStream,
    RecordCache,
    global_batches,
    global_stream,
    iter_image_batches,
    rank_slice,
    resume_state,
    split_shards,
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    write_shape_shards(d, n_shards=5, per_shard=12, size=16, seed=3)
    return d


def test_split_shards_is_a_partition():
    shards = [f"s{i}" for i in range(11)]
    parts = [split_shards(shards, r, 2, w, 3) for r in range(2) for w in range(3)]
    flat = [s for p in parts for s in p]
    assert sorted(flat) == sorted(shards) and len(flat) == len(set(flat))
    assert split_shards(shards, 1, 2, 2, 3) == ["s5"]
    with pytest.raises(ValueError):
        split_shards(shards, 2, 2)


def _keys(shards, batch_size, world, nworkers, n_batches, start=(0, 0)):
    """Global batches (lists of keys) as the ranks and workers of one layout see them, put back together."""
    out = []
    for b in range(n_batches):
        w = b % nworkers  # DataLoader's round-robin: global batch b comes from worker b % nworkers
        rows, pos = [], None
        for r in range(world):
            stream = global_stream(shards, seed=1, shuffle_buffer=7, start=start)
            it = global_batches(stream, batch_size=batch_size, rank=r, world=world, worker=w, nworkers=nworkers)
            for _ in range(b // nworkers + 1):
                recs, p = next(it)
            assert len(recs) == batch_size // world and (pos is None or p == pos)  # every rank: the same position after it
            rows += [rec["__key__"] for rec, _ in recs]
            pos = p
        out.append((rows, pos))
    return out


@pytest.mark.parametrize("world,nworkers", [(2, 1), (4, 1), (2, 3), (4, 2)])
def test_global_batches_are_the_same_at_any_world_size_and_worker_count(shards, world, nworkers):
    s = list_shards(str(shards))
    ref = _keys(s, 8, 1, 1, 9)  # 72 samples: crosses into the second epoch (60 per epoch)
    assert _keys(s, 8, world, nworkers, 9) == ref
    flat = [k for rows, _ in ref for k in rows]
    assert len(set(flat[:60])) == 60 and flat[:60] != sorted(flat[:60])  # an epoch is a shuffled permutation
    assert [pos for _, pos in ref][6:8] == [(0, 56), (1, 4)]  # the position after each global batch


def test_shuffle_is_deterministic_and_differs_between_epochs(shards):
    s = list_shards(str(shards))

    def keys(seed, n=120):
        it = global_stream(s, seed=seed, shuffle_buffer=10)
        return [next(it)[0]["__key__"] for _ in range(n)]

    a, b = keys(5), keys(5)
    assert a == b
    assert a[:60] != a[60:] and sorted(a[:60]) == sorted(a[60:])  # each epoch is a full pass, in a new order
    assert keys(6)[:60] != a[:60]
    assert a[:60] != sorted(a[:60])


def test_rank_slice_and_its_refusal():
    assert [rank_slice(12, r, 3) for r in range(3)] == [(0, 4), (4, 8), (8, 12)]
    with pytest.raises(ConfigError, match="global batch 10: expected a multiple of the world size 4"):
        rank_slice(10, 1, 4)


@pytest.mark.parametrize("workers", [0, 2])
def test_image_stream_resumes_exactly(shards, workers):
    kw = dict(image_size=16, batch_size=10, seed=2, rank=1, world=2, workers=workers, shuffle_buffer=6)
    a = ImageStream(str(shards), **kw)
    for _ in range(4):
        next(a)
    state = a.state()
    assert state == {"order": "global", "position": [0, 40], "batches": 4}
    expected = [next(a) for _ in range(6)]  # crosses an epoch boundary (60 samples per epoch)
    b = ImageStream(str(shards), **kw, state=state)
    got = [next(b) for _ in range(6)]
    for x, y in zip(expected, got):
        assert x.shape == (5, 3, 16, 16) and torch.equal(x, y)
    # workers or not, the same batches
    c = ImageStream(str(shards), **{**kw, "workers": 2 - workers}, state=state)
    assert all(torch.equal(x, next(c)) for x in expected)


def test_image_stream_is_the_global_batch_split_by_rank_and_resumes_at_another_world_size(shards):
    kw = dict(image_size=16, batch_size=12, seed=4, shuffle_buffer=6)
    one = ImageStream(str(shards), **kw)
    ref = [next(one) for _ in range(3)]
    two = [ImageStream(str(shards), **kw, rank=r, world=2) for r in range(2)]
    for x in ref:
        assert torch.equal(x, torch.cat([next(s) for s in two]))
    states = [s.state() for s in two]
    assert states[0] == states[1] == one.state()
    later = [next(one) for _ in range(2)]
    four = [ImageStream(str(shards), **kw, rank=r, world=4, workers=1, state=resume_state(states)) for r in range(4)]
    for x in later:  # saved at 2 ranks, resumed at 4 (with a data-loader worker): the same global batches
        assert torch.equal(x, torch.cat([next(s) for s in four]))


def test_older_per_rank_states_resume_at_the_next_epoch(shards):
    old = [{"positions": [[2, 7], [3, 1]], "next_worker": 1}, {"positions": [[2, 30], [2, 9]], "next_worker": 0}]
    state = resume_state(old)
    assert state == {"order": "global", "position": [4, 0], "batches": 0}
    assert resume_state([{"position": [1, 5], "batches": 9}, {"position": [0, 50], "batches": 9}])["position"] == [2, 0]
    assert resume_state(None) is None and resume_state([]) is None
    kw = dict(image_size=16, batch_size=6, seed=0, shuffle_buffer=1)
    s = ImageStream(str(shards), **kw, state=state)
    next(s)
    assert s.state()["position"] == [4, 6]


def test_eval_batches_are_ordered_and_limited(shards):
    batches = list(iter_image_batches(str(shards), 16, 8, limit=20))
    assert [b[0].shape[0] for b in batches] == [8, 8, 4]
    assert batches[0][1][0]["__key__"] == "000000000"[:9] and 0.0 <= float(batches[0][0].min()) <= float(batches[0][0].max()) <= 1.0


def test_the_record_cache_serves_the_same_stream_and_keeps_only_what_fits(shards):
    s = list_shards(str(shards))

    def stream(cache_bytes, n=150):  # 2.5 epochs of 60 records
        it = global_stream(s, seed=3, shuffle_buffer=7, cache_bytes=cache_bytes)
        return [next(it) for _ in range(n)]

    ref = stream(0)
    for got in (stream(1 << 30), stream(3000)):
        assert [p for _, p in got] == [p for _, p in ref]
        assert [r["__key__"] for r, _ in got] == [r["__key__"] for r, _ in ref]
        assert all({k: v for k, v in a.items() if k != "__kept__"} == b for (a, _), (b, _) in zip(got, ref))  # every member's bytes
    size = sum(len(v) for r, _ in ref[:60] for k, v in r.items() if not k.startswith("__")) // 5  # ~ one shard
    cache = RecordCache(int(2.5 * size))
    for url in s:
        assert len(list(cache.samples(url))) == 12
    assert len(cache.shards) == 2 and cache.used <= cache.limit  # the first two shards fit, the others stream
    # a kept shard's records are marked; a streamed shard's only until its records overflow the limit
    assert all(r.get("__kept__") for r in cache.samples(s[1])) and not all(r.get("__kept__") for r in cache.samples(s[4]))
    first = next(cache.samples(s[0]))
    first["jpg"] = b"changed"  # a reader's copy: the kept record is untouched
    assert next(cache.samples(s[0]))["jpg"] != b"changed"


def test_decoded_images_are_those_of_decode_image_and_the_memo_is_bounded(shards):
    streamed = list(iter_all_samples(list_shards(str(shards)), limit=10))
    memo = DecodedImages(16)
    assert all(torch.equal(memo(r), decode_image(r, 16)) for r in streamed) and not memo.memo  # not kept: no memo
    recs = [{**r, "__kept__": True} for r in streamed]  # as the RecordCache marks the records of a shard it keeps
    memo = DecodedImages(16, limit=3 * (16 * 16 * 3 + max(len(r["jpg"]) for r in recs)))
    for _ in range(2):
        for r in recs:
            x = memo(r)
            assert x.dtype == torch.float32 and torch.equal(x, decode_image(r, 16))
            x.fill_(0.5)  # a reader's tensor is its own
    assert len(memo.memo) == 3 and memo.used <= memo.limit
    assert torch.equal(memo(recs[0]), decode_image(recs[0], 16))
