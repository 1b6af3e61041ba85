"""The DALL-E transformer: shapes, masks honoured, paper loss, KV cache == full pass (incl. transposed column layers)."""

import pytest
import pytest as _pytest
import torch
import torch.nn.functional as F

from tessera.kernels.layouts import token_mask
from tessera.trainer.config import SampleConfig, TransformerModelConfig
from tessera.trainer.sample import filter_logits, sample_codes
from tessera.trainer.transformer import DALLE, empty_text, pad_text


@_pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP barrier stalls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(**kw) -> TransformerModelConfig:
    base = dict(text_len=5, text_vocab=30, image_grid=4, image_vocab=17, d_model=32, n_layers=4, n_heads=4, conv_kernel=3)
    base.update(kw)
    return TransformerModelConfig(**base)


def batch(cfg, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, cfg.text_vocab + cfg.text_len, (b, cfg.text_len), generator=g)
    image = torch.randint(0, cfg.image_vocab, (b, cfg.image_grid**2), generator=g)
    return text, image


def test_layer_pattern_shapes_and_padding_tokens():
    cfg = tiny(n_layers=6)
    torch.manual_seed(0)
    m = DALLE(cfg)
    assert m.layer_kinds == ["row", "column", "row", "row", "row", "conv"]
    assert [b.attn.layout.transposed for b in m.blocks] == [False, True, False, False, False, False]
    text, image = batch(cfg)
    tl, il = m(text, image)
    assert tl.shape == (3, 4, 35) and il.shape == (3, 16, 17)
    assert pad_text([7, 8], 5, 30) == [7, 8, 32, 33, 34]  # distinct padding token per position
    assert pad_text(list(range(9)), 5, 30) == [0, 1, 2, 3, 4]
    assert empty_text(2, 5, 30).tolist() == [[30, 31, 32, 33, 34]] * 2
    assert m.text_emb.num_embeddings == 35


def test_dense_attention_is_causal_everywhere():
    m = DALLE(tiny(attention="dense"))
    assert set(m.layer_kinds) == {"causal"}


@pytest.mark.parametrize("attention", ["dalle", "dense"])
def test_outputs_depend_only_on_allowed_positions(attention):
    """Changing image token j must not change any logit predicted at positions <= j (causality)."""
    cfg = tiny(attention=attention)
    torch.manual_seed(1)
    m = DALLE(cfg).eval()
    text, image = batch(cfg, b=1)
    with torch.no_grad():
        _, il = m(text, image)
        image2 = image.clone()
        image2[0, 9] = (image2[0, 9] + 1) % cfg.image_vocab
        _, il2 = m(text, image2)
    # image logits at index i predict image token i from positions < T + i: tokens 0..9 unaffected
    assert torch.allclose(il[:, :10], il2[:, :10], atol=1e-6)
    assert not torch.allclose(il[:, 10:], il2[:, 10:], atol=1e-6)


def test_single_layer_respects_row_mask_receptive_field():
    """With one row layer (+conv last), image token (r, c)'s output ignores tokens outside its masks."""
    cfg = tiny(n_layers=1, conv_kernel=3)  # one layer: conv with 3x3 causal neighbourhood
    torch.manual_seed(2)
    m = DALLE(cfg).eval()
    text, image = batch(cfg, b=1)
    mask = token_mask("conv", 5, 4, conv_kernel=3)
    q = 5 + 10  # query position: image token 10 = (2, 2)
    with torch.no_grad():
        h = m.hidden(text, image)
        for key_img in range(10):
            im2 = image.clone()
            im2[0, key_img] = (im2[0, key_img] + 3) % cfg.image_vocab
            h2 = m.hidden(text, im2)
            changed = not torch.allclose(h[0, q], h2[0, q], atol=1e-6)
            assert changed == bool(mask[q, 5 + key_img]), key_img


def test_loss_is_the_paper_weighting():
    cfg = tiny()
    torch.manual_seed(3)
    m = DALLE(cfg)
    text, image = batch(cfg)
    out = m.loss(text, image, image_loss_weight=7.0)
    tl, il = m(text, image)
    t_ce = F.cross_entropy(tl.reshape(-1, tl.shape[-1]), text[:, 1:].reshape(-1))
    i_ce = F.cross_entropy(il.reshape(-1, il.shape[-1]), image.reshape(-1))
    assert torch.allclose(out["loss"], (t_ce + 7 * i_ce) / 8, atol=1e-6)
    assert out["loss"].requires_grad


@pytest.mark.parametrize("n_layers,attention", [(4, "dalle"), (6, "dalle"), (3, "dense")])
def test_kv_cache_equals_full_pass(n_layers, attention):
    """Incremental decoding (keys gathered per sparse mask) == full forward, including transposed column layers."""
    cfg = tiny(n_layers=n_layers, attention=attention)
    torch.manual_seed(4)
    m = DALLE(cfg).eval()
    if attention == "dalle":
        assert "column" in m.layer_kinds
    text, image = batch(cfg, b=2, seed=5)
    with torch.no_grad():
        _, full = m(text, image)
        cache = m.new_cache(2)
        steps = [m.prefill(text, cache)]
        for j in range(15):
            steps.append(m.decode_next(image[:, j : j + 1], cache))
        inc = torch.stack(steps, 1)
        # the no-cache prefix path (raster masks, no transposition) agrees too
        prefix = torch.stack([m.image_logits_full(text, image[:, :j]) for j in (0, 7, 15)], 1)
    assert torch.allclose(inc, full, atol=1e-5), (inc - full).abs().max()
    assert torch.allclose(prefix, full[:, [0, 7, 15]], atol=1e-5)


def test_kv_cache_multi_token_chunks():
    cfg = tiny()
    torch.manual_seed(6)
    m = DALLE(cfg).eval()
    text, image = batch(cfg, b=2)
    with torch.no_grad():
        _, full = m(text, image)
        cache = m.new_cache(2)
        m.prefill(text, cache)
        out = m.decode_next(image[:, :6], cache)  # 6 tokens at once: logits for image 6
        out2 = m.decode_next(image[:, 6:7], cache)
    assert torch.allclose(out, full[:, 6], atol=1e-5) and torch.allclose(out2, full[:, 7], atol=1e-5)


def test_sampling_cache_and_no_cache_agree_with_same_seed():
    cfg = tiny()
    torch.manual_seed(7)
    m = DALLE(cfg)
    text, _ = batch(cfg, b=2)
    for scfg in (SampleConfig(top_k=5), SampleConfig(guidance_scale=3.0, top_p=0.9, temperature=0.8)):
        a = sample_codes(m, text, scfg, generator=torch.Generator().manual_seed(0), use_cache=True)
        b = sample_codes(m, text, scfg, generator=torch.Generator().manual_seed(0), use_cache=False)
        assert a.shape == (2, 16) and a.dtype == torch.long
        assert torch.equal(a, b)
        assert 0 <= int(a.min()) and int(a.max()) < cfg.image_vocab
    assert m.training  # mode restored


def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    k2 = filter_logits(logits, top_k=2)
    assert torch.isfinite(k2).sum() == 2 and torch.isfinite(k2[0, :2]).all()
    p = filter_logits(logits, top_p=0.8)  # 0.5 + 0.2 < 0.8 -> keep the third too
    assert torch.isfinite(p[0]).tolist() == [True, True, True, False, False]
    p1 = filter_logits(logits, top_p=0.3)
    assert torch.isfinite(p1[0]).tolist() == [True, False, False, False, False]


def test_bad_inputs_are_rejected_with_names():
    m = DALLE(tiny())
    text, image = batch(tiny())
    with pytest.raises(ValueError, match="text: expected"):
        m(text[:, :3], image)
    with pytest.raises(ValueError, match="image: codes"):
        m(text, image + 100)
    with pytest.raises(ValueError, match="text: ids"):
        m(text + 1000, image)
