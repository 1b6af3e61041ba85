"""Full-reference image metrics for reconstructions: PSNR and SSIM.

Both take batches of images in [0, 1] shaped (B, C, H, W) (a single (C, H, W) image is accepted
and gives a 0-d result) and return one value per image, so callers can average or keep them.
SSIM follows Wang et al. 2004: an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03,
computed per channel on the valid region and averaged over channels and positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tessera.core.errors import InputError


def _check_pair(a: torch.Tensor, b: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise InputError(f"{name}: expected two torch tensors, got {type(a).__name__} and {type(b).__name__}")
    if a.shape != b.shape:
        raise InputError(f"{name}: images of different shapes {tuple(a.shape)} and {tuple(b.shape)}")
    single = a.dim() == 3
    if single:
        a, b = a.unsqueeze(0), b.unsqueeze(0)
    if a.dim() != 4:
        raise InputError(f"{name}: expected (B, C, H, W) or (C, H, W) images, got shape {tuple(a.shape)}")
    return a.float(), b.float(), single


def psnr(a: torch.Tensor, b: torch.Tensor, max_val: float = 1.0, eps: float = 1e-10) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image: 10 log10(max^2 / MSE). Identical images give ~100 dB (MSE floored at eps)."""
    a, b, single = _check_pair(a, b, "psnr")
    mse = (a - b).pow(2).flatten(1).mean(1)
    out = 10.0 * torch.log10(max_val**2 / mse.clamp_min(eps))
    return out[0] if single else out


def _gaussian_window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, max_val: float = 1.0, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per image (mean over channels and valid positions), in [-1, 1]; 1 for identical images.

    Images smaller than the window use a window of their shorter side (odd), so 8x8 crops still work.
    """
    a, b, single = _check_pair(a, b, "ssim")
    _, c, h, w = a.shape
    size = min(window, h, w)
    if size % 2 == 0:
        size -= 1
    if size < 1:
        raise InputError(f"ssim: images of shape {tuple(a.shape)} are too small")
    g = _gaussian_window(size, sigma, a.device, a.dtype)
    # separable Gaussian filter, one group per channel
    kx = g.view(1, 1, 1, size).expand(c, 1, 1, size)
    ky = g.view(1, 1, size, 1).expand(c, 1, size, 1)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, kx, groups=c), ky, groups=c)

    c1 = (0.01 * max_val) ** 2
    c2 = (0.03 * max_val) ** 2
    mu_a, mu_b = blur(a), blur(b)
    # variances and covariance from blurred second moments: E[x^2] - E[x]^2
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    out = (num / den).flatten(1).mean(1)
    return out[0] if single else out


__all__ = ["psnr", "ssim"]
