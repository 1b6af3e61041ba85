"""Start N real gloo ranks of a test's worker script on this machine and wait for them (shared by the multi-rank tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Variables by which another launcher (SLURM, Open MPI, PMI) would be discovered instead of these ranks' own.
FOREIGN_LAUNCHERS = ("SLURM_", "OMPI_", "PMI_", "LOCAL_WORLD_SIZE")


def run_rank_workers(
    script: str | Path, args: list[str], world: int, what: str, extra_env: dict[str, str] | None = None, timeout: float = 300
) -> list[str]:
    """Run `python script *args` as ranks 0..world-1 (torchrun's variables, one OMP thread, no progress bars; world 1: one
    plain process without them) and return their outputs. A worker still running after `timeout` s fails the test naming `what`; a worker that exits non-zero
    fails it with the tail of every rank's output."""
    from tessera.cluster.dist import free_port

    port, procs = free_port(), []
    for rank in range(world):
        env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_LAUNCHERS)}
        if world > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests" / "trainer")]), TESSERA_PROGRESS="0")
        env.update(extra_env or {})
        cmd = [sys.executable, str(script), *args]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{what} workers timed out")
    assert [p.returncode for p in procs] == [0] * world, "\n----\n".join(log[-3000:] for log in logs)
    return logs
