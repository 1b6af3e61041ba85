import os
import subprocess
import sys
import textwrap

from tessera.cluster.dist import DistState, discover, free_port


def test_discover_launchers():
    assert discover({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == DistState(3, 8, 1, "torchrun")
    assert discover({"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "2"}) == DistState(5, 6, 2, "slurm")
    assert discover({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}) == DistState(
        1, 2, 1, "mpi"
    )
    assert discover({"PMI_RANK": "2", "PMI_SIZE": "4"}) == DistState(2, 4, 0, "mpi")
    assert discover({}) == DistState()
    # torchrun's variables win over SLURM's when both are present (torchrun inside an sbatch job)
    both = {"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert discover(both).source == "torchrun"


def test_two_gloo_ranks_all_reduce(tmp_path):
    script = tmp_path / "w.py"
    script.write_text(
        textwrap.dedent(
            """
        import torch
        from tessera.cluster.dist import discover, init, shutdown
        s = init(discover())
        t = torch.tensor([float(s.rank + 1)])
        s.all_reduce_mean(t)
        print(f"rank={s.rank} world={s.world_size} mean={t.item()}")
        shutdown(s)
        """
        )
    )
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert "rank=0 world=2 mean=1.5" in outs[0]
    assert "rank=1 world=2 mean=1.5" in outs[1]
