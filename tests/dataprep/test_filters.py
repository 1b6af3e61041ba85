"""Caption filters, the dedup index, and the pluggable similarity scorer (through a real crawl)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tessera.core.errors import ConfigError
from tessera.dataprep.config import CrawlConfig, FilterConfig
from tessera.dataprep.crawl import crawl
from tessera.dataprep.filters import DedupIndex, check_caption, decode_caption, load_scorer


def test_captions():
    assert decode_caption(b"caf\xc3\xa9") == ("café", True)
    assert decode_caption(b"caf\xe9")[1] is False
    kw = dict(min_chars=3, max_chars=10)
    assert check_caption("  ", True, **kw)[0] == "caption_empty"
    assert check_caption("ab", True, **kw)[0] == "caption_too_short"
    assert check_caption("x" * 11, True, **kw)[0] == "caption_too_long"
    assert check_caption("caf?", False, **kw)[0] == "caption_not_utf8"
    assert check_caption("caf?", False, reject_non_utf8=False, **kw) is None
    assert check_caption("a fine one", True, **kw) is None


def test_dedup_index():
    idx = DedupIndex(exact=True, near=True, near_bits=3)
    idx.add("k1", "aa", 0b1111)
    assert idx.find("aa", None) == ("duplicate", "k1")
    assert idx.find("bb", 0b1110) == ("near_duplicate", "k1")
    assert idx.find("bb", 0b1110000) is None
    idx.add_many(["k2"], ["cc"], [None])
    assert idx.find("cc", 12345) == ("duplicate", "k2")


SCORER = '''
import numpy as np
class RedScorer:
    """Similarity = redness of the image when the caption says 'red', else its blueness."""
    def score(self, images, captions):
        out = []
        for im, cap in zip(images, captions):
            a = np.asarray(im, dtype=float).mean(axis=(0, 1)) / 255
            out.append(float(a[0] - a[2]) if "red" in cap else float(a[2] - a[0]))
        return out
def make():
    return RedScorer()
'''


def test_similarity_filter_through_a_pluggable_scorer(tmp_path, fault_server):
    import io

    from PIL import Image

    path = tmp_path / "scorer.py"
    path.write_text(SCORER)
    scorer = load_scorer(f"{path}:make")
    red = Image.new("RGB", (8, 8), (250, 0, 0))
    assert scorer.score([red, red], ["a red square", "a blue square"])[0] > 0.28 > scorer.score([red], ["a blue square"])[0]
    with pytest.raises(ConfigError):
        load_scorer(f"{tmp_path / 'missing.py'}:make")
    s = fault_server
    urls = [s.url(f"/img/{i}.jpg") for i in range(8)]
    caps = ["red thing" if i % 2 else "blue thing" for i in range(8)]
    inp = tmp_path / "l.parquet"
    pq.write_table(pa.table({"url": urls, "caption": caps}), inp)
    cfg = CrawlConfig(
        processes=1,
        threads=4,
        shard_size=8,
        image_size=16,
        filters=FilterConfig(similarity_threshold=-2.0, similarity_model=f"{path}:make"),
    )
    assert crawl(inp, tmp_path / "all", cfg, progress=False)["successes"] == 8
    expected = sum(scorer.score([Image.open(io.BytesIO(s.image(i))).convert("RGB")], [caps[i]])[0] >= 0.0 for i in range(8))
    cfg.filters.similarity_threshold = 0.0001
    st = crawl(inp, tmp_path / "some", cfg, progress=False)
    assert 0 < st["successes"] < 8 and abs(st["successes"] - expected) <= 1
    assert st["reason_counts"]["low_similarity"] == 8 - st["successes"]
    # in spawned worker processes (the scorer's loader travels to them by name) the same rows pass
    cfg.processes, cfg.shard_size = 2, 4
    st2 = crawl(inp, tmp_path / "some2", cfg, progress=False)
    assert (st2["successes"], st2["reason_counts"]["low_similarity"]) == (st["successes"], 8 - st["successes"])
    with pytest.raises(ConfigError, match="similarity_model"):
        crawl(inp, tmp_path / "x", CrawlConfig(filters=FilterConfig(similarity_threshold=0.28)), progress=False)
