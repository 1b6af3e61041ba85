"""Attention masks of the DALL-E transformer, defined once (paper App. B.1, Fig. 11).

Every consumer reads the masks from here: the dense reference attention (`kernels/attention.py`,
the CPU path and the test oracle), the block-sparse Triton kernel
(`kernels/block_sparse_attention.py`) and the KV-cache sampler (`trainer/transformer.py`).

Sequence layout: `text_len` text positions, then `grid * grid` image positions, S = text_len + grid**2.
A mask is `bool[S, S]`, True where query (row) may attend key (column).

Rules common to all kinds
  * text attends causally to text (and never to image tokens);
  * every image token attends to all text tokens.

Image-to-image part, image token p = (r, c) in raster order (p = r * grid + c):
  * "row": itself and the previous `grid` image tokens in raster order (q in [p - grid, p]),
    i.e. the extent is chosen so the last token attended is the one in the same column of the
    previous row (Fig. 11a).
  * "column": itself and the previous tokens of its column (q = (r', c), r' <= r) (Fig. 11b).
    With `transposed=True` the image positions are in column-major order (t = c * grid + r): the
    paper transposes the image states for column layers so the band structure of the row mask
    applies (Fig. 11c); the keys of t are then the contiguous run [c * grid, t].
  * "conv": a causal k x k neighbourhood: keys (r', c') with r - k//2 <= r' <= r,
    |c' - c| <= k//2, and (r', c') not after (r, c) in raster order (no wrap-around at the
    left/right edges, unlike Fig. 11d whose 1-D implementation wraps).
  * "causal": plain causal attention over the whole sequence (the dense baseline).

Block-level view for the block-sparse kernel: `block_layout(mask, block)` is True where a
`block x block` tile holds any allowed entry; `block_partial` is True where such a tile also holds
forbidden entries (the kernel must then apply the token mask inside the tile).

Block-sparse ceilings (dense-causal tiles / non-empty tiles of the layout) at the paper's size,
256 text + 32x32 image tokens, 64-token tiles (nb = 20, 210 causal tiles), as computed by
`dense_over_sparse` (tests/kernels/test_layouts.py checks them):
  row 210/105 = 2.00,  column transposed 210/90 = 2.33,  conv (k=11) 210/132 = 1.59,
  column in raster order 210/210 = 1.00.
They agree with the expected ~2.0x / 2.3x / 1.6x. The last figure is why the paper transposes
for column layers: in raster order a column's keys are spread one per row (stride `grid`), so every
causal tile holds some allowed entry and nothing can be skipped; transposed, they form contiguous
runs and whole tiles drop out. The conv figure depends on the neighbourhood's exact shape: ours
does not wrap at the edges, so it spans at most k//2 + 1 image rows (6 x 32 tokens = 3 tiles of
64) plus the text tiles; the paper's wrap-around 1-D variant covers about the same tiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

KINDS = ("row", "column", "conv", "causal")


def layer_kinds(n_layers: int) -> list[str]:
    """Mask kind of each layer i = 1..L (paper App. B.1): conv last, column where (i - 2) % 4 == 0, else row."""
    if n_layers < 1:
        raise ValueError(f"n_layers: expected >= 1, got {n_layers}")
    kinds = []
    for i in range(1, n_layers + 1):
        if i == n_layers:
            kinds.append("conv")
        elif (i - 2) % 4 == 0:
            kinds.append("column")
        else:
            kinds.append("row")
    return kinds


def image_order(grid: int, transposed: bool) -> torch.Tensor:
    """long[grid*grid]: raster index of the image token at each position of the (possibly transposed) order.

    With transposed=True, position t = c * grid + r holds raster token r * grid + c, so
    `x_t = x[..., image_order(grid, True), :]` transposes image states and
    `x = x_t[..., inverse_order(grid, True), :]` undoes it.
    """
    idx = torch.arange(grid * grid)
    if not transposed:
        return idx
    return idx.view(grid, grid).t().reshape(-1)


def sequence_order(text_len: int, grid: int, transposed: bool) -> torch.Tensor:
    """long[S]: `image_order` extended over the whole sequence (text positions unchanged)."""
    return torch.cat([torch.arange(text_len), text_len + image_order(grid, transposed)])


def inverse_order(text_len: int, grid: int, transposed: bool) -> torch.Tensor:
    """long[S]: the permutation that undoes `sequence_order` (it is its own inverse for square grids)."""
    perm = sequence_order(text_len, grid, transposed)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return inv


def _image_mask_raster(kind: str, grid: int, conv_kernel: int) -> torch.Tensor:
    """bool[N, N] image-to-image mask in raster order."""
    n = grid * grid
    p = torch.arange(n)
    q = p.view(1, n)
    p = p.view(n, 1)
    pr, pc = p // grid, p % grid
    qr, qc = q // grid, q % grid
    causal = q <= p
    if kind == "row":
        return causal & (q >= p - grid)
    if kind == "column":
        return causal & (qc == pc)
    if kind == "conv":
        h = conv_kernel // 2
        return causal & (qr >= pr - h) & ((qc - pc).abs() <= h)
    if kind == "causal":
        return causal
    raise ValueError(f"mask kind: expected one of {', '.join(KINDS)}, got {kind!r}")


@lru_cache(maxsize=64)
def _token_mask_cached(kind: str, text_len: int, grid: int, conv_kernel: int, transposed: bool) -> torch.Tensor:
    if kind not in KINDS:
        raise ValueError(f"mask kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    if text_len < 1 or grid < 1:
        raise ValueError(f"text_len and grid: expected >= 1, got {text_len} and {grid}")
    if kind == "conv" and (conv_kernel < 1 or conv_kernel % 2 == 0):
        raise ValueError(f"conv_kernel: expected an odd number >= 1, got {conv_kernel}")
    if transposed and kind != "column":
        raise ValueError(f"transposed=True applies to column masks only, got kind {kind!r}")
    t, n = text_len, grid * grid
    s = t + n
    if kind == "causal":
        return torch.ones(s, s, dtype=torch.bool).tril()
    mask = torch.zeros(s, s, dtype=torch.bool)
    mask[:t, :t] = torch.ones(t, t, dtype=torch.bool).tril()  # text: causal over text
    mask[t:, :t] = True  # every image token sees all text
    img = _image_mask_raster(kind, grid, conv_kernel)
    if transposed:
        order = image_order(grid, True)  # position -> raster token
        img = img[order][:, order]
    mask[t:, t:] = img
    return mask


def token_mask(kind: str, text_len: int, grid: int, conv_kernel: int = 11, transposed: bool = False) -> torch.Tensor:
    """bool[S, S], S = text_len + grid**2: True where query may attend key (see the module docstring).

    The returned tensor is a cached CPU tensor: do not modify it in place (clone first).
    """
    return _token_mask_cached(kind, int(text_len), int(grid), int(conv_kernel), bool(transposed))


def _tiles(mask: torch.Tensor, block: int) -> torch.Tensor:
    """int[nb, nb] count of allowed entries per block x block tile (S padded to a multiple of block)."""
    if mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        raise ValueError(f"mask: expected a square bool[S, S], got shape {tuple(mask.shape)}")
    if block < 1:
        raise ValueError(f"block: expected >= 1, got {block}")
    s = mask.shape[0]
    nb = (s + block - 1) // block
    pad = nb * block - s
    m = torch.nn.functional.pad(mask.to(torch.int32), (0, pad, 0, pad))
    return m.view(nb, block, nb, block).sum(dim=(1, 3))


def block_layout(mask: torch.Tensor, block: int) -> torch.Tensor:
    """bool[nb, nb]: True where a block x block tile holds any allowed entry (S padded up to a multiple of block)."""
    return _tiles(mask, block) > 0


def block_partial(mask: torch.Tensor, block: int) -> torch.Tensor:
    """bool[nb, nb]: True where a non-empty tile is not full (padding rows/columns count as forbidden)."""
    counts = _tiles(mask, block)
    return (counts > 0) & (counts < block * block)


def dense_over_sparse(mask: torch.Tensor, block: int) -> float:
    """Non-empty tiles of the dense causal layout over the non-empty tiles of `mask` (the block-sparse ceiling)."""
    s = mask.shape[0]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    return float(block_layout(causal, block).sum()) / float(block_layout(mask, block).sum())


@dataclass(frozen=True)
class Layout:
    """One layer's attention pattern: what `tessera.kernels.attention.attention` and the block-sparse kernel take."""

    kind: str
    text_len: int
    grid: int
    conv_kernel: int = 11
    transposed: bool = False

    @property
    def seq_len(self) -> int:
        return self.text_len + self.grid * self.grid

    def mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        m = token_mask(self.kind, self.text_len, self.grid, self.conv_kernel, self.transposed)
        return m if device is None else m.to(device)

    def blocks(self, block: int) -> torch.Tensor:
        return block_layout(self.mask(), block)

    def partial(self, block: int) -> torch.Tensor:
        return block_partial(self.mask(), block)


def layer_layouts(n_layers: int, text_len: int, grid: int, conv_kernel: int = 11, attention: str = "dalle") -> list[Layout]:
    """The Layout of every layer: the paper's pattern (column layers on transposed states), or causal everywhere."""
    if attention == "dense":
        return [Layout("causal", text_len, grid, conv_kernel) for _ in range(n_layers)]
    if attention != "dalle":
        raise ValueError(f"attention: expected 'dalle' or 'dense', got {attention!r}")
    return [Layout(k, text_len, grid, conv_kernel, transposed=(k == "column")) for k in layer_kinds(n_layers)]


__all__ = [
    "KINDS",
    "Layout",
    "layer_kinds",
    "layer_layouts",
    "image_order",
    "sequence_order",
    "inverse_order",
    "token_mask",
    "block_layout",
    "block_partial",
    "dense_over_sparse",
]
