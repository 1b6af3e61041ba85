"""Sampling: greedy == argmax of the full pass, guidance arithmetic, temperature, prompts files."""

import pytest
import pytest as _pytest
import torch

from tessera.core.errors import InputError
from tessera.trainer.config import SampleConfig, TransformerModelConfig
from tessera.trainer.sample import _guided, filter_logits, next_token, read_prompts, sample_codes, sample_codes_batched
from tessera.trainer.transformer import DALLE, empty_text


@_pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP barrier stalls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def model(seed=0, **kw):
    base = dict(text_len=5, text_vocab=30, image_grid=4, image_vocab=17, d_model=32, n_layers=4, n_heads=4, conv_kernel=3)
    base.update(kw)
    torch.manual_seed(seed)
    return DALLE(TransformerModelConfig(**base)).eval()


def test_greedy_sampling_is_argmax_of_full_pass():
    m = model()
    text = torch.randint(0, 30, (2, 5), generator=torch.Generator().manual_seed(1))
    codes = sample_codes(m, text, SampleConfig(top_k=1))
    with torch.no_grad():
        _, logits = m(text, codes)
    assert torch.equal(codes, logits.argmax(-1))


def test_guidance_scale_one_equals_conditional_and_formula():
    cond = torch.tensor([[2.0, 0.0, -1.0]])
    uncond = torch.tensor([[0.0, 1.0, 0.0]])
    both = torch.cat([cond, uncond])
    assert torch.allclose(_guided(both, 1, 1.0), cond)
    assert torch.allclose(_guided(both, 1, 3.0), uncond + 3 * (cond - uncond))
    m = model()
    text = torch.randint(0, 30, (2, 5), generator=torch.Generator().manual_seed(2))
    greedy_guided = sample_codes(m, text, SampleConfig(top_k=1, guidance_scale=4.0))
    # greedy with guidance: each token is the argmax of the guided logits of a full pass
    with torch.no_grad():
        _, lc = m(text, greedy_guided)
        _, lu = m(empty_text(2, 5, 30), greedy_guided)
    assert torch.equal(greedy_guided, (lu + 4.0 * (lc - lu)).argmax(-1))


def test_low_temperature_concentrates_samples():
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5]]).repeat(400, 1)
    g = torch.Generator().manual_seed(0)
    hot = next_token(logits, SampleConfig(temperature=2.0), g)
    cold = next_token(logits, SampleConfig(temperature=0.1), g)
    assert (cold == 0).float().mean() > 0.95
    assert (hot == 0).float().mean() < 0.6


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_top_k_draws_follow_the_truncated_distribution(top_p):
    """Drawing among the k largest logits gives the distribution of masking the rest (then top-p within them)."""
    torch.manual_seed(0)
    row = torch.randn(40) * 1.5
    logits = row.repeat(20000, 1)
    cfg = SampleConfig(temperature=0.8, top_k=6, top_p=top_p)
    ids = next_token(logits, cfg, torch.Generator().manual_seed(1))
    want = filter_logits(row[None] / 0.8, 6, top_p).softmax(-1)[0]
    got = torch.bincount(ids, minlength=40).double() / len(ids)
    assert set(ids.unique().tolist()) == set(torch.nonzero(want > 0).flatten().tolist())
    assert (got - want.double()).abs().max() < 0.015  # 20,000 draws: standard error <= 0.0036


def test_batched_sampling_matches_shape_and_range():
    m = model()
    text = torch.randint(0, 30, (5, 5), generator=torch.Generator().manual_seed(3))
    codes = sample_codes_batched(m, text, SampleConfig(batch_size=2, top_p=0.9), torch.Generator().manual_seed(0))
    assert codes.shape == (5, 16) and int(codes.max()) < 17


def test_read_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# comment\n first \n\nsecond\n")
    assert read_prompts(f) == ["first", "second"]
    (tmp_path / "empty.txt").write_text("# only a comment\n")
    with pytest.raises(InputError, match="holds no prompts"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(InputError, match="does not exist"):
        read_prompts(tmp_path / "nope.txt")


def test_sample_config_validation():
    from tessera.core.errors import ConfigError

    with pytest.raises(ConfigError, match="temperature"):
        SampleConfig(temperature=0.0).validate()
    with pytest.raises(ConfigError, match="top_p"):
        SampleConfig(top_p=0.0).validate()
