"""Block-sparse flash attention in Triton, forward and backward, with a pure-torch reference.

The DALL-E transformer (Ramesh et al. 2021, App. B.1) uses per-layer sparse masks (row, column,
convolutional; text causal, every image token sees all text). With block size `block`, most
`block x block` tiles of a `[S, S]` mask are empty; this kernel iterates only over the non-empty
tiles of each query-block row (a CSR index built once per mask), and, for dK/dV, over the non-empty
tiles of each key-block column (the transposed CSR index). Tiles that are only partly allowed load
the token mask for that tile and apply it inside; full tiles skip that load.

Structure follows Triton's tutorial 06 (fused attention, FlashAttention-2 style):
  forward   -- one program per (query block, batch*head): online softmax in base 2 with fp32
               accumulators; stores the per-row log-sum-exp for the backward.
  backward  -- delta = rowsum(dO * O) (a small kernel), then one kernel for dK/dV (a program per key block,
               walking the transposed index) and one for dQ (a program per query block).
No atomics: each output tile is owned by exactly one program.

Shapes: q, k, v, out are [B, H, S, D]; mask is bool [S, S] (True = query may attend key), shared by
every batch element and head. S need not be a multiple of `block`: the mask is padded with False,
so blocks that touch the padding are "partial" and padded rows/columns are masked out.

`block_sparse_attention_reference` is the CPU path and the test oracle (same signature). A query
row with no allowed key gets output 0 in both (SDPA would give NaN); the DALL-E masks always let a
token see itself, so this only concerns padding.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from tessera.kernels._triton import HAS_TRITON, tl, triton  # noqa: F401
from tessera.kernels._triton import lazy_jit as _lazy_jit
from tessera.kernels.layouts import Layout, block_layout, block_partial

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_BLOCKS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# The block index (built once per mask and block size)
# ----------------------------------------------------------------------------------------------
@dataclass
class BlockSparseIndex:
    """CSR-like description of a token mask at block granularity.

    row_ptr[m]..row_ptr[m+1] index into col_idx/row_partial: the non-empty key blocks of query
    block m, ascending. col_ptr/row_idx/col_partial: the same for the transposed layout (the
    non-empty query blocks of each key block), used by the dK/dV kernel. mask_i8 is the token mask
    padded to [S_pad, S_pad] with zeros (and its transpose), read only for partial blocks.
    """

    seq_len: int
    block: int
    n_blocks: int
    layout: torch.Tensor  # bool [nb, nb]
    partial: torch.Tensor  # bool [nb, nb]
    row_ptr: torch.Tensor  # int32 [nb + 1]
    col_idx: torch.Tensor  # int32 [nnz]
    row_partial: torch.Tensor  # int32 [nnz]
    col_ptr: torch.Tensor  # int32 [nb + 1]
    row_idx: torch.Tensor  # int32 [nnz]
    col_partial: torch.Tensor  # int32 [nnz]
    mask_i8: torch.Tensor  # int8 [S_pad, S_pad]
    mask_i8_t: torch.Tensor  # its transpose, contiguous: the dK/dV kernel reads S^T tiles row by row
    allowed_pairs: int  # number of True entries of the token mask

    @property
    def nnz_blocks(self) -> int:
        return int(self.col_idx.numel())

    @property
    def padded_len(self) -> int:
        return self.n_blocks * self.block

    def to(self, device) -> "BlockSparseIndex":
        fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return BlockSparseIndex(**fields)


def build_index(mask: torch.Tensor, block: int = 64) -> BlockSparseIndex:
    """Build the block index of a bool [S, S] token mask (on the mask's device)."""
    if mask.dtype != torch.bool or mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        raise ValueError(f"mask must be a square bool tensor [S, S], got {tuple(mask.shape)} {mask.dtype}")
    if block not in SUPPORTED_BLOCKS:
        raise ValueError(f"block must be one of {SUPPORTED_BLOCKS}, got {block}")
    s = mask.shape[0]
    nb = -(-s // block)
    sp = nb * block
    padded = torch.zeros(sp, sp, dtype=torch.bool, device=mask.device)
    padded[:s, :s] = mask
    layout = block_layout(mask, block)  # the one definition, kernels/layouts.py
    partial = block_partial(mask, block)

    def csr(lay: torch.Tensor, part: torch.Tensor):
        rows, cols = lay.nonzero(as_tuple=True)  # row-major order: cols ascending within a row
        ptr = torch.zeros(nb + 1, dtype=torch.int32, device=mask.device)
        ptr[1:] = torch.cumsum(lay.sum(dim=1), 0).to(torch.int32)
        return ptr, cols.to(torch.int32).contiguous(), part[rows, cols].to(torch.int32).contiguous()

    row_ptr, col_idx, row_partial = csr(layout, partial)
    col_ptr, row_idx, col_partial = csr(layout.t(), partial.t())
    return BlockSparseIndex(
        seq_len=s,
        block=block,
        n_blocks=nb,
        layout=layout,
        partial=partial,
        row_ptr=row_ptr,
        col_idx=col_idx,
        row_partial=row_partial,
        col_ptr=col_ptr,
        row_idx=row_idx,
        col_partial=col_partial,
        mask_i8=padded.to(torch.int8).contiguous(),
        mask_i8_t=padded.t().to(torch.int8).contiguous(),
        allowed_pairs=int(mask.sum()),
    )


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@_lazy_jit
def _bsa_fwd_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    MaskI8,
    RowPtr,
    ColIdx,
    RowPartial,
    qk_scale,
    S,
    S_PAD,
    BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PREC: tl.constexpr,
):
    m_blk = tl.program_id(0)
    bh = tl.program_id(1)
    base = bh.to(tl.int64) * S * HEAD_DIM
    offs_m = m_blk * BLOCK + tl.arange(0, BLOCK)
    offs_b = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < S
    q = tl.load(Q + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)

    start = tl.load(RowPtr + m_blk)
    end = tl.load(RowPtr + m_blk + 1)
    for i in range(start, end):
        n_blk = tl.load(ColIdx + i)
        is_partial = tl.load(RowPartial + i)
        offs_n = n_blk * BLOCK + offs_b
        col_ok = offs_n < S
        k = tl.load(K + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(V + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        if is_partial != 0:
            allowed = tl.load(MaskI8 + offs_m[:, None] * S_PAD + offs_n[None, :])
            s = tl.where(allowed != 0, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with nothing allowed yet keeps m = -inf; shift by 0 there so exp2 gives 0, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    # +inf for rows that saw no key: the backward's exp2(s - lse) is then 0 for them
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(Out + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(Lse + bh.to(tl.int64) * S_PAD + offs_m, lse)


@_lazy_jit
def _bsa_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    DK,
    DV,
    MaskI8T,
    ColPtr,
    RowIdx,
    ColPartial,
    sm_scale,
    qk_scale,
    S,
    S_PAD,
    BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PREC: tl.constexpr,
):
    n_blk = tl.program_id(0)
    bh = tl.program_id(1)
    base = bh.to(tl.int64) * S * HEAD_DIM
    stat_base = bh.to(tl.int64) * S_PAD
    offs_n = n_blk * BLOCK + tl.arange(0, BLOCK)
    offs_b = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < S
    k = tl.load(K + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)

    start = tl.load(ColPtr + n_blk)
    end = tl.load(ColPtr + n_blk + 1)
    for i in range(start, end):
        m_blk = tl.load(RowIdx + i)
        is_partial = tl.load(ColPartial + i)
        offs_m = m_blk * BLOCK + offs_b
        row_ok = offs_m < S
        q = tl.load(Q + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(Lse + stat_base + offs_m)
        delta = tl.load(Delta + stat_base + offs_m)
        s_t = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # [BLOCK_N, BLOCK_M] = S^T
        if is_partial != 0:
            allowed_t = tl.load(MaskI8T + offs_n[:, None] * S_PAD + offs_m[None, :])
            s_t = tl.where(allowed_t != 0, s_t, float("-inf"))
        p_t = tl.math.exp2(s_t - lse[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PREC)

    dk = dk * sm_scale
    tl.store(DK + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@_lazy_jit
def _bsa_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    DQ,
    MaskI8,
    RowPtr,
    ColIdx,
    RowPartial,
    sm_scale,
    qk_scale,
    S,
    S_PAD,
    BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PREC: tl.constexpr,
):
    m_blk = tl.program_id(0)
    bh = tl.program_id(1)
    base = bh.to(tl.int64) * S * HEAD_DIM
    stat_base = bh.to(tl.int64) * S_PAD
    offs_m = m_blk * BLOCK + tl.arange(0, BLOCK)
    offs_b = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < S
    q = tl.load(Q + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(Lse + stat_base + offs_m)
    delta = tl.load(Delta + stat_base + offs_m)
    dq = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)

    start = tl.load(RowPtr + m_blk)
    end = tl.load(RowPtr + m_blk + 1)
    for i in range(start, end):
        n_blk = tl.load(ColIdx + i)
        is_partial = tl.load(RowPartial + i)
        offs_n = n_blk * BLOCK + offs_b
        col_ok = offs_n < S
        k = tl.load(K + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(V + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if is_partial != 0:
            allowed = tl.load(MaskI8 + offs_m[:, None] * S_PAD + offs_n[None, :])
            s = tl.where(allowed != 0, s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)

    dq = dq * sm_scale
    tl.store(DQ + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@_lazy_jit
def _bsa_bwd_delta_kernel(Out, DO, Delta, S, S_PAD, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """delta = rowsum(dO * O) in fp32, straight into the padded [B*H, S_PAD] buffer (0 past S)."""
    m_blk = tl.program_id(0)
    bh = tl.program_id(1)
    base = bh.to(tl.int64) * S * HEAD_DIM
    offs_m = m_blk * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < S
    o = tl.load(Out + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    tl.store(Delta + bh.to(tl.int64) * S_PAD + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1))


# ----------------------------------------------------------------------------------------------
# Wrappers
# ----------------------------------------------------------------------------------------------
# Launch settings per (kernel, block, head_dim), measured on an H100 (fp16, the paper's layouts at
# 256 + 32x32 tokens; bench/bench_attention_kernels.py --sweep, BENCHMARKS.md); the interpreter
# ignores them. Other shapes get the defaults of `_launch_opts`.
LAUNCH: dict[tuple[str, int, int], dict] = {
    ("fwd", 64, 64): {"num_warps": 4, "num_stages": 3},
    ("dkdv", 64, 64): {"num_warps": 4, "num_stages": 1},  # 13 % faster than 2 stages over the 4 layouts
    ("dq", 64, 64): {"num_warps": 4, "num_stages": 3},
    # head dim 128 (bf16, batch 16): 4 warps instead of 8 cut every kernel by ~40 %
    ("fwd", 64, 128): {"num_warps": 4, "num_stages": 2},
    ("dkdv", 64, 128): {"num_warps": 4, "num_stages": 1},
    ("dq", 64, 128): {"num_warps": 4, "num_stages": 2},
}


def _launch_opts(kernel: str, block: int, head_dim: int) -> dict:
    """num_warps / num_stages for kernel "fwd", "dkdv", "dq" or "delta"."""
    hit = LAUNCH.get((kernel, block, head_dim))
    if hit is not None:
        return dict(hit)
    if kernel == "delta":
        return {"num_warps": 4, "num_stages": 1}
    warps = 8 if block * head_dim >= 128 * 64 else 4
    stages = 2 if kernel != "fwd" or head_dim > 64 else 3
    return {"num_warps": warps, "num_stages": stages}


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: fp32 inputs get fp32 products (Triton's default on a GPU would be
    TF32, ~1e-3 relative error); fp16/bf16 products are exact in the tensor cores either way."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_inputs(q, k, v, index: BlockSparseIndex):
    if not HAS_TRITON:
        raise RuntimeError("block_sparse_attention needs triton; use block_sparse_attention_reference on CPU")
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must all be [B, H, S, D] with equal shapes, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype of {SUPPORTED_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim must be one of {SUPPORTED_HEAD_DIMS}, got {q.shape[-1]}")
    if q.shape[2] != index.seq_len:
        raise ValueError(f"mask is for S={index.seq_len} but q has S={q.shape[2]}")


class BlockSparseAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, index: BlockSparseIndex, sm_scale: float):
        _check_inputs(q, k, v, index)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        b, h, s, d = q.shape
        blk, nb, sp = index.block, index.n_blocks, index.padded_len
        out = torch.empty_like(q)
        lse = torch.empty(b * h, sp, device=q.device, dtype=torch.float32)
        grid = (nb, b * h)
        _bsa_fwd_kernel[grid](
            q,
            k,
            v,
            out,
            lse,
            index.mask_i8,
            index.row_ptr,
            index.col_idx,
            index.row_partial,
            sm_scale * _LOG2E,
            s,
            sp,
            BLOCK=blk,
            HEAD_DIM=d,
            PREC=_precision(q.dtype),
            **_launch_opts("fwd", blk, d),
        )
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.index = index
        ctx.sm_scale = sm_scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        index: BlockSparseIndex = ctx.index
        dout = dout.contiguous()
        b, h, s, d = q.shape
        blk, nb, sp = index.block, index.n_blocks, index.padded_len
        grid = (nb, b * h)
        delta = torch.empty(b * h, sp, device=q.device, dtype=torch.float32)
        _bsa_bwd_delta_kernel[grid](out, dout, delta, s, sp, BLOCK=blk, HEAD_DIM=d, **_launch_opts("delta", blk, d))
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        prec = _precision(q.dtype)
        qk_scale = ctx.sm_scale * _LOG2E
        _bsa_bwd_dkdv_kernel[grid](
            q,
            k,
            v,
            dout,
            lse,
            delta,
            dk,
            dv,
            index.mask_i8_t,
            index.col_ptr,
            index.row_idx,
            index.col_partial,
            ctx.sm_scale,
            qk_scale,
            s,
            sp,
            BLOCK=blk,
            HEAD_DIM=d,
            PREC=prec,
            **_launch_opts("dkdv", blk, d),
        )
        _bsa_bwd_dq_kernel[grid](
            q,
            k,
            v,
            dout,
            lse,
            delta,
            dq,
            index.mask_i8,
            index.row_ptr,
            index.col_idx,
            index.row_partial,
            ctx.sm_scale,
            qk_scale,
            s,
            sp,
            BLOCK=blk,
            HEAD_DIM=d,
            PREC=prec,
            **_launch_opts("dq", blk, d),
        )
        return dq, dk, dv, None, None


_INDEX_CACHE: "OrderedDict[tuple, tuple[torch.Tensor, BlockSparseIndex]]" = OrderedDict()
_INDEX_CACHE_SIZE = 32


def _cached_index(mask: torch.Tensor, block: int, device: torch.device) -> BlockSparseIndex:
    """build_index, remembered per mask tensor (tessera.kernels.layouts caches one mask per layer kind, so
    a model hits this every call). The key holds the tensor itself, so its id cannot be reused
    while cached, and its version counter, so an in-place edit rebuilds the index."""
    key = (id(mask), mask._version, block, str(device))
    hit = _INDEX_CACHE.get(key)
    if hit is not None and hit[0] is mask:
        _INDEX_CACHE.move_to_end(key)
        return hit[1]
    index = build_index(mask.to(device), block)
    _INDEX_CACHE[key] = (mask, index)
    while len(_INDEX_CACHE) > _INDEX_CACHE_SIZE:
        _INDEX_CACHE.popitem(last=False)
    return index


def block_sparse_attention(q, k, v, mask, block: int = 64, sm_scale: float | None = None):
    """Masked softmax attention over [B, H, S, D] tensors with the Triton block-sparse kernels.

    `mask` is a `tessera.kernels.layouts.Layout`, a bool [S, S] token mask (True = may attend; its block
    index is cached per tensor) or a prebuilt `BlockSparseIndex` from `build_index(mask, block)`.
    Queries and keys cover the same S positions (training); the KV-cache case of sampling, with
    fewer queries than keys, stays on `tessera.kernels.attention.attention`.
    Differentiable in q, k and v.
    """
    if isinstance(mask, Layout):
        mask = mask.mask()  # tessera.kernels.layouts caches it: the same tensor every call, so the index cache hits
    if isinstance(mask, BlockSparseIndex):
        index = mask
        if index.block != block:
            raise ValueError(f"index was built for block={index.block}, called with block={block}")
    else:
        index = _cached_index(mask, block, q.device)
    if index.row_ptr.device != q.device:
        index = index.to(q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    return BlockSparseAttentionFunction.apply(q, k, v, index, scale)


def block_sparse_attention_reference(q, k, v, mask, block: int = 64, sm_scale: float | None = None):
    """Pure-torch oracle with the same signature (fp32 math, result in q's dtype).

    `block` is accepted for signature parity and does not change the result. Rows with no
    allowed key give 0.
    """
    if isinstance(mask, Layout):
        mask = mask.mask()
    if isinstance(mask, BlockSparseIndex):
        mask = mask.mask_i8[: mask.seq_len, : mask.seq_len].bool()
    mask = mask.to(q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(mask.any(dim=-1, keepdim=True), probs, torch.zeros_like(probs))
    return torch.matmul(probs, v.float()).to(q.dtype)


def attention_flops(index: BlockSparseIndex, batch: int, heads: int, head_dim: int, backward: bool = True) -> dict:
    """FLOP counts for one call: `useful` counts only allowed (query, key) pairs, `blocks` what the
    kernel computes (every non-empty tile in full). Forward: 2 matmuls (QK^T, PV) = 4*D flops per
    pair; backward: 5 matmuls (recomputed QK^T, dV, dP, dQ, dK) = 10*D per pair (2.5x forward)."""
    per_pair = 4 * head_dim * (3.5 if backward else 1.0)
    pairs_blocks = index.nnz_blocks * index.block * index.block
    return {
        "useful": batch * heads * index.allowed_pairs * per_pair,
        "blocks": batch * heads * pairs_blocks * per_pair,
    }
