"""Block-sparse attention kernel vs its pure-torch reference, forward and every gradient.

On CPU the kernels run in Triton's interpreter (tests/kernels/conftest.py) at tiny sizes: S 32-80,
block 16, D 16/32, fp32 and fp16 (the interpreter has no bf16 arithmetic). The `gpu` tests run
the paper's layouts at full size (256 text + 32x32 image tokens) in fp16 and bf16.
"""

import math
import os

import pytest
import torch

from tessera.kernels import layouts
from tessera.kernels.block_sparse_attention import (
    attention_flops,
    block_sparse_attention,
    block_sparse_attention_reference,
    build_index,
)

# tests/kernels/conftest.py has set TRITON_INTERPRET=1 by now when there is no CUDA device
ON_GPU = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Tolerances against the fp32 reference computed from the same (rounded) inputs.
TOL = {
    # Interpreter: numpy fp32 matmuls, only summation order differs. On a GPU, tl.dot on fp32 uses
    # TF32 (10-bit mantissa), so it is loosened there.
    torch.float32: dict(out=1e-5, grad=1e-5) if not ON_GPU else dict(out=5e-3, grad=1e-2),
    # fp16 output rounding (2^-11 relative) plus P and dS rounded to fp16 before their matmuls.
    torch.float16: dict(out=2e-3, grad=1e-2),
    # bf16 keeps 8 mantissa bits: output rounding alone is ~4e-3 relative.
    torch.bfloat16: dict(out=2e-2, grad=6e-2),
}


def _random_mask(s: int, seed: int, density: float = 0.5) -> torch.Tensor:
    """A causal mask with random holes, the diagonal kept (every query sees itself)."""
    g = torch.Generator().manual_seed(seed)
    m = (torch.rand(s, s, generator=g) < density).tril()
    m |= torch.eye(s, dtype=torch.bool)
    return m


def _qkv(b, h, s, d, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g).to(device=device, dtype=dtype).requires_grad_() for _ in range(3)]


def _check_against_reference(q, k, v, mask, block, dtype):
    out = block_sparse_attention(q, k, v, mask, block=block)
    g = torch.Generator().manual_seed(1234)
    dout = torch.randn(out.shape, generator=g).to(device=out.device, dtype=out.dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)

    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = block_sparse_attention_reference(q32, k32, v32, mask, block=block)
    rdq, rdk, rdv = torch.autograd.grad(ref, (q32, k32, v32), dout.float())

    tol = TOL[dtype]
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref, atol=tol["out"], rtol=tol["out"])
    for name, got, want in (("dq", dq, rdq), ("dk", dk, rdk), ("dv", dv, rdv)):
        assert torch.isfinite(got).all(), name
        scale = max(want.abs().max().item(), 1.0)
        err = (got.float() - want).abs().max().item()
        assert err <= tol["grad"] * scale, f"{name}: max error {err:.3g} > {tol['grad']} * {scale:.3g}"


def _mask_case(kind: str, text_len: int, grid: int) -> torch.Tensor:
    if kind == "column_t":
        return layouts.token_mask("column", text_len, grid, transposed=True)
    if kind == "conv":
        return layouts.token_mask("conv", text_len, grid, conv_kernel=3)
    return layouts.token_mask(kind, text_len, grid)


# (mask kind, text_len, grid, B, H, D): S = text_len + grid^2, mostly not a multiple of 16
SMALL_CASES = [
    ("row", 8, 6, 1, 2, 16),  # S=44
    ("column_t", 5, 7, 1, 2, 32),  # S=54
    ("conv", 16, 8, 1, 1, 16),  # S=80, exact multiple
    ("causal", 7, 5, 2, 1, 16),  # S=32, exact multiple
    ("random", 0, 0, 1, 2, 16),  # S=50 random holes
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", SMALL_CASES, ids=[c[0] for c in SMALL_CASES])
def test_matches_reference_small(case, dtype, device):
    kind, text_len, grid, b, h, d = case
    mask = _random_mask(50, seed=3) if kind == "random" else _mask_case(kind, text_len, grid)
    q, k, v = _qkv(b, h, mask.shape[0], d, dtype, device, seed=SMALL_CASES.index(case))
    _check_against_reference(q, k, v, mask.to(device), 16, dtype)


def test_index_matches_layouts_and_is_consistent():
    mask = layouts.token_mask("row", 8, 6)  # S=44, ragged at block 16
    idx = build_index(mask, 16)
    assert idx.n_blocks == 3 and idx.padded_len == 48
    assert torch.equal(idx.layout, layouts.block_layout(mask, 16))
    assert torch.equal(idx.partial, layouts.block_partial(mask, 16))
    # row CSR lists exactly the non-empty blocks of each row, ascending; the column CSR is its transpose
    for m in range(idx.n_blocks):
        cols = idx.col_idx[idx.row_ptr[m] : idx.row_ptr[m + 1]].tolist()
        assert cols == idx.layout[m].nonzero().flatten().tolist()
        flags = idx.row_partial[idx.row_ptr[m] : idx.row_ptr[m + 1]].tolist()
        assert flags == [int(idx.partial[m, c]) for c in cols]
    for n in range(idx.n_blocks):
        rows = idx.row_idx[idx.col_ptr[n] : idx.col_ptr[n + 1]].tolist()
        assert rows == idx.layout[:, n].nonzero().flatten().tolist()
    assert idx.nnz_blocks == int(idx.layout.sum())
    assert idx.allowed_pairs == int(mask.sum())
    # the block that touches the padding is partial even where the real tokens are all allowed
    assert bool(idx.partial[2, 0])
    # block ceiling: the kernel computes nnz_blocks * 16^2 pairs for allowed_pairs useful ones
    f = attention_flops(idx, 1, 1, 16)
    assert f["blocks"] / f["useful"] == pytest.approx(idx.nnz_blocks * 256 / idx.allowed_pairs)


def test_empty_blocks_are_never_read(device):
    """Key block 1 (tokens 16..31) is masked for every query, so its block column is empty.

    NaN there would poison any tile that touched it (0 * NaN = NaN), so finite outputs show that
    the kernel never loads empty blocks; their dK/dV must be exactly zero.
    """
    s, blk = 48, 16
    mask = torch.ones(s, s, dtype=torch.bool).tril()
    mask[:, 16:32] = False
    mask |= torch.eye(s, dtype=torch.bool)
    mask[16:32, 16:32] = False  # queries 16..31 then see only keys 0..15
    idx = build_index(mask, blk)
    assert not idx.layout[:, 1].any()
    q, k, v = _qkv(1, 1, s, 16, torch.float32, device, seed=5)
    with torch.no_grad():
        k[:, :, 16:32] = float("nan")
        v[:, :, 16:32] = float("nan")
    out = block_sparse_attention(q, k, v, idx, block=blk)
    assert torch.isfinite(out).all()
    clean = [t.detach().nan_to_num(0.0) for t in (q, k, v)]
    torch.testing.assert_close(out, block_sparse_attention_reference(*clean, mask), atol=1e-5, rtol=1e-5)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.isfinite(dq).all()
    assert (dk[:, :, 16:32] == 0).all() and (dv[:, :, 16:32] == 0).all()


def test_rows_without_keys_give_zero(device):
    s = 40
    mask = _random_mask(s, seed=9)
    mask[20:25] = False  # five queries may attend nothing
    q, k, v = _qkv(1, 2, s, 16, torch.float32, device, seed=11)
    out = block_sparse_attention(q, k, v, mask, block=16)
    assert (out[:, :, 20:25] == 0).all()
    dq = torch.autograd.grad(out.sum(), q)[0]
    assert (dq[:, :, 20:25] == 0).all() and torch.isfinite(dq).all()
    torch.testing.assert_close(out, block_sparse_attention_reference(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_rejects_bad_inputs(device):
    q, k, v = _qkv(1, 1, 32, 24, torch.float32, device, seed=0)
    with pytest.raises(ValueError, match="head dim"):
        block_sparse_attention(q, k, v, torch.ones(32, 32, dtype=torch.bool), block=16)
    q, k, v = _qkv(1, 1, 32, 16, torch.float32, device, seed=0)
    with pytest.raises(ValueError, match="S=40"):
        block_sparse_attention(q, k, v, torch.ones(40, 40, dtype=torch.bool), block=16)
    with pytest.raises(ValueError, match="block"):
        block_sparse_attention(q, k, v, build_index(torch.ones(32, 32, dtype=torch.bool), 32), block=16)
    with pytest.raises(ValueError, match="bool"):
        build_index(torch.ones(32, 32), 16)


@pytest.mark.skipif(INTERPRETED, reason="Triton's interpreter has no bf16 arithmetic; bf16 is tested on GPU only")
@pytest.mark.gpu
def test_bf16_small(device):
    mask = _mask_case("row", 8, 6)
    q, k, v = _qkv(1, 2, mask.shape[0], 16, torch.bfloat16, device, seed=21)
    _check_against_reference(q, k, v, mask.to(device), 16, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device: full-size layouts are too slow for the interpreter")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kind", ["row", "column_t", "conv", "causal"])
@pytest.mark.parametrize("block", [32, 64])
def test_paper_layouts_full_size(kind, head_dim, dtype, block, device):
    mask = layouts.token_mask("column", 256, 32, transposed=True) if kind == "column_t" else layouts.token_mask(kind, 256, 32)
    q, k, v = _qkv(2, 4, mask.shape[0], head_dim, dtype, device, seed=7)
    _check_against_reference(q, k, v, mask.to(device), block, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
def test_ragged_full_size(device):
    s = 1000  # not a multiple of 64
    mask = _random_mask(s, seed=13, density=0.3)
    q, k, v = _qkv(1, 3, s, 64, torch.float16, device, seed=17)
    _check_against_reference(q, k, v, mask.to(device), 64, torch.float16)
    assert math.isfinite(attention_flops(build_index(mask, 64), 1, 3, 64)["useful"])


def _ptxas_available() -> bool:
    try:
        import triton.backends.nvidia as nv
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401

        return os.path.exists(os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas"))
    except Exception:
        return False


def compile_sm90(lazy_kernel, sig: dict, consts: dict, opts: dict | None = None):
    """Compile a kernel to a Hopper (sm_90) cubin on this machine, GPU or not (ptxas ships with
    triton). Catches what the interpreter cannot: type errors in loops and branches, layouts,
    shared memory use. Must run in a process without TRITON_INTERPRET (the interpreter patches
    triton.language), see `run_compile_check`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = JITFunction(lazy_kernel.fn)
    names = fn.arg_names
    signature = {n: sig.get(n, "constexpr") for n in names}
    src = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts or {})


def run_compile_check(code: str) -> str:
    """Run `code` (which may call compile_sm90) in a fresh interpreter without TRITON_INTERPRET."""
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(here.parents[1]), str(here), env.get("PYTHONPATH", "")])
    head = "from test_block_sparse_attention import compile_sm90\n"
    proc = subprocess.run([sys.executable, "-c", head + code], env=env, cwd=here.parents[1], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(not _ptxas_available(), reason="triton's bundled ptxas (CUDA backend) is not installed")
def test_kernels_compile_for_hopper():
    code = """
from tessera.kernels import block_sparse_attention as A
for dtype, block, head_dim in (("fp16", 64, 64), ("bf16", 64, 128)):
    base = {"qk_scale": "fp32", "sm_scale": "fp32", "S": "i32", "S_PAD": "i32", "Lse": "*fp32", "Delta": "*fp32", "MaskI8": "*i8", "MaskI8T": "*i8"}
    base.update({n: "*i32" for n in ("RowPtr", "ColIdx", "RowPartial", "ColPtr", "RowIdx", "ColPartial")})
    base.update({n: "*" + dtype for n in ("Q", "K", "V", "Out", "DO", "DQ", "DK", "DV")})
    for kernel, name in ((A._bsa_fwd_kernel, "fwd"), (A._bsa_bwd_dkdv_kernel, "dkdv"), (A._bsa_bwd_dq_kernel, "dq")):
        c = compile_sm90(kernel, base, dict(BLOCK=block, HEAD_DIM=head_dim, PREC="tf32"), A._launch_opts(name, block, head_dim))
        print("cubin", len(c.asm["cubin"]), "shared", c.metadata.shared)
    c = compile_sm90(A._bsa_bwd_delta_kernel, base, dict(BLOCK=block, HEAD_DIM=head_dim), A._launch_opts("delta", block, head_dim))
    print("cubin", len(c.asm["cubin"]), "shared", c.metadata.shared)
"""
    lines = [ln.split() for ln in run_compile_check(code).splitlines() if ln.startswith("cubin")]
    assert len(lines) == 8
    for _, size, _, shared in lines:
        assert int(size) > 0
        assert int(shared) <= 227 * 1024  # H100: 227 KiB of shared memory per block


def test_same_result_as_dense_cpu_path_with_a_layout(device):
    """Drop-in for tessera.kernels.attention.attention (SDPA with the bool mask), given the same Layout."""
    from tessera.kernels.attention import attention

    lay = layouts.Layout("column", 6, 6, transposed=True)  # S = 42
    q, k, v = _qkv(2, 1, lay.seq_len, 16, torch.float32, device, seed=31)
    got = block_sparse_attention(q, k, v, lay, block=16)
    torch.testing.assert_close(got, attention(q, k, v, lay), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(block_sparse_attention_reference(q, k, v, lay), attention(q, k, v, lay), atol=1e-5, rtol=1e-5)


def test_index_cache_follows_the_mask_tensor(device):
    from tessera.kernels.block_sparse_attention import _cached_index

    mask = _random_mask(40, seed=2)
    a = _cached_index(mask, 16, device)
    assert _cached_index(mask, 16, device) is a  # same tensor, same index
    assert _cached_index(mask, 32, device) is not a  # other block size
    mask[30:, :16] = False  # in-place edit: version counter moves, index is rebuilt
    b = _cached_index(mask, 16, device)
    assert b is not a and b.allowed_pairs == int(mask.sum())
    q, k, v = _qkv(1, 1, 40, 16, torch.float32, device, seed=4)
    torch.testing.assert_close(
        block_sparse_attention(q, k, v, mask, block=16), block_sparse_attention_reference(q, k, v, mask), atol=1e-5, rtol=1e-5
    )
