"""Start N real gloo ranks of a test's worker script on this machine and wait for them (shared by the multi-rank tests)."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch.multiprocessing

sys.path.insert(0, str(Path(__file__).parent))
import prefork  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# Variables by which another launcher (SLURM, Open MPI, PMI) would be discovered instead of these ranks' own.
FOREIGN_LAUNCHERS = ("SLURM_", "OMPI_", "PMI_", "LOCAL_WORLD_SIZE")


def run_rank_workers(
    script: str | Path, args: list[str], world: int, what: str, extra_env: dict[str, str] | None = None, timeout: float = 300
) -> list[str]:
    """Run `python script *args` as ranks 0..world-1 (torchrun's variables, one OMP thread, no progress bars; world 1: one
    plain process without them), forked by tests/trainer/prefork.py's server, and return their outputs. A worker still running after `timeout` s fails the test naming `what`; a worker that exits non-zero
    fails it with the tail of every rank's output."""
    from tessera.cluster.dist import free_port

    port, procs = free_port(), []
    for rank in range(world):
        env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_LAUNCHERS)}
        if world > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests" / "trainer")]), TESSERA_PROGRESS="0")
        env.update(extra_env or {})
        procs.append(prefork.popen([sys.executable, str(script), *args], env, REPO))
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


# what the standard library's fork server imports once for spawn_ranks (the rest each child imports itself)
FORKSERVER_PRELOAD = ["torch", "torch._dynamo", "torch.distributed", "tessera.trainer.fit", "tessera.trainer.dvae_train"]


def spawn_ranks(fn: Callable, args: tuple, nprocs: int) -> None:
    """torch.multiprocessing.spawn(fn, args, nprocs): `fn(rank, *args)` in `nprocs` new processes, joined, any failure
    raised here; forked by the standard library's fork server, which imports FORKSERVER_PRELOAD once for the session,
    instead of each process starting an interpreter and importing torch again (7-10 s of CPU each on machine A)."""
    multiprocessing.set_forkserver_preload(FORKSERVER_PRELOAD)
    torch.multiprocessing.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")
