"""Attention layouts against hand-worked examples (4x4 grid, 3 text tokens) and the block ceilings."""

import pytest
import torch

from tessera.kernels.layouts import (
    Layout,
    block_layout,
    block_partial,
    dense_over_sparse,
    image_order,
    inverse_order,
    layer_kinds,
    layer_layouts,
    sequence_order,
    token_mask,
)

T, G = 3, 4  # 3 text tokens, 4x4 image grid: S = 19


def image_keys(mask, p, text_len=T):
    """Image positions (0-based within the image part) that image position p attends."""
    row = mask[text_len + p, text_len:]
    return sorted(torch.nonzero(row).flatten().tolist())


def test_layer_kinds_follow_the_paper_pattern():
    assert layer_kinds(1) == ["conv"]
    assert layer_kinds(4) == ["row", "column", "row", "conv"]
    assert layer_kinds(8) == ["row", "column", "row", "row", "row", "column", "row", "conv"]
    k64 = layer_kinds(64)
    assert k64[-1] == "conv"
    assert [i + 1 for i, k in enumerate(k64) if k == "column"] == list(range(2, 63, 4))
    assert k64.count("row") == 64 - 1 - 16


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_text_part_is_causal_and_images_see_all_text(kind):
    m = token_mask(kind, T, G, conv_kernel=3)
    assert m.shape == (T + G * G, T + G * G)
    assert torch.equal(m[:T, :T], torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    assert not m[:T, T:].any()  # text never attends image
    assert m[T:, :T].all()  # every image token attends all text


def test_row_mask_hand_worked():
    m = token_mask("row", T, G)
    assert image_keys(m, 0) == [0]
    assert image_keys(m, 3) == [0, 1, 2, 3]
    assert image_keys(m, 4) == [0, 1, 2, 3, 4]  # itself + previous 4 = back to the same column one row up
    assert image_keys(m, 6) == [2, 3, 4, 5, 6]
    assert image_keys(m, 15) == [11, 12, 13, 14, 15]


def test_column_mask_hand_worked():
    m = token_mask("column", T, G)
    assert image_keys(m, 0) == [0]
    assert image_keys(m, 6) == [2, 6]  # (1, 2): column 2, rows 0..1
    assert image_keys(m, 13) == [1, 5, 9, 13]
    assert image_keys(m, 15) == [3, 7, 11, 15]


def test_column_mask_transposed_is_a_contiguous_run():
    mt = token_mask("column", T, G, transposed=True)
    # position t = c * 4 + r holds raster token r * 4 + c; raster 6 = (1, 2) sits at t = 9
    assert image_order(G, True).tolist()[9] == 6
    assert image_keys(mt, 9) == [8, 9]
    assert image_keys(mt, 15) == [12, 13, 14, 15]  # (3, 3): its column = the run 12..15
    assert image_keys(mt, 4) == [4]  # (0, 1): first of column 1
    # the transposed mask is the raster mask with rows and columns permuted
    perm = sequence_order(T, G, True)
    m = token_mask("column", T, G)
    assert torch.equal(mt, m[perm][:, perm])
    inv = inverse_order(T, G, True)
    assert torch.equal(mt[inv][:, inv], m)


def test_conv_mask_hand_worked_3x3():
    m = token_mask("conv", T, G, conv_kernel=3)
    assert image_keys(m, 6) == [1, 2, 3, 5, 6]  # (1,2): row 0 cols 1..3, row 1 cols 1..2
    assert image_keys(m, 4) == [0, 1, 4]  # (1,0): no wrap-around to (0,3)
    assert image_keys(m, 7) == [2, 3, 6, 7]  # (1,3): right edge
    assert image_keys(m, 0) == [0]
    m5 = token_mask("conv", T, G, conv_kernel=5)
    assert image_keys(m5, 10) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]  # (2,2): rows 0..2, cols 0..3


def test_all_masks_causal_and_every_query_attends_itself():
    for kind in ("row", "column", "conv", "causal"):
        m = token_mask(kind, 5, 6, conv_kernel=5)
        assert not torch.triu(m, diagonal=1).any(), kind
        assert m.diagonal().all(), kind
    causal = token_mask("causal", T, G)
    assert torch.equal(causal, torch.ones(19, 19, dtype=torch.bool).tril())


def test_sparse_masks_are_subsets_of_causal():
    causal = token_mask("causal", 7, 8)
    for kind in ("row", "column", "conv"):
        m = token_mask(kind, 7, 8, conv_kernel=5)
        assert (m & ~causal).sum() == 0
        assert m.sum() < causal.sum()


def test_block_layout_and_partial_small():
    m = token_mask("row", T, G)  # S = 19, block 8 -> 3x3 tiles, padded to 24
    bl = block_layout(m, 8)
    assert bl.shape == (3, 3)
    assert torch.equal(bl, torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    part = block_partial(m, 8)
    assert part[0, 0]  # the causal text corner and padding make tile (0, 0) partial
    # tile (1, 0): queries 8..15 (image 5..12) x keys 0..7 (text 0..2, image 0..4): image 12 sees only image 8..12
    assert part[1, 0]
    # a full tile: block 1 tiles are all full or empty
    assert not block_partial(m, 1).any()
    assert torch.equal(block_layout(m, 1), m)


def test_block_partial_full_tile():
    m = token_mask("causal", 8, 4)  # S = 24
    part = block_partial(m, 8)
    assert not part[1, 0] and not part[2, 0] and not part[2, 1]  # below the diagonal: full
    assert part[0, 0] and part[1, 1] and part[2, 2]


@pytest.mark.parametrize(
    "kind,transposed,expected",
    [("row", False, 2.0), ("column", True, 2.3), ("conv", False, 1.6), ("column", False, 1.0)],
)
def test_block_ceiling_at_paper_size(kind, transposed, expected):
    m = token_mask(kind, 256, 32, conv_kernel=11, transposed=transposed)
    assert dense_over_sparse(m, 64) == pytest.approx(expected, abs=0.05)


def test_layout_objects():
    layouts = layer_layouts(4, T, G, conv_kernel=3)
    assert [l.kind for l in layouts] == ["row", "column", "row", "conv"]
    assert [l.transposed for l in layouts] == [False, True, False, False]
    assert layouts[1].seq_len == 19
    assert torch.equal(layouts[1].mask(), token_mask("column", T, G, transposed=True))
    assert all(l.kind == "causal" for l in layer_layouts(4, T, G, attention="dense"))
    assert Layout("row", T, G).blocks(8).shape == (3, 3)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="mask kind"):
        token_mask("diagonal", T, G)
    with pytest.raises(ValueError, match="conv_kernel"):
        token_mask("conv", T, G, conv_kernel=4)
    with pytest.raises(ValueError, match="transposed"):
        token_mask("row", T, G, transposed=True)
    with pytest.raises(ValueError, match="n_layers"):
        layer_kinds(0)
