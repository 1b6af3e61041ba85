"""A data-dependent warm start for the dVAE codebook (not in the paper; `dvae.train.codebook_init`).

Why: with a gumbel-softmax bottleneck the decoder first treats every code alike, the encoder gets
no signal for telling codes apart, and a short run settles on a handful of codes (bench/results/
dvae.md: 6-27 codes of 512 in use, 21-24 dB). Here the codes are given a meaning before the
paper's objective takes over:

1. k-means (K = vocab_size) on raw image patches of the size one token covers (8x8 pixels for three
   poolings), on a shuffled sample of the training images;
2. for `init_steps` updates, the decoder learns to reconstruct images from the one-hot k-means codes
   of their patches (the same logit-Laplace term as training), and the encoder learns to predict
   those codes (cross-entropy on its logits);
3. then training goes on with the paper's gumbel-softmax objective, and the temperature and KL
   schedules start from there.

Patches and centroids are float[N, C * P * P] in [0, 1], flattened channel-major within a patch.
"""

from __future__ import annotations

import torch

from tessera.trainer.data import ImageStream


def image_patches(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Images float[B, C, H, W] -> patches float[B * (H/P) * (W/P), C * P * P] in raster order of the grid."""
    b, c, h, w = x.shape
    if h % patch or w % patch:
        raise ValueError(f"image side {h}x{w} is not a multiple of the patch size {patch}")
    p = x.float().unfold(2, patch, patch).unfold(3, patch, patch)  # (B, C, H/P, W/P, P, P)
    return p.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * patch * patch)


def nearest(points: torch.Tensor, centroids: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Index of the nearest centroid (squared Euclidean) of each point: long[N].

    |p - c|^2 = |p|^2 - 2 p.c + |c|^2, and |p|^2 does not change the argmin: one addmm per chunk of points. Chunks
    of 4,096 rows keep the distance block (8 MB at 512 codes) in cache: the demo's k-means (256,000 patches, 512
    codes, 20 iterations) takes 3.0 s instead of 9.7 s with 65,536-row chunks and the subtraction done apart, with
    the same centroids bit for bit (machine D, pinned AVX2 kernels).
    """
    c2 = (centroids * centroids).sum(1)
    ct = centroids.T.contiguous()
    out = []
    for i in range(0, points.shape[0], chunk):
        out.append(torch.addmm(c2, points[i : i + chunk], ct, alpha=-2).argmin(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=points.device)


def kmeans(points: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means: float[k, D] centroids of float[N, D] points.

    Initial centroids are k distinct random points; a centroid left without points is moved to a random
    point, so every code starts with a meaning. Deterministic for a given generator and input.
    """
    n = points.shape[0]
    if n == 0:
        raise ValueError("k-means: no points")
    dev = points.device
    first = torch.randperm(n, generator=generator)[:k].to(dev)
    if first.numel() < k:  # fewer points than codes: repeat points (the duplicates are reseeded below anyway)
        first = torch.cat([first, torch.randint(0, n, (k - first.numel(),), generator=generator).to(dev)])
    c = points[first].clone()
    for _ in range(iters):
        a = nearest(points, c)
        sums = torch.zeros_like(c).index_add_(0, a, points)
        counts = torch.bincount(a, minlength=k)
        empty = counts == 0
        c = sums / counts.clamp_min(1)[:, None].to(points.dtype)
        if bool(empty.any()):
            c[empty] = points[torch.randint(0, n, (int(empty.sum()),), generator=generator).to(dev)]
    return c


def patch_codes(x: torch.Tensor, centroids: torch.Tensor, patch: int) -> torch.Tensor:
    """The k-means code of every patch of images float[B, C, H, W]: long[B, H/P, W/P]."""
    b, _, h, w = x.shape
    return nearest(image_patches(x, patch), centroids.to(x.device)).view(b, h // patch, w // patch)


def sample_centroids(spec, image_size: int, patch: int, k: int, n_images: int, iters: int, seed: int, device: torch.device) -> torch.Tensor:
    """k-means centroids from `n_images` shuffled training images (one pass of a seeded stream)."""

    bs = min(64, max(n_images, 1))
    stream = ImageStream(spec, image_size=image_size, batch_size=bs, seed=seed + 7919, rank=0, world=1, workers=0)
    imgs, have = [], 0
    while have < n_images:
        x = next(stream)
        imgs.append(x)
        have += x.shape[0]
    x = torch.cat(imgs)[:n_images].to(device)
    g = torch.Generator().manual_seed(seed)
    return kmeans(image_patches(x, patch), k, iters, g)
