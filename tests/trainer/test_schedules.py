import math

import pytest

from tessera.trainer.schedules import Plateau, cosine, warmup_cosine


def test_cosine_endpoints_and_midpoint():
    assert cosine(0, 1.0, 1 / 16, 150_000) == 1.0
    assert cosine(150_000, 1.0, 1 / 16, 150_000) == 1 / 16
    assert cosine(10**7, 1.0, 1 / 16, 150_000) == 1 / 16
    assert cosine(75_000, 0.0, 6.6, 150_000) == pytest.approx(3.3)
    vals = [cosine(s, 0.0, 6.6, 5000) for s in range(0, 5001, 250)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))


def test_warmup_cosine():
    assert warmup_cosine(0, 4.5e-4, 0.0, 5000, 430_000) == pytest.approx(4.5e-4 / 5000)
    assert warmup_cosine(4999, 4.5e-4, 0.0, 5000, 430_000) == pytest.approx(4.5e-4)
    assert warmup_cosine(5000, 4.5e-4, 0.0, 5000, 430_000) == pytest.approx(4.5e-4)
    assert warmup_cosine(430_000, 4.5e-4, 0.0, 5000, 430_000) == 0.0


def test_plateau_halves_after_patience_and_roundtrips():
    p = Plateau(1.0, factor=0.5, patience=2)
    for loss in [3, 2, 2, 2, 2]:
        lr = p.step(loss)
    assert lr == 0.5
    q = Plateau(9.0)
    q.load_state_dict(p.state_dict())
    assert q.lr == 0.5 and q.best == 2 and not math.isinf(q.best)
