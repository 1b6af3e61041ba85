"""PowerSGD Triton kernels vs their torch references (interpreter on CPU, full size on GPU)."""

import pytest
import torch

from tessera.kernels.powersgd import (
    decompress_with_error,
    decompress_with_error_reference,
    orthogonalize,
    orthogonalize_reference,
    project,
    project_reference,
)

ON_GPU = torch.cuda.is_available()

# (N matrices, m, n, rank): ragged sizes on purpose (not multiples of the 16/32/64 tiles)
SHAPES = [(1, 16, 16, 1), (3, 37, 50, 4), (2, 70, 33, 8), (1, 130, 20, 16)]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rel_err(got, want):
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("m_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_project_both_directions(shape, m_dtype, device):
    n_mat, m, n, r = shape
    g = _gen(sum(shape))
    M = torch.randn(n_mat, m, n, generator=g).to(device=device, dtype=m_dtype)
    Q = torch.randn(n_mat, n, r, generator=g).to(device)
    P = project(M, Q)
    assert P.shape == (n_mat, m, r) and P.dtype == torch.float32
    # fp32 accumulation of the same products in a different order
    assert _rel_err(P, project_reference(M, Q)) < 1e-5
    Q2 = project(M, P, transpose=True)
    assert Q2.shape == (n_mat, n, r)
    assert _rel_err(Q2, project_reference(M, P, transpose=True)) < 1e-5
    # a transposed (non-contiguous) view of M works through strides
    Mt = M.transpose(1, 2)
    assert _rel_err(project(Mt, P), project_reference(Mt, P)) < 1e-5


@pytest.mark.parametrize("shape", [(2, 40, 4), (1, 300, 8), (3, 17, 17), (1, 64, 1)])
def test_orthogonalize_matches_householder_reference(shape, device):
    P = torch.randn(*shape, generator=_gen(shape[1])).to(device)
    got = orthogonalize(P.clone())
    want = orthogonalize_reference(P.clone())
    eye = torch.eye(shape[2], device=device)
    torch.testing.assert_close(got.transpose(1, 2) @ got, eye.expand(shape[0], -1, -1), atol=1e-5, rtol=0)
    # both are the unique Q with diag(R) > 0; differences only from rounding
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # and they span the same column space as P: the projection of P onto Q reproduces P
    torch.testing.assert_close(got @ (got.transpose(1, 2) @ P), P, atol=1e-4, rtol=1e-4)


def test_orthogonalize_rank_deficient_stays_finite(device):
    """A zero column and a repeated column: Gram-Schmidt without eps divides 0 by 0 here."""
    P = torch.randn(1, 50, 4, generator=_gen(3)).to(device)
    P[:, :, 1] = 0.0
    P[:, :, 3] = P[:, :, 0]
    got = orthogonalize(P.clone())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.transpose(1, 2) @ got, torch.eye(4, device=device)[None], atol=1e-4, rtol=0)
    # only column 0 is well determined: the others are directions of size eps, which rounding of
    # the same order decides differently in each implementation
    torch.testing.assert_close(got[:, :, 0], orthogonalize_reference(P.clone())[:, :, 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got @ (got.transpose(1, 2) @ P), P, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("m_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_decompress_with_error(shape, m_dtype, device):
    n_mat, m, n, r = shape
    g = _gen(7 + sum(shape))
    M = torch.randn(n_mat, m, n, generator=g).to(device=device, dtype=m_dtype)
    P = torch.randn(n_mat, m, r, generator=g).to(device)
    Q = torch.randn(n_mat, n, r, generator=g).to(device)
    out, err = decompress_with_error(M, P, Q)
    ref_out, ref_err = decompress_with_error_reference(M, P, Q)
    assert out.dtype == m_dtype and err.dtype == torch.float32
    # fp16 output: one rounding of the fp32 product (2^-11 relative)
    tol = 1e-5 if m_dtype == torch.float32 else 1e-3
    assert _rel_err(out, ref_out) < tol
    assert _rel_err(err, ref_err) < 1e-5
    # error feedback keeps exactly what was not transmitted: out + error == M
    torch.testing.assert_close(out.float() + err, M.float(), atol=tol * 10 * max(r, 1), rtol=0)


def test_decompress_in_place_over_m(device):
    M = torch.randn(2, 45, 70, generator=_gen(1)).to(device)
    P = torch.randn(2, 45, 3, generator=_gen(2)).to(device)
    Q = torch.randn(2, 70, 3, generator=_gen(4)).to(device)
    want_out, want_err = decompress_with_error_reference(M.clone(), P, Q)
    err = torch.empty_like(M)
    out, err2 = decompress_with_error(M, P, Q, out=M, error=err)
    assert out.data_ptr() == M.data_ptr() and err2.data_ptr() == err.data_ptr()
    torch.testing.assert_close(M, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(err, want_err, atol=1e-5, rtol=1e-5)


def test_rejects_bad_shapes(device):
    M = torch.randn(1, 20, 30, device=device)
    with pytest.raises(ValueError, match="X must be"):
        project(M, torch.randn(1, 20, 4, device=device))
    with pytest.raises(ValueError, match="rank"):
        project(M, torch.randn(1, 30, 65, device=device))
    with pytest.raises(ValueError, match="m >= r"):
        orthogonalize(torch.randn(1, 3, 4, device=device))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device: full-size matrices are too slow for the interpreter")
@pytest.mark.parametrize("m_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_full_size_pipeline(m_dtype, device):
    n_mat, m, n, r = 8, 3968, 1000, 32
    g = _gen(0)
    M = torch.randn(n_mat, m, n, generator=g).to(device=device, dtype=m_dtype)
    Q = torch.randn(n_mat, n, r, generator=g).to(device)
    P = project(M, Q)
    assert _rel_err(P, project_reference(M, Q)) < 1e-4
    Po = orthogonalize(P.clone())
    torch.testing.assert_close(Po, orthogonalize_reference(P.clone()), atol=1e-4, rtol=1e-3)
    Q2 = project(M, Po, transpose=True)
    assert _rel_err(Q2, project_reference(M, Po, transpose=True)) < 1e-4
    out, err = decompress_with_error(M, Po, Q2)
    ref_out, ref_err = decompress_with_error_reference(M, Po, Q2)
    assert _rel_err(out, ref_out) < (1e-5 if m_dtype == torch.float32 else 1e-2)  # 16-bit output rounding
    assert _rel_err(err, ref_err) < 1e-4


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    """sm_90 cubins without a GPU: catches compile errors the interpreter cannot see."""
    from test_block_sparse_attention import _ptxas_available, run_compile_check

    if not _ptxas_available():
        pytest.skip("triton's bundled ptxas (CUDA backend) is not installed")
    code = """
from tessera.kernels import powersgd as K
ints = {n: "i32" for n in ["ROWS", "K", "R", "COLS"] + [f"s{a}_{b}" for a in "abcmpqoe" for b in "brkc"]}
for kernel, sig, consts in (
    (K._project_kernel, dict(ints, A="*fp16", B="*fp32", C="*fp32"), dict(BLOCK_M=64, BLOCK_K=32, BLOCK_R=16)),
    (K._householder_kernel, dict(ints, P="*fp32", V="*fp32", eps="fp32"), dict(BLOCK_M=256, BLOCK_R=16)),
    (K._decompress_kernel, dict(ints, M="*bf16", P="*fp32", Q="*fp32", Out="*bf16", Err="*fp32"),
     dict(BLOCK_M=64, BLOCK_N=64, BLOCK_R=16)),
):
    print("cubin", len(compile_sm90(kernel, sig, consts).asm["cubin"]))
"""
    sizes = [int(ln.split()[1]) for ln in run_compile_check(code).splitlines() if ln.startswith("cubin")]
    assert len(sizes) == 3 and min(sizes) > 0
