"""Dense reference attention with a layout mask: the CPU path and the oracle of the block-sparse kernel.

`attention(q, k, v, layout_or_mask)` computes softmax(q k^T / sqrt(d) + mask) v with one softmax
over text and image keys (paper section 2), using torch's scaled_dot_product_attention with a
boolean mask (True = may attend). The block-sparse Triton kernel
(`kernels/block_sparse_attention.py`) takes the same arguments and must give the same result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tessera.kernels.layouts import Layout


def _as_mask(layout_or_mask: Layout | torch.Tensor, sq: int, sk: int, device: torch.device) -> torch.Tensor:
    if isinstance(layout_or_mask, Layout):
        mask = layout_or_mask.mask()
        if mask.shape[0] < sk:
            raise ValueError(f"layout covers {mask.shape[0]} positions, got {sk} keys")
        # queries are the last sq of the first sk positions (a prefix, or new tokens after a cache)
        mask = mask[sk - sq : sk, :sk]
    else:
        mask = layout_or_mask
    if mask.dtype != torch.bool:
        raise ValueError(f"mask: expected a bool tensor, got {mask.dtype}")
    if tuple(mask.shape[-2:]) != (sq, sk):
        raise ValueError(f"mask: expected shape (..., {sq}, {sk}) for {sq} queries and {sk} keys, got {tuple(mask.shape)}")
    return mask.to(device, non_blocking=True)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout_or_mask: Layout | torch.Tensor,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """q: (B, nh, Sq, hs), k/v: (B, nh, Sk, hs); a Layout or a bool mask (Sq, Sk) or broadcastable (B, nh, Sq, Sk).

    Every query row must allow at least one key (true for all Tessera layouts: each token sees itself).
    Returns (B, nh, Sq, hs).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v: expected 4-d (B, nh, S, hs), got {q.dim()}, {k.dim()}, {v.dim()} dims")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q, k, v: incompatible shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    mask = _as_mask(layout_or_mask, q.shape[2], k.shape[2], q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The same computation written out in fp32 (softmax over masked scores), for tests."""
    scale = q.shape[-1] ** -0.5
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale
    scores = scores.masked_fill(~mask.to(q.device), float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


__all__ = ["attention", "attention_reference"]
