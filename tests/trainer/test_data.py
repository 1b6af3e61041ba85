"""tessera.trainer.data: rank/worker splitting, deterministic shuffling, exact resume, ordered evaluation batches.
Listing and reading shards (local and s3://) are tested with tessera.dataprep.shards in tests/dataprep/test_shards.py."""

import pytest
import torch
from dvae_shapes import write_shape_shards

from tessera.dataprep.shards import list_shards
from tessera.trainer.data import ImageStream, consumer_stream, iter_image_batches, split_shards


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


@pytest.mark.parametrize("world,nworkers", [(2, 1), (2, 2), (4, 2)])  # (4, 2): fewer shards than consumers
def test_consumers_see_disjoint_samples_covering_the_epoch(shards, world, nworkers):
    all_shards = list_shards(str(shards))
    seen = []
    for r in range(world):
        for w in range(nworkers):
            keys = [
                rec["__key__"]
                for rec, _ in consumer_stream(
                    all_shards, seed=1, rank=r, world=world, worker=w, nworkers=nworkers, shuffle_buffer=7, loop=False
                )
            ]
            seen.extend(keys)
    assert len(seen) == 60 and len(set(seen)) == 60


def test_shuffle_is_deterministic_and_differs_between_epochs(shards):
    s = list_shards(str(shards))

    def keys(seed, n=120):
        it = consumer_stream(s, seed=seed, shuffle_buffer=10)
        return [next(it)[0]["__key__"] for _ in range(n)]

    a, b = keys(5), keys(5)
    assert a == b
    assert a[:60] != a[60:] and sorted(a[:60]) == sorted(a[60:])  # each epoch is a full pass, in a new order
    assert keys(6)[:60] != a[:60]
    assert a[:60] != sorted(a[:60])


@pytest.mark.parametrize("workers", [0, 2])
def test_image_stream_resumes_exactly(shards, workers):
    kw = dict(image_size=16, batch_size=5, seed=2, rank=1, world=2, workers=workers, shuffle_buffer=6)
    a = ImageStream(str(shards), **kw)
    for _ in range(7):
        next(a)
    state = a.state()
    expected = [next(a) for _ in range(6)]  # crosses an epoch boundary (30 samples per rank per epoch)
    b = ImageStream(str(shards), **kw, state=state)
    got = [next(b) for _ in range(6)]
    for x, y in zip(expected, got):
        assert x.shape == (5, 3, 16, 16) and torch.equal(x, y)


def test_eval_batches_are_ordered_and_limited(shards):
    batches = list(iter_image_batches(str(shards), 16, 8, limit=20))
    assert [b[0].shape[0] for b in batches] == [8, 8, 4]
    assert batches[0][1][0]["__key__"] == "000000000"[:9] and 0.0 <= float(batches[0][0].min()) <= float(batches[0][0].max()) <= 1.0
