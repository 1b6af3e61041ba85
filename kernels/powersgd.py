"""PowerSGD compute kernels in Triton, each beside a pure-torch reference with the same signature.

PowerSGD (Vogels et al. 2019, "PowerSGD: Practical Low-Rank Gradient Compression for Distributed
Optimization") approximates each gradient matrix M [m, n] by P Q^T with P [m, r], Q [n, r]. One
step needs, per matrix (batched here over matrices of equal shape, [N, m, n]):

  project(M, Q)                 P = M Q           (before the all-reduce of P)
  orthogonalize(P)              P <- orth(P)      (after it)
  project(M, P, transpose=True) Q = M^T P         (before the all-reduce of Q)
  decompress_with_error(M, P, Q, out, error)
                                out = P Q^T and error = M - P Q^T in one pass over M
                                (error feedback; `out` may alias M)

Orthogonalization: the paper's Gram-Schmidt was numerically unstable for the DALL-E authors
(Ramesh et al. 2021, App. D), who used Householder orthogonalization of the input plus a small
multiple of the identity. That is what both versions here compute: the Q factor of
P + eps * I[m, r] (eps = 1e-6), with signs fixed so that diag(R) > 0 (then it equals the
Gram-Schmidt result whenever P has full rank, and stays finite when it does not).

P and Q are kept in fp32; M may be fp16/bf16/fp32. The Triton versions accept CUDA tensors, or CPU
tensors under TRITON_INTERPRET=1 (tests); cluster/powersgd.py picks the Triton versions on CUDA
and the references on CPU.
"""

from __future__ import annotations

import torch

from tessera.kernels._triton import HAS_TRITON, tl, triton  # noqa: F401
from tessera.kernels._triton import lazy_jit as _lazy_jit

EPS = 1e-6
MAX_RANK = 64


def _rank_block(r: int) -> int:
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"rank must be in 1..{MAX_RANK}, got {r}")
    return max(16, triton.next_power_of_2(r))  # tl.dot needs every dimension >= 16


# ----------------------------------------------------------------------------------------------
# Projection: C[b] = A[b] @ B[b], A = M or M^T (through strides), B and C fp32 [.., r]
# ----------------------------------------------------------------------------------------------
@_lazy_jit
def _project_kernel(
    A,
    B,
    C,
    ROWS,
    K,
    R,
    sa_b,
    sa_r,
    sa_k,
    sb_b,
    sb_k,
    sb_r,
    sc_b,
    sc_r,
    sc_c,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        a = tl.load(
            A + b * sa_b + rows[:, None] * sa_r + ks[None, :] * sa_k, mask=(rows[:, None] < ROWS) & (ks[None, :] < K), other=0.0
        ).to(tl.float32)
        bb = tl.load(
            B + b * sb_b + ks[:, None] * sb_k + offs_r[None, :] * sb_r, mask=(ks[:, None] < K) & (offs_r[None, :] < R), other=0.0
        ).to(tl.float32)
        acc += tl.dot(a, bb, input_precision="ieee")
    tl.store(C + b * sc_b + rows[:, None] * sc_r + offs_r[None, :] * sc_c, acc, mask=(rows[:, None] < ROWS) & (offs_r[None, :] < R))


def project(M: torch.Tensor, X: torch.Tensor, transpose: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """P = M @ X (X [N, n, r]) or, with transpose=True, Q = M^T @ X (X [N, m, r]); fp32 [N, ., r]."""
    n_mat, m, n = M.shape
    rows, k = (n, m) if transpose else (m, n)
    if X.shape[0] != n_mat or X.shape[1] != k:
        raise ValueError(f"X must be [{n_mat}, {k}, r] for M {tuple(M.shape)} (transpose={transpose}), got {tuple(X.shape)}")
    r = X.shape[2]
    br = _rank_block(r)
    if out is None:
        out = torch.empty(n_mat, rows, r, device=M.device, dtype=torch.float32)
    sa_b, sa_0, sa_1 = M.stride()
    sa_r, sa_k = (sa_1, sa_0) if transpose else (sa_0, sa_1)
    block_m = 64 if rows >= 64 else 16
    grid = (triton.cdiv(rows, block_m), n_mat)
    _project_kernel[grid](
        M,
        X,
        out,
        rows,
        k,
        r,
        sa_b,
        sa_r,
        sa_k,
        *X.stride(),
        *out.stride(),
        BLOCK_M=block_m,
        BLOCK_K=32,
        BLOCK_R=br,
    )
    return out


def project_reference(M: torch.Tensor, X: torch.Tensor, transpose: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    Mf = M.float()
    res = torch.bmm(Mf.transpose(1, 2) if transpose else Mf, X.float())
    if out is None:
        return res
    out.copy_(res)
    return out


# ----------------------------------------------------------------------------------------------
# Orthogonalization: Householder QR of P + eps * I, one program per matrix
# ----------------------------------------------------------------------------------------------
@_lazy_jit
def _householder_kernel(
    P,
    V,
    ROWS,
    R,
    eps,
    sp_b,
    sp_r,
    sp_c,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    Pb = P + b * sp_b
    Vb = V + b * ROWS * R  # V: contiguous fp32 [N, ROWS, R] workspace
    offs = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_R)
    col_ok = cols < R

    # 0. A = P + eps * I  (keeps zero or dependent columns from producing 0/0)
    _hh_add_to_diagonal(Pb, ROWS, sp_r, sp_c, offs, cols, col_ok, eps, BLOCK_M)
    tl.debug_barrier()

    # 1. Factor: reflections H_k = I - beta_k v_k v_k^T zeroing A[k+1:, k]; columns <= k are
    #    final (R's upper part), so H_k is applied to the columns > k only
    alphas = tl.zeros([BLOCK_R], dtype=tl.float32)
    betas = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k in range(0, R):
        alpha, beta = _hh_reflector(Pb, Vb, ROWS, R, sp_r, sp_c, offs, k, BLOCK_M)
        _hh_reflect(Pb, Vb, ROWS, R, sp_r, sp_c, offs, cols, col_ok, k, beta, k + 1, BLOCK_M, BLOCK_R)
        alphas = tl.where(cols == k, alpha, alphas)
        betas = tl.where(cols == k, beta, betas)

    # 2. Q = H_0 H_1 ... H_{R-1} I[:, :R], applied right to left, written over P; then fix signs
    #    so that diag(R) = alpha * sign(alpha) > 0.
    _hh_store_identity(Pb, ROWS, sp_r, sp_c, offs, cols, col_ok, BLOCK_M)
    tl.debug_barrier()
    for kk in range(0, R):
        k = R - 1 - kk
        beta = tl.sum(tl.where(cols == k, betas, 0.0), 0)
        _hh_reflect(Pb, Vb, ROWS, R, sp_r, sp_c, offs, cols, col_ok, k, beta, 0, BLOCK_M, BLOCK_R)
    sign = tl.where(alphas < 0, -1.0, 1.0)
    _hh_scale_columns(Pb, ROWS, sp_r, sp_c, offs, cols, col_ok, sign, BLOCK_M)


# The kernel's helpers, inlined by Triton. A kernel can call only triton.jit functions of its own
# kind (compiled or interpreted), and a `lazy_jit` object is neither, so these are decorated at
# import: TRITON_INTERPRET must be set before then (tests/conftest.py does), as it must be before
# triton is imported for the kernels' own calls into triton.language to run in the interpreter.
def _helper_jit(fn):
    return triton.jit(fn) if HAS_TRITON else fn


@_helper_jit
def _hh_add_to_diagonal(Pb, ROWS, sp_r, sp_c, offs, cols, col_ok, eps, BLOCK_M: tl.constexpr):
    """A[i, i] += eps for the columns of A (the matrix at Pb)."""
    for c0 in range(0, ROWS, BLOCK_M):
        rows = c0 + offs
        ok = (rows[:, None] < ROWS) & col_ok[None, :]
        ptrs = Pb + rows[:, None] * sp_r + cols[None, :] * sp_c
        a = tl.load(ptrs, mask=ok, other=0.0)
        a = tl.where(rows[:, None] == cols[None, :], a + eps, a)
        tl.store(ptrs, a, mask=ok)


@_helper_jit
def _hh_reflector(Pb, Vb, ROWS, R, sp_r, sp_c, offs, k, BLOCK_M: tl.constexpr):
    """The reflection zeroing A[k+1:, k]: stores v_k as column k of V; returns (alpha_k, beta_k)."""
    sq_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    x0_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, ROWS, BLOCK_M):
        rows = c0 + offs
        x = tl.load(Pb + rows * sp_r + k * sp_c, mask=(rows < ROWS) & (rows >= k), other=0.0)
        sq_acc += x * x
        x0_acc += tl.where(rows == k, x, 0.0)
    sq = tl.sum(sq_acc, 0)
    x0 = tl.sum(x0_acc, 0)
    nrm = tl.sqrt(sq)
    alpha = tl.where(x0 >= 0, -nrm, nrm)  # opposite sign to x0: no cancellation in x0 - alpha
    v0 = x0 - alpha
    vnorm2 = sq - x0 * x0 + v0 * v0
    beta = tl.where(vnorm2 > 0, 2.0 / tl.where(vnorm2 > 0, vnorm2, 1.0), 0.0)
    for c0 in range(0, ROWS, BLOCK_M):
        rows = c0 + offs
        x = tl.load(Pb + rows * sp_r + k * sp_c, mask=(rows < ROWS) & (rows >= k), other=0.0)
        tl.store(Vb + rows * R + k, tl.where(rows == k, v0, x), mask=rows < ROWS)
    tl.debug_barrier()
    return alpha, beta


@_helper_jit
def _hh_reflect(Pb, Vb, ROWS, R, sp_r, sp_c, offs, cols, col_ok, k, beta, first_col, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """A <- H_k A = A - v_k (beta_k v_k^T A) on the columns >= first_col of A (the others unchanged)."""
    w = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, ROWS, BLOCK_M):
        rows = c0 + offs
        ok = (rows[:, None] < ROWS) & col_ok[None, :]
        a = tl.load(Pb + rows[:, None] * sp_r + cols[None, :] * sp_c, mask=ok, other=0.0)
        v = tl.load(Vb + rows * R + k, mask=rows < ROWS, other=0.0)
        w += tl.sum(v[:, None] * a, 0)
    w = tl.where(cols >= first_col, w * beta, 0.0)
    for c0 in range(0, ROWS, BLOCK_M):
        rows = c0 + offs
        ok = (rows[:, None] < ROWS) & col_ok[None, :]
        ptrs = Pb + rows[:, None] * sp_r + cols[None, :] * sp_c
        a = tl.load(ptrs, mask=ok, other=0.0)
        v = tl.load(Vb + rows * R + k, mask=rows < ROWS, other=0.0)
        tl.store(ptrs, a - v[:, None] * w[None, :], mask=ok)
    tl.debug_barrier()


@_helper_jit
def _hh_store_identity(Pb, ROWS, sp_r, sp_c, offs, cols, col_ok, BLOCK_M: tl.constexpr):
    """A <- I[:, :R]."""
    for c0 in range(0, ROWS, BLOCK_M):
        rows = c0 + offs
        ok = (rows[:, None] < ROWS) & col_ok[None, :]
        e = tl.where(rows[:, None] == cols[None, :], 1.0, 0.0)
        tl.store(Pb + rows[:, None] * sp_r + cols[None, :] * sp_c, e, mask=ok)


@_helper_jit
def _hh_scale_columns(Pb, ROWS, sp_r, sp_c, offs, cols, col_ok, scale, BLOCK_M: tl.constexpr):
    """A[:, j] *= scale[j]."""
    for c0 in range(0, ROWS, BLOCK_M):
        rows = c0 + offs
        ok = (rows[:, None] < ROWS) & col_ok[None, :]
        ptrs = Pb + rows[:, None] * sp_r + cols[None, :] * sp_c
        a = tl.load(ptrs, mask=ok, other=0.0)
        tl.store(ptrs, a * scale[None, :], mask=ok)


def orthogonalize(P: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """In place: P [N, m, r] fp32 (m >= r) becomes the Q factor of P + eps*I with diag(R) > 0."""
    if P.dtype != torch.float32 or P.dim() != 3 or P.shape[1] < P.shape[2]:
        raise ValueError(f"P must be fp32 [N, m, r] with m >= r, got {tuple(P.shape)} {P.dtype}")
    n_mat, m, r = P.shape
    br = _rank_block(r)
    work = torch.zeros(n_mat, m, r, device=P.device, dtype=torch.float32)
    block_m = max(16, min(256, triton.next_power_of_2(m), 8192 // br))
    _householder_kernel[(n_mat,)](P, work, m, r, float(eps), *P.stride(), BLOCK_M=block_m, BLOCK_R=br, num_warps=4)
    return P


def orthogonalize_reference(P: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    n_mat, m, r = P.shape
    eye = torch.eye(m, r, device=P.device, dtype=P.dtype)
    q, rr = torch.linalg.qr(P + eps * eye)  # LAPACK/cuSOLVER Householder QR
    sign = torch.where(torch.diagonal(rr, dim1=1, dim2=2) < 0, -1.0, 1.0).to(P.dtype)
    P.copy_(q * sign[:, None, :])
    return P


# ----------------------------------------------------------------------------------------------
# Decompression fused with the error-feedback update
# ----------------------------------------------------------------------------------------------
@_lazy_jit
def _decompress_kernel(
    M,
    P,
    Q,
    Out,
    Err,
    ROWS,
    COLS,
    R,
    sm_b,
    sm_r,
    sm_c,
    sp_b,
    sp_r,
    sp_k,
    sq_b,
    sq_r,
    sq_k,
    so_b,
    so_r,
    so_c,
    se_b,
    se_r,
    se_c,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_R)
    p = tl.load(P + b * sp_b + rows[:, None] * sp_r + ks[None, :] * sp_k, mask=(rows[:, None] < ROWS) & (ks[None, :] < R), other=0.0)
    q = tl.load(Q + b * sq_b + cols[:, None] * sq_r + ks[None, :] * sq_k, mask=(cols[:, None] < COLS) & (ks[None, :] < R), other=0.0)
    approx = tl.dot(p, tl.trans(q), input_precision="ieee")  # [BLOCK_M, BLOCK_N] fp32
    ok = (rows[:, None] < ROWS) & (cols[None, :] < COLS)
    m = tl.load(M + b * sm_b + rows[:, None] * sm_r + cols[None, :] * sm_c, mask=ok, other=0.0).to(tl.float32)
    tl.store(Err + b * se_b + rows[:, None] * se_r + cols[None, :] * se_c, (m - approx).to(Err.dtype.element_ty), mask=ok)
    tl.store(Out + b * so_b + rows[:, None] * so_r + cols[None, :] * so_c, approx.to(Out.dtype.element_ty), mask=ok)


def decompress_with_error(M, P, Q, out=None, error=None):
    """out = P Q^T and error = M - P Q^T (M [N, m, n], P [N, m, r], Q [N, n, r]) in one pass.

    `out` (default: new, M's dtype) may be M itself; `error` defaults to a new fp32 tensor.
    Returns (out, error).
    """
    n_mat, m, n = M.shape
    r = P.shape[2]
    if P.shape != (n_mat, m, r) or Q.shape != (n_mat, n, r):
        raise ValueError(f"P must be [{n_mat}, {m}, r] and Q [{n_mat}, {n}, r], got {tuple(P.shape)} and {tuple(Q.shape)}")
    br = _rank_block(r)
    out = torch.empty_like(M) if out is None else out
    error = torch.empty(M.shape, device=M.device, dtype=torch.float32) if error is None else error
    bm, bn = 64, 64
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), n_mat)
    _decompress_kernel[grid](
        M,
        P,
        Q,
        out,
        error,
        m,
        n,
        r,
        *M.stride(),
        *P.stride(),
        *Q.stride(),
        *out.stride(),
        *error.stride(),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_R=br,
    )
    return out, error


def decompress_with_error_reference(M, P, Q, out=None, error=None):
    approx = torch.bmm(P.float(), Q.float().transpose(1, 2))
    err = M.float() - approx
    error = err if error is None else error.copy_(err)
    out = approx.to(M.dtype) if out is None else out.copy_(approx)
    return out, error
