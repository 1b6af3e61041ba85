import math

import numpy as np
import pytest
import torch

from tessera.core.errors import InputError
from tessera.trainer.image_metrics import psnr, ssim


def test_psnr_known_values():
    a = torch.full((2, 3, 8, 8), 0.5)
    b = a.clone()
    b[0] += 0.1  # MSE 0.01 -> 20 dB
    b[1] += 0.01  # MSE 1e-4 -> 40 dB
    out = psnr(a, b)
    assert out.shape == (2,)
    assert out[0].item() == pytest.approx(20.0, abs=1e-3)
    assert out[1].item() == pytest.approx(40.0, abs=1e-3)
    assert psnr(a[0], a[0]).item() > 90  # identical: capped, finite
    assert math.isfinite(psnr(a[0], a[0]).item())


def _ssim_reference(x: np.ndarray, y: np.ndarray, win: int = 11, sigma: float = 1.5) -> float:
    """Direct 2-D window loop, per channel (the textbook definition)."""
    c1, c2 = 0.01**2, 0.03**2
    g = np.exp(-((np.arange(win) - (win - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    w2 = np.outer(g, g)
    vals = []
    for ch in range(x.shape[0]):
        for i in range(x.shape[1] - win + 1):
            for j in range(x.shape[2] - win + 1):
                px, py = x[ch, i : i + win, j : j + win], y[ch, i : i + win, j : j + win]
                mx, my = (w2 * px).sum(), (w2 * py).sum()
                vx = (w2 * px * px).sum() - mx * mx
                vy = (w2 * py * py).sum() - my * my
                cxy = (w2 * px * py).sum() - mx * my
                vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_reference_and_orders_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 20, 20, generator=g)
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    got = ssim(x, y)[0].item()
    ref = _ssim_reference(x[0].double().numpy(), y[0].double().numpy())
    assert got == pytest.approx(ref, abs=1e-4)
    assert ssim(x, x)[0].item() == pytest.approx(1.0, abs=1e-5)
    noisier = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    batch = ssim(torch.cat([x, x]), torch.cat([y, noisier]))
    assert batch.shape == (2,)
    assert 1.0 > batch[0].item() > batch[1].item()


def test_ssim_constant_images_closed_form_and_small_images():
    a = torch.full((1, 3, 8, 8), 0.5)
    b = torch.full((1, 3, 8, 8), 0.6)
    c1 = 1e-4
    expected = (2 * 0.5 * 0.6 + c1) / (0.25 + 0.36 + c1)
    assert ssim(a, b)[0].item() == pytest.approx(expected, rel=1e-4)  # 8x8 < window: window shrinks to 7


def test_bad_inputs_raise_one_line():
    with pytest.raises(InputError, match="different shapes"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    with pytest.raises(InputError, match="expected"):
        ssim(torch.zeros(8, 8), torch.zeros(8, 8))
