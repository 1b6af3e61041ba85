"""trainer/inception.py (Inception-v3 without torchvision) and the `tessera eval --inception` path.

No pretrained weights here: networks get seeded random weights (`seeded_state_dict`). What pins the
architecture to the published ones:

* torchvision's `Inception3(num_classes=1000, aux_logits=True)` state dict (0.29.1): its 580 names and
  shapes, in order, hash to TORCHVISION_DIGEST; a handful are written out below, with its parameter
  count 27,161,264 (the documented num_params of Inception_V3_Weights.IMAGENET1K_V1).
* GOLDEN: outputs for seeded weights and a seeded image, computed once with torchvision 0.29.1's
  Inception3 (transform_input=True, fed ImageNet-normalised 299x299 input) and with pytorch-fid
  0.3.0's FID network (its FIDInceptionA/C/E_1/E_2 blocks, its resize and 2x - 1 scaling,
  IS softmax over pool @ fc.weight.T), outside this repository (torchvision cannot be installed here).
"""

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from tessera.cli import main
from tessera.core.errors import InputError
from tessera.trainer.evaluate import InceptionFeatures, frechet_distance
from tessera.trainer.inception import InceptionV3, _same_pool, load_inception

TORCHVISION_KEYS = 580  # with AuxLogits: 96 conv+bn units x 6 tensors + AuxLogits.fc (2) + fc (2)
TORCHVISION_DIGEST = "f17cfe285ae356390f277b6ceb7da560c8eb96172e734ab071157bf6a30ce53e"
TORCHVISION_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_mean": (32,),
    "Conv2d_4a_3x3.bn.running_var": (192,),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7dbl_5.conv.weight": (192, 128, 1, 7),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.bn.num_batches_tracked": (),
    "AuxLogits.conv1.conv.weight": (768, 128, 5, 5),
    "AuxLogits.fc.weight": (1000, 768),
    "fc.weight": (1000, 2048),
    "fc.bias": (1000,),
}

# seeded_state_dict(torchvision's names, seed) and torch.rand(1, 3, 48, 64, seed 7) through the reference code
GOLDEN = {
    "torchvision": {
        "classes": 1000,
        "seed": 0,
        "pool_head": [0.0, 0.0510102, 0.1168595, 0.0, 0.0159728, 0.6267407],
        "pool_sum": 541.4588,
        "argmax": 77,
        "p_max": 0.0358216,
    },
    "fid": {
        "classes": 1008,
        "seed": 1,
        "pool_head": [0.063502, 0.1715027, 0.0168818, 0.0375262, 0.4020839, 0.9880038],
        "pool_sum": 655.00433,
        "argmax": 318,
        "p_max": 0.0557423,
    },
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small shared test machines
    yield
    torch.set_num_threads(threads)


def seeded_state_dict(names_shapes, seed: int) -> dict[str, torch.Tensor]:
    """Random weights that keep activations O(1) through the 48 layers (He-normal convs, BN near identity).

    Drawn in the given (torchvision) key order from one generator, so the same seed gives the same
    tensors whichever module produced the names.
    """
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in names_shapes:
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.zeros((), dtype=torch.long)
        elif k.endswith("conv.weight"):
            sd[k] = torch.randn(shape, generator=g) * math.sqrt(2.0 / math.prod(shape[1:]))
        elif k.endswith("bn.weight"):
            sd[k] = torch.empty(shape).uniform_(0.5, 1.5, generator=g)
        elif k.endswith("bn.bias") or k.endswith("running_mean"):
            sd[k] = torch.randn(shape, generator=g) * 0.1
        elif k.endswith("running_var"):
            sd[k] = torch.empty(shape).uniform_(0.5, 2.0, generator=g)
        elif k.endswith("fc.weight"):
            sd[k] = torch.randn(shape, generator=g) * 3 / math.sqrt(shape[1])
        elif k.endswith("fc.bias"):
            sd[k] = torch.randn(shape, generator=g)
        else:
            raise AssertionError(k)
    return sd


def _names_shapes(net: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in net.state_dict().items()]


def _digest(names_shapes) -> str:
    return hashlib.sha256("\n".join(f"{k}:{s}" for k, s in names_shapes).encode()).hexdigest()


def test_state_dict_names_are_torchvisions():
    full = InceptionV3(1000, aux_logits=True)
    ns = _names_shapes(full)
    assert len(ns) == TORCHVISION_KEYS and _digest(ns) == TORCHVISION_DIGEST
    shapes = dict(ns)
    for k, s in TORCHVISION_SHAPES.items():
        assert shapes[k] == s, k
    assert sum(p.numel() for p in full.parameters()) == 27_161_264
    # torchvision's exact key set loads strictly, and through load_inception (AuxLogits ignored)
    sd = seeded_state_dict(ns, 0)
    InceptionV3(1000, aux_logits=True).load_state_dict(sd, strict=True)
    net = load_inception(sd)
    assert net.variant == "torchvision" and net.AuxLogits is None and not net.training
    assert torch.equal(net.state_dict()["Mixed_7c.branch3x3dbl_3b.conv.weight"], sd["Mixed_7c.branch3x3dbl_3b.conv.weight"])
    # pytorch-fid's layout: the same names without AuxLogits, fc with 1008 classes
    fid = InceptionV3(1008, "fid")
    fns = _names_shapes(fid)
    assert [k for k, _ in fns] == [k for k, _ in ns if not k.startswith("AuxLogits.")]
    assert dict(fns)["fc.weight"] == (1008, 2048) and len(fns) == 566
    fid.load_state_dict(seeded_state_dict(fns, 1), strict=True)


def test_variant_choice_and_mismatch_messages():
    ns = _names_shapes(InceptionV3(1008, "fid"))
    sd = seeded_state_dict(ns, 1)
    assert load_inception(sd).variant == "fid"  # from the fc shape
    assert load_inception(sd, "torchvision").variant == "torchvision"  # or named
    assert load_inception({"state_dict": sd}).num_classes == 1008
    # older exports without BatchNorm counters load
    assert load_inception({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}).variant == "fid"
    bad = dict(sd)
    del bad["Mixed_6c.branch7x7_2.conv.weight"]
    bad["Mixed_6c.branch7x7_2.conv.weights"] = sd["Mixed_6c.branch7x7_2.conv.weight"]
    bad["Conv2d_1a_3x3.conv.weight"] = torch.zeros(32, 1, 3, 3)
    with pytest.raises(ValueError) as e:
        load_inception(bad)
    msg = str(e.value)
    assert "\n" not in msg
    assert "1 missing (Mixed_6c.branch7x7_2.conv.weight)" in msg
    assert "1 unexpected (Mixed_6c.branch7x7_2.conv.weights)" in msg
    assert "Conv2d_1a_3x3.conv.weight is (32, 1, 3, 3), not (32, 3, 3, 3)" in msg
    with pytest.raises(ValueError, match="not a state dict"):
        load_inception([1, 2])
    with pytest.raises(ValueError, match="variant"):
        InceptionV3(variant="tf")


def test_preprocessing_and_pool_modes():
    net = InceptionV3(10)
    x = torch.rand(2, 3, 20, 30)
    y = net.preprocess(x)
    assert y.shape == (2, 3, 299, 299)
    # ImageNet normalisation + torchvision's transform_input compose to 2x - 1, as the FID variant
    ref = 2 * torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
    assert torch.allclose(y, ref, atol=1e-5)
    net.variant = "fid"
    assert torch.allclose(net.preprocess(x), ref, atol=1e-6)
    # pooling branches: torchvision counts the zero padding, TensorFlow (FID) does not; FID's last block max-pools
    c = torch.ones(1, 1, 4, 4)
    assert _same_pool(c, "avg")[0, 0, 0, 0].item() == pytest.approx(4 / 9)
    assert torch.allclose(_same_pool(c, "avg_tf"), c)
    r = torch.arange(16.0).view(1, 1, 4, 4)
    assert _same_pool(r, "max")[0, 0, 0, 0].item() == 5.0
    fid = InceptionV3(1008, "fid")
    assert (fid.Mixed_5b.pool_mode, fid.Mixed_6e.pool_mode, fid.Mixed_7b.pool_mode, fid.Mixed_7c.pool_mode) == ("avg_tf",) * 3 + ("max",)
    tv = InceptionV3(1000)
    assert {tv.Mixed_5b.pool_mode, tv.Mixed_6e.pool_mode, tv.Mixed_7b.pool_mode, tv.Mixed_7c.pool_mode} == {"avg"}


@pytest.mark.parametrize("variant", ["torchvision", "fid"])
def test_outputs_match_torchvision_and_pytorch_fid(variant):
    g = GOLDEN[variant]
    net = InceptionV3(g["classes"], variant, aux_logits=variant == "torchvision")
    net = load_inception(seeded_state_dict(_names_shapes(net), g["seed"]))
    image = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        pool, probs = net(image)
    assert pool.shape == (1, 2048) and probs.shape == (1, g["classes"])
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert pool[0, :6].tolist() == pytest.approx(g["pool_head"], rel=1e-4, abs=1e-5)
    assert pool.sum().item() == pytest.approx(g["pool_sum"], rel=1e-4)
    assert int(probs.argmax()) == g["argmax"]
    assert probs.max().item() == pytest.approx(g["p_max"], rel=1e-3)


def _frechet_dxd(a, b):
    """The textbook D x D form, in numpy."""
    a, b = a.double().numpy(), b.double().numpy()
    sa, sb = np.cov(a.T), np.cov(b.T)
    w, v = np.linalg.eigh(sa)
    ra = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    mid = ra @ sb @ ra
    tr = np.sqrt(np.clip(np.linalg.eigvalsh((mid + mid.T) / 2), 0, None)).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * tr)


def test_frechet_distance_with_fewer_samples_than_dimensions():
    """Few images in 2048-D: frechet_distance takes the N x M route, equal to the D x D one."""
    g = torch.Generator().manual_seed(0)
    for n, m in [(10, 20), (30, 7), (5, 5), (63, 200)]:
        a = torch.randn(n, 64, generator=g) * torch.rand(64, generator=g) * 2 + 0.3
        b = torch.randn(m, 64, generator=g) + 0.1
        assert frechet_distance(a, b) == pytest.approx(_frechet_dxd(a, b), rel=1e-6)
        assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
        assert frechet_distance(a, a + 1.5) == pytest.approx(64 * 1.5**2, rel=1e-6)  # float32 shift rounding


# --------------------------------------------------------------------------------------------
# tessera eval --inception


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    """Two clearly different sets of 8 32x32 images: uniform noise, and smooth colour gradients."""
    root = tmp_path_factory.mktemp("inception")
    rng = np.random.default_rng(0)
    noise, smooth = root / "noise", root / "smooth"
    noise.mkdir()
    smooth.mkdir()
    ramp = np.linspace(0, 255, 32)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(noise / f"{i:03d}.png")
        a = np.zeros((32, 32, 3))
        a[..., i % 3] = ramp[None, :]
        a[..., (i + 1) % 3] = ramp[:, None] * (i / 8)
        Image.fromarray(a.astype(np.uint8)).save(smooth / f"{i:03d}.png")
    weights = root / "inception_v3.pt"
    torch.save(seeded_state_dict(_names_shapes(InceptionV3(1000, aux_logits=True)), 0), weights)
    return root, weights


def _eval(images, reference, weights, out):
    return main(["eval", "--images", str(images), "--reference", str(reference), "--inception", str(weights), "--output", str(out)])


def test_cli_inception_report(image_sets, tmp_path, capsys):
    root, weights = image_sets
    out = tmp_path / "same.json"
    assert _eval(root / "noise", root / "noise", weights, out) == 0
    rep = json.loads(out.read_text())
    assert rep["feature_space"] == "inception" and rep["inception_variant"] == "torchvision"
    assert rep["inception"] == str(weights) and rep["n_images"] == rep["n_reference"] == 8
    assert rep["fid"] == pytest.approx(0.0, abs=1e-4)
    assert math.isfinite(rep["is"]) and rep["is"] >= 1.0
    assert "fid_clip" not in rep
    assert "inception_variant" in capsys.readouterr().out
    out2 = tmp_path / "different.json"
    assert _eval(root / "noise", root / "smooth", weights, out2) == 0
    rep2 = json.loads(out2.read_text())
    assert rep2["fid"] > 0.05 and rep2["fid"] > 1000 * rep["fid"]
    assert rep2["is"] == pytest.approx(rep["is"])  # IS is of the generated side only


def test_cli_inception_errors(image_sets, tmp_path, capsys):
    root, weights = image_sets
    out = tmp_path / "r.json"
    missing = tmp_path / "nope.pt"
    assert _eval(root / "noise", root / "smooth", missing, out) == 2
    err = capsys.readouterr().err
    assert f"'{missing}'" in err and "do not exist" in err
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert _eval(root / "noise", root / "smooth", truncated, out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"'{truncated}'" in err and "cannot be read" in err
    sd = torch.load(weights, weights_only=True)
    sd["Mixed_7c.branch_pool.conv.kernel"] = sd.pop("Mixed_7c.branch_pool.conv.weight")
    wrong = tmp_path / "wrong_keys.pt"
    torch.save(sd, wrong)
    assert _eval(root / "noise", root / "smooth", wrong, out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"'{wrong}'" in err
    assert "missing (Mixed_7c.branch_pool.conv.weight)" in err and "unexpected (Mixed_7c.branch_pool.conv.kernel)" in err
    assert not out.exists()


def test_safetensors_fid_weights(tmp_path):
    from safetensors.torch import save_file

    sd = seeded_state_dict(_names_shapes(InceptionV3(1008, "fid")), 1)
    path = tmp_path / "pt_inception-2015-12-05.safetensors"
    save_file(sd, str(path))
    feats = InceptionFeatures(path)
    assert feats.variant == "fid"
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    f, p = feats(images)
    f2, p2 = feats(images.float() / 255)
    assert f.shape == (2, 2048) and p.shape == (2, 1008) and torch.allclose(f, f2) and torch.allclose(p, p2)
    with pytest.raises(InputError, match="do not exist"):
        InceptionFeatures(tmp_path / "absent.safetensors")
