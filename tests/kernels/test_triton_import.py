"""tessera.kernels._triton: the guarded Triton import (HAS_TRITON) and `lazy_jit`, which applies `triton.jit`
at the first launch rather than at import, so TRITON_INTERPRET may be set after the kernels' modules load."""

import importlib.util
import sys

import pytest
import torch

from tessera.kernels import _triton
from tessera.kernels._triton import HAS_TRITON, lazy_jit, tl

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def _copy_of_module(name: str):
    """A fresh execution of kernels/_triton.py under another name (the real module stays as it is)."""
    spec = importlib.util.spec_from_file_location(name, _triton.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def plain(x):
    return x + 1


def test_availability_matches_the_install():
    found = importlib.util.find_spec("triton") is not None
    assert HAS_TRITON is found
    if found:
        import triton
        import triton.language

        assert _triton.triton is triton and _triton.tl is triton.language
    else:  # pragma: no cover - depends on the install
        assert _triton.triton is None and _triton.tl is None


def test_without_triton_the_import_is_guarded(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    mod = _copy_of_module("tessera_test_triton_missing")
    assert mod.HAS_TRITON is False and mod.triton is None and mod.tl is None
    assert mod.lazy_jit(plain) is plain  # kernels fall back to their torch references; the function is untouched


@needs_triton
def test_lazy_jit_defers_triton_jit_to_the_first_launch(monkeypatch):
    calls = []

    class FakeJitted:
        def __getitem__(self, grid):
            return ("launcher", grid)

    def fake_jit(fn):
        calls.append(fn)
        return FakeJitted()

    monkeypatch.setattr(_triton.triton, "jit", fake_jit)
    k = lazy_jit(plain)
    assert isinstance(k, _triton._LazyJit) and k.fn is plain
    assert calls == []  # nothing compiled or decorated at definition
    assert k[(4,)] == ("launcher", (4,))
    assert calls == [plain]
    assert k[(8, 2)] == ("launcher", (8, 2))
    assert calls == [plain]  # decorated once, then reused


@needs_triton
def test_interpreter_choice_is_made_at_the_first_launch(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    k = lazy_jit(_add_one_kernel)
    eager = _triton.triton.jit(_add_one_kernel)
    assert isinstance(eager, JITFunction) and not isinstance(eager, InterpretedFunction)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # set after the kernel was defined, as the test conftest does
    k[(1,)]
    assert isinstance(k._jitted, InterpretedFunction)


@needs_triton
def test_a_lazy_kernel_runs(device):
    import os

    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("no CUDA device and TRITON_INTERPRET is not set")
    x = torch.arange(37, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    _add_one[(triton_cdiv(37, 16),)](x, y, 37, BLOCK=16)
    assert torch.equal(y.cpu(), torch.arange(1, 38, dtype=torch.float32))


def triton_cdiv(a, b):
    return (a + b - 1) // b


if HAS_TRITON:

    def _add_one_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1.0, mask=mask)

    _add_one = lazy_jit(_add_one_kernel)
