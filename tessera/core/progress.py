"""Progress bars with rate and ETA for every long step (tqdm), silenced with TESSERA_PROGRESS=0."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm


def enabled() -> bool:
    return os.environ.get("TESSERA_PROGRESS", "1") != "0"


def bar(total: int | None = None, desc: str = "", unit: str = "it", **kw) -> tqdm:
    """A tqdm bar on stderr: count, rate (`unit`/s) and ETA; `set_postfix` adds stage figures (loss, success rate)."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        disable=not enabled(),
        dynamic_ncols=True,
        mininterval=0.5,
        smoothing=0.1,
        **kw,
    )
