import importlib.util
import math
from collections import OrderedDict
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tessera.core import config as C
from tessera.core.errors import CheckpointError, InputError
from tessera.core.files import save_checkpoint
from tessera.trainer.config import DVAEModelConfig
from tessera.trainer.dvae import DVAE, gumbel_softmax, kl_to_uniform, load_dvae, logit_laplace_nll, map_pixels, unmap_pixels

REPO = Path(__file__).resolve().parents[2]
SMALL = DVAEModelConfig(image_size=32, n_hid=8, n_groups=4, n_blk_per_group=2, vocab_size=64, n_init=16)


# --------------------------------------------------------------------------------------------
# A small re-implementation of the module layout of openai/DALL-E (dall_e/encoder.py, decoder.py,
# utils.py), written from reading that code, used only to check that their weights convert.


class OAConv2d(nn.Module):
    def __init__(self, n_in, n_out, kw):
        super().__init__()
        self.kw = kw
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw * kw))
        self.b = nn.Parameter(torch.randn(n_out) * 0.1)  # nonzero, so biases are checked too

    def forward(self, x):
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)


class OABlock(nn.Module):
    def __init__(self, n_in, n_out, n_layers, kernels):
        super().__init__()
        hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = OAConv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        w = [n_in, hid, hid, hid, n_out]
        self.res_path = nn.Sequential(
            OrderedDict(
                sum(([(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", OAConv2d(w[i], w[i + 1], k))] for i, k in enumerate(kernels)), [])
            )
        )

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


class OAEncoder(nn.Module):
    def __init__(self, n_hid, n_blk, vocab, group_count=4):
        super().__init__()
        blk = partial(OABlock, n_layers=group_count * n_blk, kernels=(3, 3, 3, 1))
        rng = range(n_blk)

        def group(a, b, pool):
            items = [(f"block_{i + 1}", blk(a * n_hid if i == 0 else b * n_hid, b * n_hid)) for i in rng]
            return nn.Sequential(OrderedDict(items + ([("pool", nn.MaxPool2d(2))] if pool else [])))

        self.blocks = nn.Sequential(
            OrderedDict(
                [
                    ("input", OAConv2d(3, n_hid, 7)),
                    ("group_1", group(1, 1, True)),
                    ("group_2", group(1, 2, True)),
                    ("group_3", group(2, 4, True)),
                    ("group_4", group(4, 8, False)),
                    ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", OAConv2d(8 * n_hid, vocab, 1))]))),
                ]
            )
        )

    def forward(self, x):
        return self.blocks(x)


class OADecoder(nn.Module):
    def __init__(self, n_init, n_hid, n_blk, vocab, group_count=4):
        super().__init__()
        blk = partial(OABlock, n_layers=group_count * n_blk, kernels=(1, 3, 3, 3))
        rng = range(n_blk)

        def group(a, b, up):
            items = [(f"block_{i + 1}", blk(a if i == 0 else b * n_hid, b * n_hid)) for i in rng]
            return nn.Sequential(OrderedDict(items + ([("upsample", nn.Upsample(scale_factor=2, mode="nearest"))] if up else [])))

        self.blocks = nn.Sequential(
            OrderedDict(
                [
                    ("input", OAConv2d(vocab, n_init, 1)),
                    ("group_1", group(n_init, 8, True)),
                    ("group_2", group(8 * n_hid, 4, True)),
                    ("group_3", group(4 * n_hid, 2, True)),
                    ("group_4", group(2 * n_hid, 1, False)),
                    ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", OAConv2d(n_hid, 6, 1))]))),
                ]
            )
        )

    def forward(self, x):
        return self.blocks(x)


def _converter():
    spec = importlib.util.spec_from_file_location("convert_openai_dvae", REPO / "scripts" / "convert_openai_dvae.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_openai_weights_convert_to_identical_outputs(tmp_path):
    torch.manual_seed(0)
    oa_enc, oa_dec = OAEncoder(n_hid=8, n_blk=2, vocab=64), OADecoder(n_init=16, n_hid=8, n_blk=2, vocab=64)
    enc_path, dec_path = tmp_path / "enc.pt", tmp_path / "dec.pt"
    torch.save(oa_enc.state_dict(), enc_path)
    torch.save(oa_dec.state_dict(), dec_path)
    conv = _converter()
    out = tmp_path / "openai.pt"
    assert conv.main(["--encoder", str(enc_path), "--decoder", str(dec_path), "--output", str(out), "--image-size", "32"]) == 0
    model, cfg = load_dvae(out)
    assert (cfg.n_hid, cfg.n_groups, cfg.n_blk_per_group, cfg.vocab_size, cfg.n_init, cfg.image_size) == (8, 4, 2, 64, 16, 32)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        ref_logits = oa_enc(map_pixels(x))
        assert torch.equal(model.encoder(map_pixels(x)), ref_logits)
        codes = model.get_codes(x)
        assert torch.equal(codes, ref_logits.argmax(1))
        z = F.one_hot(codes, 64).permute(0, 3, 1, 2).float()
        ref_img = unmap_pixels(torch.sigmoid(oa_dec(z)[:, :3]))
        assert torch.equal(model.decode_codes(codes), ref_img)
    # a mismatching state dict is refused with a one-line error naming the problem
    sd = oa_enc.state_dict()
    sd.pop("blocks.group_2.block_1.id_path.w")
    torch.save(sd, enc_path)
    assert conv.main(["--encoder", str(enc_path), "--decoder", str(dec_path), "--output", str(tmp_path / "x.pt")]) == 2
    with pytest.raises(CheckpointError, match="missing"):
        conv.convert(sd, oa_dec.state_dict(), 32)


def test_shapes_names_and_paper_details():
    m = DVAE(SMALL)
    names = set(m.state_dict())
    for k in (
        "encoder.blocks.input.w",
        "encoder.blocks.group_1.block_1.res_path.conv_1.w",
        "encoder.blocks.group_2.block_1.id_path.b",
        "encoder.blocks.output.conv.w",
        "decoder.blocks.input.w",
        "decoder.blocks.group_4.block_2.res_path.conv_4.b",
    ):
        assert k in names
    assert "encoder.blocks.group_1.block_1.id_path.w" not in names  # identity skip when widths agree
    enc_k = [m.encoder.blocks.group_1.block_1.res_path[i].kw for i in (1, 3, 5, 7)]
    dec_k = [m.decoder.blocks.group_1.block_1.res_path[i].kw for i in (1, 3, 5, 7)]
    assert enc_k == [3, 3, 3, 1] and dec_k == [1, 3, 3, 3]
    assert m.encoder.blocks.group_1.block_1.post_gain == pytest.approx(1 / 64)  # 1 / (4 groups * 2 blocks)^2
    assert m.encoder.blocks.group_4.block_1.res_path.conv_4.w.shape[0] == 64  # 8 * n_hid
    x = torch.rand(2, 3, 32, 32)
    codes = m.get_codes(x)
    assert codes.shape == (2, 4, 4) and codes.dtype == torch.long and 0 <= codes.min() and codes.max() < 64
    img = m.decode_codes(codes)
    assert img.shape == (2, 3, 32, 32) and 0 <= img.min() and img.max() <= 1
    logits, stats = m(x, temp=1.0)
    assert logits.shape == (2, 64, 4, 4) and stats.shape == (2, 6, 32, 32)
    with pytest.raises(InputError, match=r"\(2, 3, 16, 16\)"):
        m.get_codes(torch.rand(2, 3, 16, 16))
    with pytest.raises(InputError, match="64"):
        m.decode_codes(torch.full((1, 4, 4), 64))


def test_logit_laplace_nll_is_the_density_of_the_paper():
    torch.manual_seed(1)
    x = torch.rand(2, 3, 4, 4)
    stats = torch.randn(2, 6, 4, 4)
    mu, log_b = stats[:, :3], stats[:, 3:]
    y = 0.8 * x + 0.1
    logit = torch.log(y / (1 - y))
    # change of variables: p(y) = Laplace(logit y; mu, b) * |d logit / dy| = Laplace(...) / (y (1 - y))
    ref = -(torch.distributions.Laplace(mu, log_b.exp()).log_prob(logit) - torch.log(y * (1 - y))).flatten(1).sum(1)
    assert torch.allclose(logit_laplace_nll(stats, x), ref, atol=1e-4)
    # the density integrates to 1 over y in (0, 1)
    ys = torch.linspace(1e-4, 1 - 1e-4, 200001)
    xs = (ys - 0.1) / 0.8
    mu1, b1 = 0.3, math.exp(-0.5)
    p = torch.exp(-(torch.log(ys / (1 - ys)) - mu1).abs() / b1) / (2 * b1 * ys * (1 - ys))
    assert torch.trapezoid(p, ys).item() == pytest.approx(1.0, abs=2e-3)
    nll_one = logit_laplace_nll(torch.tensor([mu1, math.log(b1)]).view(1, 2, 1, 1), xs[100000].view(1, 1, 1, 1))
    assert nll_one.item() == pytest.approx(-math.log(p[100000].item()), rel=1e-4)


def test_kl_to_uniform_and_gumbel_softmax():
    V = 16
    assert kl_to_uniform(torch.zeros(3, V, 2, 2)).abs().max() < 1e-6
    peaked = torch.full((1, V, 2, 2), -50.0)
    peaked[:, 3] = 50.0
    assert kl_to_uniform(peaked).item() == pytest.approx(4 * math.log(V), rel=1e-4)
    torch.manual_seed(0)
    logits = torch.randn(1, V, 1, 1) * 2
    g = torch.Generator().manual_seed(0)
    z = gumbel_softmax(logits.expand(20000, V, 1, 1), temp=1 / 16, generator=g)
    assert torch.allclose(z.sum(1), torch.ones(20000, 1, 1), atol=1e-5)
    assert (z.max(1).values > 0.9).float().mean() > 0.8  # nearly one-hot at low temperature (0.89 seen)
    freq = torch.bincount(z.argmax(1).flatten(), minlength=V).float() / 20000
    assert torch.allclose(freq, F.softmax(logits.flatten(), 0), atol=0.015)  # the gumbel-max trick samples q
    z2 = gumbel_softmax(logits.expand(4, V, 1, 1), 1.0, torch.Generator().manual_seed(7))
    z3 = gumbel_softmax(logits.expand(4, V, 1, 1), 1.0, torch.Generator().manual_seed(7))
    assert torch.equal(z2, z3)


def test_load_dvae_errors_name_the_file(tmp_path):
    m = DVAE(SMALL)
    good = tmp_path / "d.pt"
    save_checkpoint(good, "dvae", {"step": 1, "model": m.state_dict(), "ema": m.state_dict(), "model_cfg": C.to_dict(SMALL)})
    m2, cfg = load_dvae(good)
    x = torch.rand(1, 3, 32, 32)
    assert cfg == SMALL and torch.equal(m2.get_codes(x), m.eval().get_codes(x))
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="trunc.pt"):
        load_dvae(trunc)
    other = tmp_path / "t.pt"
    save_checkpoint(other, "transformer", {"step": 1})
    with pytest.raises(CheckpointError, match="'transformer' checkpoint"):
        load_dvae(other)
    with pytest.raises(InputError, match="missing.pt"):
        load_dvae(tmp_path / "missing.pt")
    (tmp_path / "emptyrun").mkdir()
    with pytest.raises(CheckpointError, match="emptyrun"):
        load_dvae(tmp_path / "emptyrun")


def test_load_dvae_from_export_dir(tmp_path):
    import json

    from safetensors.torch import save_file

    m = DVAE(SMALL)
    d = tmp_path / "export"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"dvae": {"model": C.to_dict(SMALL)}}))
    save_file(
        {f"dvae_decoder.{k}": v.contiguous() for k, v in m.decoder.state_dict().items()} | {"transformer.x": torch.zeros(1)},
        str(d / "model.safetensors"),
    )
    m2, cfg = load_dvae(d)
    codes = torch.randint(0, 64, (2, 4, 4))
    assert not m2.has_encoder and torch.equal(m2.decode_codes(codes), m.eval().decode_codes(codes))
