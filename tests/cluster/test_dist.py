import os
import subprocess
import sys
import textwrap

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "trainer"))
import prefork  # noqa: E402

from tessera.cluster.dist import DistState, discover, free_port, node_size  # noqa: E402
from tessera.core.errors import ConfigError  # noqa: E402


def test_discover_launchers():
    assert discover({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == DistState(3, 8, 1, "torchrun")
    assert discover({"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "2"}) == DistState(5, 6, 2, "slurm", master_port=29500)
    assert discover({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}) == DistState(
        1, 2, 1, "mpi"
    )
    assert discover({"PMI_RANK": "2", "PMI_SIZE": "4"}) == DistState(2, 4, 0, "mpi")
    assert discover({}) == DistState()
    # torchrun's variables win over SLURM's when both are present (torchrun inside an sbatch job)
    both = {"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert discover(both).source == "torchrun"
    # mpirun inside a SLURM allocation: its ranks inherit the batch step's SLURM_PROCID; MPI's variables win
    mpi_in_slurm = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert (discover(mpi_in_slurm).source, discover(mpi_in_slurm).rank) == ("mpi", 3)


def test_discover_whole_layout():
    """Ranks per node, group, ordinal and the rendezvous come from the one discovery, per launcher."""
    tr = discover({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (tr.ranks_per_node, tr.n_groups, tr.group, tr.ordinal, tr.master_addr, tr.master_port) == (4, 2, 1, 1, "n1", 1234)
    mpi = discover(
        {"OMPI_COMM_WORLD_RANK": "6", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    )
    assert (mpi.source, mpi.ranks_per_node, mpi.group, mpi.ordinal, mpi.master_addr) == ("mpi", 2, 3, 0, None)
    assert discover({"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALNRANKS": "2"}).group == 1  # MPICH / Intel MPI
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3", "SLURM_JOB_ID": "1017", "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.7"}
    s = discover({**slurm, "SLURM_NTASKS_PER_NODE": "4"})
    assert (s.ranks_per_node, s.group, s.ordinal, s.master_addr, s.master_port) == (4, 0, 3, "10.0.0.7", 29517)
    assert discover({**slurm, "SLURM_TASKS_PER_NODE": "2(x4)"}).ranks_per_node == 2
    assert discover({**slurm, "SLURM_TASKS_PER_NODE": "2(x4)", "MASTER_PORT": "4000"}).master_port == 4000
    # the config's cluster.ranks_per_node wins; the whole world is one node when nobody says
    forced = discover({**slurm, "SLURM_NTASKS_PER_NODE": "8"}, ranks_per_node=2)
    assert (forced.ranks_per_node, forced.n_groups, forced.group, forced.ordinal) == (2, 4, 1, 1)
    lone = discover({"RANK": "1", "WORLD_SIZE": "4"})
    assert (lone.group_size, lone.n_groups, lone.ordinal) == (4, 1, 1)
    assert discover({}).layout()["ranks_per_node"] == 1
    with pytest.raises(ConfigError, match="cluster.ranks_per_node': 3 ranks per node do not divide the world of 8"):
        discover(slurm, ranks_per_node=3)
    # any launcher's per-node count, without its rank variables (tessera.cluster.sharded.Topology.discover)
    assert [
        node_size(e) for e in ({"LOCAL_WORLD_SIZE": "4"}, {"OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, {"SLURM_TASKS_PER_NODE": "8(x2)"}, {})
    ] == [
        4,
        2,
        8,
        None,
    ]


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
    rcs, outs = _two_ranks(script)
    assert rcs == [0, 0], outs
    assert "rank=0 world=2 mean=1.5" in outs[0]
    assert "rank=1 world=2 mean=1.5" in outs[1]


def _two_ranks(script, timeout=120):
    """Run `script` as 2 gloo ranks (processes forked by tests/trainer/prefork.py); their return codes and outputs."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env["OMP_NUM_THREADS"] = "1"
        procs.append(prefork.popen([sys.executable, str(script)], env, os.getcwd()))
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("ranks hung: " + " | ".join(p.communicate()[0][-800:] for p in procs))
    return [p.returncode for p in procs], outs


def test_process_group_block_ends_synchronised_and_a_failing_rank_frees_its_peer(tmp_path):
    """The CLI's `with process_group(...)`: after a normal end the group is gone on every rank (DDP's Reducer,
    freed afterwards, joins idle gloo threads); when one rank raises, its peer's closing barrier fails at once
    (gloo sees the closed connection) instead of waiting out the group's timeout."""
    ok = tmp_path / "ok.py"
    ok.write_text(
        textwrap.dedent(
            """
        import torch
        from tessera.cluster.dist import process_group
        with process_group("gloo", 600) as s:
            model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
            model(torch.ones(2, 4)).sum().backward()
            t = torch.tensor([float(s.rank)])
            torch.distributed.all_reduce(t)
        del model
        print(f"rank={s.rank} initialized={s.initialized} group={torch.distributed.is_initialized()} sum={t.item()}")
        """
        )
    )
    rcs, outs = _two_ranks(ok)
    assert rcs == [0, 0], outs
    assert all(f"rank={r} initialized=False group=False sum=1.0" in outs[r] for r in range(2)), outs
    bad = tmp_path / "bad.py"
    bad.write_text(
        textwrap.dedent(
            """
        from tessera.cluster.dist import process_group
        with process_group("gloo", 600) as s:
            if s.rank == 1:
                raise ValueError("rank 1 fails inside the block")
        """
        )
    )
    rcs, outs = _two_ranks(bad, timeout=60)  # well under the group's 600 s timeout
    assert rcs == [1, 1], outs
    assert "ValueError: rank 1 fails inside the block" in outs[1]
    assert "Connection closed by peer" in outs[0], outs[0][-1500:]
