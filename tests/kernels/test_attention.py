"""Dense reference attention: SDPA with a layout mask == the written-out softmax; prefixes and errors."""

import pytest
import torch

from tessera.kernels.attention import attention, attention_reference
from tessera.kernels.layouts import Layout, token_mask


@pytest.mark.parametrize("kind,transposed", [("row", False), ("column", False), ("column", True), ("conv", False), ("causal", False)])
def test_matches_explicit_softmax(kind, transposed):
    g = torch.Generator().manual_seed(0)
    lay = Layout(kind, 3, 4, conv_kernel=3, transposed=transposed)
    q, k, v = (torch.randn(2, 3, 19, 8, generator=g) for _ in range(3))
    out = attention(q, k, v, lay)
    ref = attention_reference(q, k, v, lay.mask())
    assert out.shape == (2, 3, 19, 8)
    assert torch.allclose(out, ref, atol=1e-5)
    # the same via an explicit bool mask
    assert torch.allclose(attention(q, k, v, lay.mask()), out, atol=1e-6)


def test_masked_keys_have_no_influence():
    g = torch.Generator().manual_seed(1)
    mask = token_mask("row", 3, 4)
    q, k, v = (torch.randn(1, 1, 19, 8, generator=g) for _ in range(3))
    out = attention(q, k, v, mask)
    v2 = v.clone()
    v2[:, :, 3 + 2] += 10.0  # image token 2: visible to image queries 2..6 only (row mask)
    out2 = attention(q, k, v2, mask)
    changed = (out - out2).abs().amax(dim=-1)[0, 0] > 1e-6
    assert changed.nonzero().flatten().tolist() == [3 + i for i in range(2, 7)]


def test_layout_with_fewer_queries_uses_the_last_rows():
    """New tokens after a cache: 1 query over the first 10 keys takes row 9 of the mask."""
    g = torch.Generator().manual_seed(2)
    lay = Layout("conv", 3, 4, conv_kernel=3)
    q = torch.randn(1, 2, 1, 8, generator=g)
    k, v = torch.randn(1, 2, 10, 8, generator=g), torch.randn(1, 2, 10, 8, generator=g)
    out = attention(q, k, v, lay)
    ref = attention_reference(q, k, v, lay.mask()[9:10, :10])
    assert torch.allclose(out, ref, atol=1e-5)


def test_gradients_flow_and_match_reference():
    g = torch.Generator().manual_seed(3)
    mask = token_mask("column", 3, 4, transposed=True)
    q, k, v = (torch.randn(1, 2, 19, 8, generator=g, requires_grad=True) for _ in range(3))
    attention(q, k, v, mask).square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    attention_reference(q2, k2, v2, mask).square().sum().backward()
    for a, b in zip(grads, (q2.grad, k2.grad, v2.grad)):
        assert torch.allclose(a, b, atol=1e-4)


def test_bad_shapes_raise():
    q = torch.randn(1, 1, 19, 8)
    with pytest.raises(ValueError, match="mask: expected shape"):
        attention(q, q, q, torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        attention(q, q, q, torch.ones(19, 19))
    with pytest.raises(ValueError, match="4-d"):
        attention(q[0], q[0], q[0], token_mask("row", 3, 4))
