"""Triton, imported if installed, and `lazy_jit`: the kernels' shared set-up.

Triton is a GPU (and test) dependency; every kernel has a pure-torch reference that works without it.
"""

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    HAS_TRITON = False


class _LazyJit:
    """`triton.jit` applied on first launch, not at import.

    Triton chooses between compiling and its CPU interpreter (TRITON_INTERPRET=1) when a function
    is decorated. Decorating lazily lets a test session (or a CPU worker) set the variable after
    some other module imported this one.
    """

    def __init__(self, fn):
        self.fn = fn
        self._jitted = None

    def __getitem__(self, grid):
        if self._jitted is None:
            self._jitted = triton.jit(self.fn)
        return self._jitted[grid]


def lazy_jit(fn):
    return _LazyJit(fn) if HAS_TRITON else fn
