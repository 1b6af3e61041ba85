"""The DALL-E transformer: a decoder-only sparse transformer over [text tokens, image tokens].

Paper: Ramesh et al. 2021, section 2.2 and App. B.1.
  * up to `text_len` BPE tokens; unused text positions hold a distinct learned padding token per
    position (ids text_vocab + i), so an empty caption is all padding (classifier-free guidance);
  * `image_grid`**2 dVAE codes in raster order, embedded with a learned row and a learned column
    embedding added to the token embedding;
  * pre-LN resblocks (attention then MLP); attention is one softmax over text and image keys, with
    the layer's mask from `kernels/layouts.py` (row / column / conv pattern, or causal everywhere
    for `attention = "dense"`). Column layers transpose the image states so the row machinery
    applies (Fig. 11c);
  * loss = (text CE + w * image CE) / (1 + w), w = 7, each averaged over its own tokens.

Sequence: S = text_len + N (N = image_grid**2) positions; the output at position i predicts token
i + 1, so text logits cover text[:, 1:] and image logits cover all N image tokens (the last image
token's output is unused).

`forward(text, image)` is the full-sequence pass used for training. `KVCache` + `step()` decode
incrementally, gathering only the keys each layer's mask allows, and give the same logits as the
full pass (tests/trainer/test_transformer.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tessera.kernels.attention import attention
from tessera.kernels.block_sparse_attention import HAS_TRITON, block_sparse_attention
from tessera.kernels.layouts import Layout, inverse_order, layer_layouts, sequence_order
from tessera.trainer.config import TransformerModelConfig
from tessera.trainer.token_data import pad_text  # the text half of a token record (data layer)


def empty_text(batch: int, text_len: int, text_vocab: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """long[batch, text_len]: the empty caption (all padding), the unconditional input of guidance."""
    return (text_vocab + torch.arange(text_len, device=device)).expand(batch, text_len).clone()


# ------------------------------------------------------------------------------------------------
# Blocks


def _block_sparse_kernel():
    """The Triton block-sparse kernel on GPU hosts that have it, else None (CPU: dense SDPA with the mask)."""
    return block_sparse_attention if HAS_TRITON else None


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, kind: str, dropout_p: float) -> torch.Tensor:
    """Whole-sequence attention under a layer mask: the fast path for the device, same result."""
    if kind == "causal":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    if q.is_cuda and dropout_p == 0.0:
        kernel = _block_sparse_kernel()
        if kernel is not None:
            return kernel(q, k, v, mask)
    return attention(q, k, v, mask, dropout_p=dropout_p)


class CausalSelfAttention(nn.Module):
    """Multi-head attention under one layer's layout (a mask kind, maybe on transposed image states)."""

    def __init__(self, cfg: TransformerModelConfig, layout: Layout):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.layout = layout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout
        if layout.transposed:
            perm = sequence_order(layout.text_len, layout.grid, True)
            self.register_buffer("perm", perm, persistent=False)
            self.register_buffer("inv_perm", inverse_order(layout.text_len, layout.grid, True), persistent=False)
        # raster-order mask: used for prefixes and by the KV cache (transposition is only a layout trick)
        raster = Layout(layout.kind, layout.text_len, layout.grid, layout.conv_kernel, transposed=False)
        self.register_buffer("raster_mask", raster.mask().clone(), persistent=False)
        self.register_buffer("mask", layout.mask().clone(), persistent=False)

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, s, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        # (B, nh, S, hs)
        return tuple(t.view(b, s, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        b, _, s, _ = y.shape
        return self.proj(y.transpose(1, 2).reshape(b, s, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(x)
        s = x.shape[1]
        p = self.dropout if self.training else 0.0
        if self.layout.transposed and s == self.layout.seq_len:
            # paper App. B.1: transpose the image states so the column mask becomes contiguous runs
            q, k, v = q[:, :, self.perm], k[:, :, self.perm], v[:, :, self.perm]
            y = full_attention(q, k, v, self.mask, "column", p)[:, :, self.inv_perm]
        elif s == self.layout.seq_len:
            y = full_attention(q, k, v, self.mask, self.layout.kind, p)
        else:
            y = attention(q, k, v, self.raster_mask[:s, :s], dropout_p=p)
        return self._merge(y)

    def _keys_of(self, pos: int) -> slice | torch.Tensor:
        """The keys position `pos` attends, as a slice when they are contiguous (computed once per position)."""
        table = self.__dict__.setdefault("_key_table", {})
        key = (pos, self.raster_mask.device)
        sel = table.get(key)
        if sel is None:
            idx = torch.nonzero(self.raster_mask[pos, : pos + 1]).flatten()
            first, last = int(idx[0]), int(idx[-1])
            sel = slice(first, last + 1) if last - first + 1 == idx.numel() else idx.to(self.raster_mask.device)
            table[key] = sel
        return sel

    def step(self, x: torch.Tensor, cache: "LayerCache", pos: int) -> torch.Tensor:
        """x: (B, s_new, C) at positions [pos, pos + s_new); appends to `cache` and attends to it."""
        q, k, v = self._heads(x)
        s_new = x.shape[1]
        end = pos + s_new
        cache.k[:, :, pos:end] = k.to(cache.k.dtype)
        cache.v[:, :, pos:end] = v.to(cache.v.dtype)
        rows = self.raster_mask[pos:end, :end]
        if s_new == 1:
            # only the keys this position may attend (T + grid + 1 for a row layer, not all `end`)
            sel = self._keys_of(pos)
            kk, vv = cache.k[:, :, sel], cache.v[:, :, sel]
            y = F.scaled_dot_product_attention(q, kk.to(q.dtype), vv.to(q.dtype))
        else:
            y = attention(q, cache.k[:, :, :end].to(q.dtype), cache.v[:, :, :end].to(q.dtype), rows)
        return self._merge(y)


class MLP(nn.Module):
    def __init__(self, cfg: TransformerModelConfig):
        super().__init__()
        hidden = int(cfg.d_model * cfg.mlp_ratio)
        self.fc = nn.Linear(cfg.d_model, hidden)
        self.proj = nn.Linear(hidden, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LN resblock: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: TransformerModelConfig, layout: Layout):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg, layout)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.mlp(self.ln_2(x))

    def step(self, x: torch.Tensor, cache: "LayerCache", pos: int) -> torch.Tensor:
        x = x + self.attn.step(self.ln_1(x), cache, pos)
        return x + self.mlp(self.ln_2(x))


# ------------------------------------------------------------------------------------------------
# KV cache


@dataclass
class LayerCache:
    k: torch.Tensor  # (B, nh, S, hs)
    v: torch.Tensor


class KVCache:
    """Keys and values of every layer for `batch` sequences of up to S positions."""

    def __init__(self, model: "DALLE", batch: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        cfg = model.cfg
        p = next(model.parameters())
        dtype = dtype or p.dtype
        device = device or p.device
        shape = (batch, cfg.n_heads, model.seq_len, cfg.d_model // cfg.n_heads)
        self.layers = [
            LayerCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)) for _ in model.blocks
        ]
        self.pos = 0


# ------------------------------------------------------------------------------------------------
# The model


class DALLE(nn.Module):
    """forward(text: long[B, text_len], image: long[B, grid**2]) -> (text_logits[B, text_len-1, Vt], image_logits[B, N, Vi])."""

    def __init__(self, cfg: TransformerModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        t, g, d = cfg.text_len, cfg.image_grid, cfg.d_model
        self.n_image = g * g
        self.seq_len = t + self.n_image
        self.text_vocab_total = cfg.text_vocab + t  # BPE ids, then one padding token per position
        self.text_emb = nn.Embedding(self.text_vocab_total, d)
        self.text_pos = nn.Embedding(t, d)
        self.image_emb = nn.Embedding(cfg.image_vocab, d)
        self.image_row = nn.Embedding(g, d)
        self.image_col = nn.Embedding(g, d)
        self.drop = nn.Dropout(cfg.dropout)
        layouts = layer_layouts(cfg.n_layers, t, g, cfg.conv_kernel, cfg.attention)
        self.blocks = nn.ModuleList(Block(cfg, lay) for lay in layouts)
        self.ln_f = nn.LayerNorm(d)
        self.text_head = nn.Linear(d, self.text_vocab_total, bias=False)
        self.image_head = nn.Linear(d, cfg.image_vocab, bias=False)
        self.register_buffer("image_rows", torch.arange(self.n_image) // g, persistent=False)
        self.register_buffer("image_cols", torch.arange(self.n_image) % g, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # residual projections scaled by depth (GPT-2)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    @property
    def layer_kinds(self) -> list[str]:
        return [b.attn.layout.kind for b in self.blocks]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- input checks and embeddings ---------------------------------------------------------------

    def check_inputs(self, text: torch.Tensor, image: torch.Tensor | None) -> None:
        cfg = self.cfg
        if text.dim() != 2 or text.shape[1] != cfg.text_len:
            raise ValueError(f"text: expected long[B, {cfg.text_len}], got shape {tuple(text.shape)}")
        if text.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"text: expected integer ids, got {text.dtype}")
        if text.numel() and (text.min() < 0 or text.max() >= self.text_vocab_total):
            raise ValueError(
                f"text: ids must be in [0, {self.text_vocab_total}) (BPE ids < {cfg.text_vocab}, padding above), got [{int(text.min())}, {int(text.max())}]"
            )
        if image is not None:
            if image.dim() != 2 or image.shape[1] > self.n_image or image.shape[0] != text.shape[0]:
                raise ValueError(f"image: expected long[{text.shape[0]}, <= {self.n_image}], got shape {tuple(image.shape)}")
            if image.numel() and (image.min() < 0 or image.max() >= cfg.image_vocab):
                raise ValueError(f"image: codes must be in [0, {cfg.image_vocab}), got [{int(image.min())}, {int(image.max())}]")

    def embed_text(self, text: torch.Tensor, start: int = 0) -> torch.Tensor:
        pos = torch.arange(start, start + text.shape[1], device=text.device)
        return self.text_emb(text) + self.text_pos(pos)

    def embed_image(self, image: torch.Tensor, start: int = 0) -> torch.Tensor:
        """image: codes of image positions [start, start + n)."""
        idx = torch.arange(start, start + image.shape[1], device=image.device)
        return self.image_emb(image) + self.image_row(self.image_rows[idx]) + self.image_col(self.image_cols[idx])

    # -- full pass ----------------------------------------------------------------------------------

    def hidden(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.embed_text(text), self.embed_image(image)], dim=1)  # (B, S, C)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_inputs(text, image)
        t = self.cfg.text_len
        h = self.hidden(text, image)
        text_logits = self.text_head(h[:, : t - 1])  # predicts text[:, 1:]
        image_logits = self.image_head(h[:, t - 1 : t - 1 + image.shape[1]])  # predicts image[:, :n]
        return text_logits, image_logits

    def loss(self, text: torch.Tensor, image: torch.Tensor, image_loss_weight: float = 7.0) -> dict[str, torch.Tensor]:
        """(text CE + w * image CE) / (1 + w), each CE averaged over its own tokens (paper section 2.2)."""
        text_logits, image_logits = self(text, image)
        text_ce = F.cross_entropy(text_logits.float().reshape(-1, text_logits.shape[-1]), text[:, 1:].reshape(-1))
        image_ce = F.cross_entropy(image_logits.float().reshape(-1, image_logits.shape[-1]), image.reshape(-1))
        loss = (text_ce + image_loss_weight * image_ce) / (1.0 + image_loss_weight)
        return {"loss": loss, "text_ce": text_ce.detach(), "image_ce": image_ce.detach()}

    # -- incremental decoding ----------------------------------------------------------------------

    def new_cache(self, batch: int, dtype: torch.dtype | None = None) -> KVCache:
        return KVCache(self, batch, dtype=dtype)

    def step(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run embedded inputs x (B, s_new, C) at positions [cache.pos, cache.pos + s_new); returns final hidden states."""
        pos = cache.pos
        if pos + x.shape[1] > self.seq_len:
            raise ValueError(f"KV cache: {pos} + {x.shape[1]} positions exceed the sequence length {self.seq_len}")
        for block, lc in zip(self.blocks, cache.layers):
            x = block.step(x, lc, pos)
        cache.pos = pos + x.shape[1]
        return self.ln_f(x)

    def prefill(self, text: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed the whole caption; returns image logits for image position 0, (B, Vi)."""
        self.check_inputs(text, None)
        h = self.step(self.embed_text(text), cache)
        return self.image_head(h[:, -1])

    def decode_next(self, codes: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed image code(s) of the next position(s) (B, s); returns logits for the position after the last, (B, Vi)."""
        start = cache.pos - self.cfg.text_len
        h = self.step(self.embed_image(codes, start=start), cache)
        return self.image_head(h[:, -1])

    def image_logits_full(self, text: torch.Tensor, image_prefix: torch.Tensor) -> torch.Tensor:
        """Without a cache: logits of image position n = image_prefix.shape[1] from a full pass over the prefix."""
        self.check_inputs(text, image_prefix)
        x = torch.cat([self.embed_text(text), self.embed_image(image_prefix)], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.image_head(self.ln_f(x[:, -1]))


__all__ = ["DALLE", "KVCache", "pad_text", "empty_text"]
