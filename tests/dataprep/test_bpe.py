"""Tessera's deterministic BPE trainer (tessera.dataprep.bpe), whose models youtokentome's encoder loads."""

import json
import random

import pytest
import youtokentome as yttm

from tessera.core.errors import InputError
from tessera.dataprep import synthetic as S
from tessera.dataprep.bpe import WORD_START, train_bpe, write_model
from tessera.dataprep.tokenizer import load_tokenizer, train_tokenizer

CAPTIONS = [S.caption(a) for a in S.all_combinations()]
SPECIALS = (0, 1, 2, 3)  # pad, unk, bos, eos


def test_merges_worked_by_hand(tmp_path):
    """Words ab x3, abc, bc. Ids: specials 0-3, the word start 4, then b (5 uses), a (4), c (2).
    Pairs: (4,6) 4, (6,5) 4, (5,7) 2, (4,5) 1: a tie at 4, won by the smaller of the smaller ids (4 < 5), and so on
    down to single counts, won by the pair whose larger id is smallest."""
    char2id, merges = train_bpe(["ab ab ab abc", "bc"], vocab_size=100)
    assert char2id == {WORD_START: 4, "b": 5, "a": 6, "c": 7}
    assert merges == [(4, 6, 8), (8, 5, 9), (4, 5, 10), (9, 7, 11), (10, 7, 12)]  # then no pair is left: 13 tokens
    model = tmp_path / "m.yttm"
    write_model(model, char2id, merges, SPECIALS)
    bpe = yttm.BPE(model=str(model))
    assert bpe.vocab_size() == 13
    assert bpe.encode(["abc bc ab"], output_type=yttm.OutputType.ID) == [[11, 12, 9]]
    assert bpe.encode(["ba"], output_type=yttm.OutputType.ID) == [[10, 6]]  # "▁b" then "a": only learnt merges apply
    assert bpe.decode([[11, 12, 9]])[0] == "abc bc ab"
    # a smaller vocabulary stops early, after the first merges
    assert train_bpe(["ab ab ab abc", "bc"], vocab_size=10)[1] == merges[:2]


def test_runs_of_one_character_count_pairs_without_overlap():
    # "aaaa" holds 2 pairs (a, a) and "aaa" 1; with 3 words of each, (a, a) counts 9 against (▁, a)'s 6
    char2id, merges = train_bpe(["aaaa aaaa aaaa aaa aaa aaa"], vocab_size=7)
    a = char2id["a"]
    assert merges == [(a, a, 6)]
    char2id, merges = train_bpe(["aaaa aaaa aaaa aaa aaa aaa"], vocab_size=100)
    # aaaa -> AA, aaa -> A a: then (A, A) 3, (▁, A) 6, (A, a) 3
    assert merges[1] == (4, 6, 7)


def test_same_captions_same_model_in_any_order(tmp_path):
    """The property youtokentome's C++ trainer lacks: the file depends on the captions, not on the run or their order."""
    files = []
    for i in range(3):
        caps = list(CAPTIONS)
        random.Random(i).shuffle(caps)
        out = tmp_path / f"t{i}" / "bpe.model"
        train_tokenizer(caps, out, kind="youtokentome", vocab_size=256)
        files.append(out.read_bytes())
    assert files[0] == files[1] == files[2]
    meta = json.loads((tmp_path / "t0" / "bpe.model.json").read_text())
    tok = load_tokenizer(tmp_path / "t0" / "bpe.model")
    # every pair gets merged before 256 tokens: each word ends as one token (the demo's case too)
    assert meta["trainer"] == "tessera" and meta["vocab_size"] == tok.vocab_size < 256
    # a real vocabulary: the caption words became single tokens, and every caption decodes back
    ids = [tok.encode(c) for c in CAPTIONS]
    assert all(tok.decode(i) == c for i, c in zip(ids, CAPTIONS))
    assert all(len(i) == len(c.split()) for i, c in zip(ids, CAPTIONS))


def test_encoder_applies_the_merges_in_order(tmp_path):
    """youtokentome's encoder reads the file as written: encoding a word equals applying the merges one by one."""
    caps = [c for c in CAPTIONS for _ in range(3)] + ["zebra zebras zigzag", "quick quiz"]
    char2id, merges = train_bpe(caps, vocab_size=120)
    model = tmp_path / "m.yttm"
    write_model(model, char2id, merges, SPECIALS)
    bpe = yttm.BPE(model=str(model))
    words = sorted({w for c in caps for w in c.split()})
    got = bpe.encode(words, output_type=yttm.OutputType.ID)
    for w, ids in zip(words, got):
        seq = [char2id[WORD_START]] + [char2id[ch] for ch in w]
        for x, y, z in merges:
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == x and seq[i + 1] == y:
                    out.append(z)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seq = out
        assert ids == seq, w


def test_coverage_drops_rare_characters_to_unk(tmp_path):
    caps = ["red circle"] * 200 + ["red circlz"]  # z once in 2,211 characters (newlines and spaces counted)
    char2id, merges = train_bpe(caps, vocab_size=40, coverage=0.999)
    assert "z" not in char2id and set("redcil") <= set(char2id)
    model = tmp_path / "m.yttm"
    write_model(model, char2id, merges, SPECIALS)
    bpe = yttm.BPE(model=str(model))
    assert bpe.encode(["z"], output_type=yttm.OutputType.ID) == [[char2id[WORD_START], 1]]  # unk
    assert "z" in train_bpe(caps, vocab_size=40)[0]


def test_bad_arguments_are_named():
    with pytest.raises(InputError, match="vocab_size 5 is too small"):
        train_bpe(["abc"], vocab_size=5)
    with pytest.raises(InputError, match="special ids"):
        train_bpe(["abc"], vocab_size=50, special_ids=(0, 1, 2, 5))
    with pytest.raises(InputError, match="coverage"):
        train_bpe(["abc"], vocab_size=50, coverage=0.0)


def test_the_cpp_trainer_stays_available(tmp_path):
    out = tmp_path / "bpe.model"
    tok = train_tokenizer(CAPTIONS, out, kind="youtokentome", vocab_size=256, deterministic=False, threads=1)
    assert json.loads((tmp_path / "bpe.model.json").read_text())["trainer"] == "youtokentome"
    assert tok.decode(tok.encode(CAPTIONS[5])) == CAPTIONS[5]
