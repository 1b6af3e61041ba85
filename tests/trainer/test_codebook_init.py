import pytest
import torch
from dvae_shapes import write_shape_shards

from tessera.trainer.codebook_init import image_patches, kmeans, nearest, patch_codes, sample_centroids


def test_image_patches_are_the_pixel_blocks_in_raster_order():
    x = torch.rand(2, 3, 8, 12)
    p = image_patches(x, 4)
    assert p.shape == (2 * 2 * 3, 3 * 16)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                assert torch.equal(p[b * 6 + i * 3 + j], x[b, :, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4].flatten())
    with pytest.raises(ValueError, match="multiple of the patch size 5"):
        image_patches(x, 5)


def test_nearest_matches_brute_force_across_chunks():
    g = torch.Generator().manual_seed(0)
    pts, cen = torch.rand(1000, 7, generator=g), torch.rand(13, 7, generator=g)
    want = torch.cdist(pts, cen).argmin(1)
    assert torch.equal(nearest(pts, cen, chunk=97), want)


def test_kmeans_finds_separated_clusters_and_is_deterministic():
    g = torch.Generator().manual_seed(1)
    centres = torch.eye(6)[:4] * 3  # four centres 4.2 apart
    labels = torch.arange(400) % 4
    pts = centres[labels] + 0.05 * torch.randn(400, 6, generator=g)
    # 8 restarts of 10 iterations: Lloyd can merge two clusters from a bad start; the best of a few must not
    best = min(
        (kmeans(pts, 4, 10, torch.Generator().manual_seed(s)) for s in range(8)),
        key=lambda c: (pts - c[nearest(pts, c)]).pow(2).sum().item(),
    )
    err = torch.cdist(centres, best).min(1).values
    assert err.max() < 0.05  # every true centre has a centroid on it
    a = nearest(pts, best)
    for k in range(4):  # each cluster maps to one code
        assert a[labels == k].unique().numel() == 1
    c1 = kmeans(pts, 4, 10, torch.Generator().manual_seed(3))
    c2 = kmeans(pts, 4, 10, torch.Generator().manual_seed(3))
    assert torch.equal(c1, c2)


def test_kmeans_with_more_codes_than_distinct_points_leaves_no_empty_code():
    pts = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]]).repeat(10, 1)
    c = kmeans(pts, 5, 5, torch.Generator().manual_seed(0))
    assert c.shape == (5, 2) and torch.isfinite(c).all()
    # every centroid is one of the points (duplicates are moved to random points, never left at NaN or 0/0)
    assert (torch.cdist(c, pts).min(1).values < 1e-6).all()
    with pytest.raises(ValueError, match="no points"):
        kmeans(torch.zeros(0, 2), 3, 2, torch.Generator())


def test_patch_codes_of_tiled_centroids_are_the_tiles():
    g = torch.Generator().manual_seed(2)
    cen = torch.rand(5, 3 * 4 * 4, generator=g)
    want = torch.randint(0, 5, (2, 3, 3), generator=g)
    x = cen[want.flatten()].view(2, 3, 3, 3, 4, 4).permute(0, 3, 1, 4, 2, 5).reshape(2, 3, 12, 12)
    assert torch.equal(patch_codes(x, cen, 4), want)


def test_sample_centroids_clusters_patches_of_the_shards(tmp_path):
    write_shape_shards(tmp_path / "s", n_shards=2, per_shard=8, size=16, seed=3)
    c = sample_centroids(str(tmp_path / "s"), 16, 4, 8, n_images=12, iters=5, seed=0, device=torch.device("cpu"))
    again = sample_centroids(str(tmp_path / "s"), 16, 4, 8, n_images=12, iters=5, seed=0, device=torch.device("cpu"))
    assert c.shape == (8, 48) and torch.equal(c, again)
    assert 0 <= c.min() and c.max() <= 1  # means of pixels in [0, 1]
    # the codes reconstruct the images far better than their mean colour does
    from tessera.trainer.data import iter_image_batches

    x = torch.cat([b for b, _ in iter_image_batches(str(tmp_path / "s"), 16, 16)])
    codes = patch_codes(x, c, 4)
    rec = c[codes.flatten()].view(-1, 4, 4, 3, 4, 4).permute(0, 3, 1, 4, 2, 5).reshape(x.shape)
    assert (rec - x).pow(2).mean() < 0.5 * (x - x.mean((0, 2, 3), keepdim=True)).pow(2).mean()
