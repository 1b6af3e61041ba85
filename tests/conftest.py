"""Session-wide test settings, applied before any test module imports torch or triton.

Without a CUDA device, Triton kernels run through Triton's CPU interpreter: TRITON_INTERPRET must
be set before any kernel is decorated, whichever test module imports triton first (tests/cluster
imports the PowerSGD kernels before tests/kernels runs).
"""

import os

os.environ.setdefault("TESSERA_PROGRESS", "0")
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass
