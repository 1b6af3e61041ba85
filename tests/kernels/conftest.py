"""Kernel tests run Triton kernels through its CPU interpreter when there is no CUDA device.

TRITON_INTERPRET must be in the environment before a kernel is decorated with `triton.jit`; the
kernels in this repository decorate lazily (on first launch), so setting it here, at conftest
import, is early enough even if another test module imported triton first. The interpreter runs
kernels with numpy: small sizes only, and no bf16 arithmetic.
"""

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if ON_GPU else "cpu")
