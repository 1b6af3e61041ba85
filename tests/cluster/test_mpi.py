"""Rank discovery under a real `mpirun` (Open MPI): OMPI_COMM_WORLD_* -> DistState -> a gloo all-reduce."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tessera.cluster.dist import free_port

REPO = Path(__file__).resolve().parents[2]


NO_MPIRUN = pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun is not installed (apt-get install openmpi-bin)")


def _has_mpi4py() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True


@NO_MPIRUN
@pytest.mark.parametrize(
    "rendezvous", ["env", pytest.param("mpi4py", marks=pytest.mark.skipif(not _has_mpi4py(), reason="mpi4py is not installed"))]
)
def test_mpirun_two_ranks_gloo_all_reduce(tmp_path, rendezvous):
    """MASTER_ADDR/PORT given to mpirun, or left out: then rank 0 broadcasts them over MPI (mpi4py)."""
    script = tmp_path / "w.py"
    script.write_text(
        textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {str(REPO)!r})
        import torch
        from tessera.cluster.dist import discover, init, shutdown
        s = discover()
        found = dict(rank=s.rank, world=s.world_size, local=s.local_rank, source=s.source)
        s = init(s, backend="gloo", timeout_s=60)
        t = torch.tensor([float(s.rank + 1), 10.0 * (s.rank + 1)])
        torch.distributed.all_reduce(t)
        found["sum"] = t.tolist()
        found["port_set"] = os.environ["MASTER_PORT"] != "29500"
        shutdown(s)
        json.dump(found, open(os.path.join(sys.argv[1], f"rank{{found['rank']}}.json"), "w"))
    """)
    )
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    for k in [k for k in env if k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") or k.startswith("SLURM_")]:
        env.pop(k)  # only the MPI launcher's variables may name the ranks here
    export = ["-x", "MASTER_ADDR", "-x", "MASTER_PORT"]
    if rendezvous == "mpi4py":
        env.pop("MASTER_ADDR"), env.pop("MASTER_PORT")
        export = []
    cmd = [
        "mpirun",
        "--allow-run-as-root",
        "--oversubscribe",
        "-np",
        "2",
        *export,
        "-x",
        "OMP_NUM_THREADS",
        sys.executable,
        str(script),
        str(tmp_path),
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    got = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert got == [dict(rank=i, world=2, local=i, source="mpi", sum=[3.0, 30.0], port_set=True) for i in range(2)]
