"""Rank discovery and the process group, held in one `DistState` object passed around (never globals).

`discover()` reads the launcher's environment once and returns the whole layout:

    launcher    source        rank / world / local rank                        ranks per node (group size)
    torchrun    "torchrun"    RANK, WORLD_SIZE, LOCAL_RANK                      LOCAL_WORLD_SIZE
    mpirun      "mpi"         OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK        OMPI_COMM_WORLD_LOCAL_SIZE, else
                              (PMI_RANK, PMI_SIZE, MPI_LOCALRANKID: MPICH)       MPI_LOCALNRANKS, else mpi4py's
                                                                                shared-memory split
    srun        "slurm"       SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID         SLURM_NTASKS_PER_NODE, else
                                                                                SLURM_STEP_TASKS_PER_NODE /
                                                                                SLURM_TASKS_PER_NODE ("4(x2)")
    none        "single"      0, 1, 0                                           1

torchrun's variables win (torchrun started by srun), then MPI's (mpirun inside a SLURM allocation: its
processes inherit the batch step's SLURM_PROCID), then SLURM's. `ranks_per_node` > 0 (the config key
`cluster.ranks_per_node`) replaces the launcher's value; when no launcher says, the world is one node.
The master address and port: MASTER_ADDR/MASTER_PORT; under srun without them the launching node
(SLURM_LAUNCH_NODE_IPADDR) and 29500 + SLURM_JOB_ID % 1000 (what `tessera cluster submit-train`
exports); under mpirun without them `init` has rank 0 broadcast its address and a free port (mpi4py).

The groups of the sharded layout (tessera.cluster.sharded.Topology) are `ranks_per_node` consecutive
ranks: rank r is in group r // ranks_per_node with local ordinal r % ranks_per_node (`DistState.group`,
`.ordinal`, `.n_groups`); `layout()` is the whole layout as a dict, `gather_layout` every rank's,
`write_layout` puts them in a run directory's layout.json.

`init(state, backend, timeout_s)` creates the one process group (`tessera.cluster.engine.build_engine`
calls it with `cluster.backend` and `cluster.timeout_s`); `group_timeout_s()` reads the timeout back.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tessera.cluster.config import DEFAULT_TIMEOUT_S
from tessera.core.errors import ConfigError
from tessera.core.files import atomic_write_bytes

DEFAULT_PORT = 29500


@dataclass
class DistState:
    """This process's place in the run: rank, world, local rank, the layout's groups, the rendezvous, the group's state."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    source: str = "single"  # the launcher: "torchrun", "mpi", "slurm" or "single"
    backend: str | None = None
    initialized: bool = False
    ranks_per_node: int = 0  # ranks per group (node) of the layout; 0 = the whole world is one group
    master_addr: str | None = None  # the rendezvous; None = not known yet (init fills it in)
    master_port: int | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def launcher(self) -> str:
        return self.source

    @property
    def group_size(self) -> int:
        """Ranks per group: `ranks_per_node`, or the whole world when it is 0."""
        return self.ranks_per_node if self.ranks_per_node > 0 else self.world_size

    @property
    def n_groups(self) -> int:
        return max(self.world_size // self.group_size, 1)

    @property
    def group(self) -> int:
        """The group (node) index of this rank."""
        return self.rank // self.group_size

    @property
    def ordinal(self) -> int:
        """This rank's local ordinal within its group (the ranks of one ordinal reduce across groups)."""
        return self.rank % self.group_size

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % max(torch.cuda.device_count(), 1))
        return torch.device("cpu")

    def set_ranks_per_node(self, k: int, key: str = "cluster.ranks_per_node") -> "DistState":
        """Group the world in `k` ranks (0 = keep the discovered value); ConfigError naming `key` when `k` does not divide it."""
        if k < 0 or (k > 0 and (k > self.world_size or self.world_size % k)):
            raise ConfigError(f"config key '{key}': {k} ranks per node do not divide the world of {self.world_size} ranks")
        if k > 0:
            self.ranks_per_node = k
        return self

    def layout(self) -> dict[str, Any]:
        """The discovered layout of this rank, as layout.json records it."""
        return {
            "launcher": self.source,
            "rank": self.rank,
            "world_size": self.world_size,
            "local_rank": self.local_rank,
            "ranks_per_node": self.group_size,
            "n_groups": self.n_groups,
            "group": self.group,
            "ordinal": self.ordinal,
            "master_addr": self.master_addr,
            "master_port": self.master_port,
            "host": socket.gethostname(),
        }

    def barrier(self) -> None:
        if self.initialized:
            torch.distributed.barrier()

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any (one all-reduce when a process group is up)."""
        if self.initialized and self.world_size > 1:
            t = torch.tensor([1.0 if flag else 0.0], device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = bool(t.item() > 0)
        return flag

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.initialized and self.world_size > 1:
            torch.distributed.all_reduce(t)
            t /= self.world_size
        return t


def _int(e: Mapping[str, str], *names: str) -> int | None:
    """The first of `names` set to a number; SLURM's per-node counts read like "4(x2)" or "4,4": the first count."""
    for n in names:
        m = re.match(r"\s*(\d+)", e.get(n, ""))
        if m:
            return int(m.group(1))
    return None


# launcher -> (rank, world, local rank, ranks per node) variables, in the order they are tried
_LAUNCHERS: list[tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = [
    ("torchrun", ("RANK",), ("WORLD_SIZE",), ("LOCAL_RANK",), ("LOCAL_WORLD_SIZE",)),
    ("mpi", ("OMPI_COMM_WORLD_RANK",), ("OMPI_COMM_WORLD_SIZE",), ("OMPI_COMM_WORLD_LOCAL_RANK",), ("OMPI_COMM_WORLD_LOCAL_SIZE",)),
    (
        "slurm",
        ("SLURM_PROCID",),
        ("SLURM_NTASKS",),
        ("SLURM_LOCALID",),
        ("SLURM_NTASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"),
    ),
    ("mpi", ("PMI_RANK",), ("PMI_SIZE",), ("MPI_LOCALRANKID",), ("MPI_LOCALNRANKS",)),
]
# when the launcher itself does not say how many ranks share a node
_FALLBACK_PER_NODE = ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE")


def discover(env: Mapping[str, str] | None = None, ranks_per_node: int = 0) -> DistState:
    """The whole layout of this process from the launcher's environment (`os.environ` if None); see the module docstring.

    `ranks_per_node` > 0 (cluster.ranks_per_node) wins over the launcher's count. With the real environment
    (env None) under an MPI launcher that names no per-node count, mpi4py splits COMM_WORLD by shared memory.
    """
    e = os.environ if env is None else env
    for source, rank_v, world_v, local_v, per_node_v in _LAUNCHERS:
        rank, world = _int(e, *rank_v), _int(e, *world_v)
        if rank is None or (world is None and source != "mpi"):
            continue
        state = DistState(rank, world or 1, _int(e, *local_v) or 0, source)
        k = _int(e, *per_node_v) or _int(e, *_FALLBACK_PER_NODE)
        if k is None and source == "mpi" and env is None:
            k = _mpi_local_size()
        state.ranks_per_node = k or 0
        state.master_addr, state.master_port = _master(e, source)
        break
    else:
        state = DistState()
    if ranks_per_node > 0:
        state.set_ranks_per_node(ranks_per_node)
    return state


def node_size(env: Mapping[str, str]) -> int | None:
    """Ranks per node as any launcher's variable in `env` says (torchrun's, then MPI's, then SLURM's), else None."""
    names = [n for _, _, _, _, per_node in _LAUNCHERS for n in per_node]
    return _int(env, *dict.fromkeys(names))


def _master(e: Mapping[str, str], source: str) -> tuple[str | None, int | None]:
    addr, port = e.get("MASTER_ADDR") or None, _int(e, "MASTER_PORT")
    if source == "slurm":
        addr = addr or e.get("SLURM_LAUNCH_NODE_IPADDR") or None
        job = _int(e, "SLURM_JOB_ID")
        port = port or (DEFAULT_PORT + job % 1000 if job is not None else DEFAULT_PORT)
    return addr, port


def _mpi_local_size() -> int | None:
    """Ranks on this node by MPI's shared-memory split (a collective over COMM_WORLD); None without mpi4py."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    node = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.Get_size()
    finally:
        node.Free()


def gather_layout(state: DistState) -> list[dict[str, Any]]:
    """Every rank's `layout()`, in rank order, on every rank (one all_gather_object when the group is up)."""
    mine = state.layout()
    if not (state.initialized and state.world_size > 1):
        return [mine]
    out: list[Any] = [None] * state.world_size
    torch.distributed.all_gather_object(out, mine)
    return out


def write_layout(state: DistState, path: str | Path) -> dict[str, Any] | None:
    """Every rank calls it; rank 0 writes {"launcher", "world_size", "ranks_per_node", "n_groups", "ranks": [...]} to `path`."""
    ranks = gather_layout(state)
    if not state.is_main:
        return None
    rec = {k: ranks[0][k] for k in ("launcher", "world_size", "ranks_per_node", "n_groups", "master_addr", "master_port")}
    rec["ranks"] = [{k: r[k] for k in ("rank", "local_rank", "group", "ordinal", "host")} for r in ranks]
    atomic_write_bytes(Path(path), (json.dumps(rec, indent=1) + "\n").encode())
    if rec["world_size"] > 1:  # a one-process run keeps stderr for errors (one line each)
        print(
            f"tessera: layout: {rec['launcher']}, {rec['world_size']} ranks = {rec['n_groups']} groups x {rec['ranks_per_node']}, "
            f"master {rec['master_addr']}:{rec['master_port']}",
            file=sys.stderr,
            flush=True,
        )
    return rec


def resolve_backend(backend: str | None) -> str:
    """The torch.distributed backend for a `cluster.backend` value: "auto" (or None) = nccl with CUDA, else gloo."""
    if backend in (None, "auto"):
        return "nccl" if torch.cuda.is_available() else "gloo"
    return backend


def group_timeout_s(group=None) -> float:
    """The collective timeout of an existing process group (the default one if None), read back from its backend."""
    pg = group or torch.distributed.distributed_c10d._get_default_group()
    device = torch.device("cuda") if torch.distributed.get_backend(pg) == "nccl" else torch.device("cpu")
    return pg._get_backend(device).options._timeout.total_seconds()


def init(
    state: DistState | None = None, backend: str | None = "auto", timeout_s: float = DEFAULT_TIMEOUT_S, *, single_group: bool = False
) -> DistState:
    """Initialise torch.distributed for `state` (discovered if None) with `backend` ("auto", "gloo", "nccl") and `timeout_s`.

    A single process stays uninitialised unless `single_group` (DeepSpeed wants a one-rank group). A
    group that already exists is kept when it has the same backend and timeout; otherwise a one-line
    ConfigError names `cluster.backend` or `cluster.timeout_s` (the group is created once, from the config).
    """
    state = state or discover()
    want = resolve_backend(backend)
    if torch.distributed.is_initialized():
        _check_existing(want, timeout_s)
        state.backend, state.initialized = torch.distributed.get_backend(), True
        return state
    if state.world_size <= 1 and not single_group:
        state.initialized = False
        return state
    if want == "nccl" and not torch.cuda.is_available():
        raise ConfigError("config key 'cluster.backend': 'nccl' needs CUDA, and this machine has none; use 'gloo' or 'auto'")
    if state.source == "mpi" and state.master_addr is None:
        state.master_addr, state.master_port = _mpi_rendezvous()
    state.master_addr = state.master_addr or "127.0.0.1"
    state.master_port = state.master_port or (free_port() if state.world_size <= 1 else DEFAULT_PORT)
    # env:// from the one discovered layout (torchrun's agent store is found through the same variables; DeepSpeed reads them)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = state.master_addr, str(state.master_port)
    torch.distributed.init_process_group(
        backend=want, rank=state.rank, world_size=state.world_size, timeout=datetime.timedelta(seconds=timeout_s)
    )
    state.backend = torch.distributed.get_backend()
    state.initialized = True
    return state


def _check_existing(backend: str, timeout_s: float) -> None:
    have = torch.distributed.get_backend()
    if have != backend:
        raise ConfigError(
            f"config key 'cluster.backend': the process group already exists with backend {have!r}, not {backend!r}; set cluster.backend = {have!r} or let the engine create the group"
        )
    have_t = group_timeout_s()
    if abs(have_t - timeout_s) > 1e-3:
        raise ConfigError(
            f"config key 'cluster.timeout_s': the process group already exists with a {have_t:g} s timeout, not {timeout_s:g} s; create it with the same cluster config"
        )


def _mpi_rendezvous() -> tuple[str | None, int | None]:
    """Under mpirun without MASTER_ADDR: rank 0's address and a free port, broadcast with mpi4py ((None, None) without it)."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None, None
    comm = MPI.COMM_WORLD
    addr = None
    if comm.Get_rank() == 0:
        try:
            addr = (socket.gethostbyname(socket.gethostname()), free_port())
        except OSError:
            addr = ("127.0.0.1", free_port())
    addr = comm.bcast(addr, root=0)
    return addr[0], int(addr[1])


def shutdown(state: DistState, synchronize: bool = True) -> None:
    """Destroy the process group, first letting gloo's worker threads drop what they still hold.

    A gloo collective is marked done before its worker thread destroys it, and destroying it decrefs
    its Python tensors, which takes the GIL. A process group destroyed under the GIL (destroy_process_group,
    or a DDP Reducer freed from Python) joins those threads while holding it: if one is still waiting for the
    GIL, both wait forever (seen as a one-in-ten hang at the end of a two-rank run). So, with more than one
    rank: a barrier (every collective queued before it is complete; its wait releases the GIL), then a short
    sleep (also GIL-free) for the last destructors. `synchronize=False` skips the barrier, for the path where
    a rank is failing and its peers may never reach it.
    """
    if state.initialized and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            if synchronize:
                torch.distributed.barrier()
            time.sleep(_DRAIN_S)
        torch.distributed.destroy_process_group()
        state.initialized = False


_DRAIN_S = 0.05  # ample for a thread that needs only the GIL to finish a destructor


@contextlib.contextmanager
def process_group(backend: str | None = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[DistState]:
    """`init(discover(), backend, timeout_s)` for the length of a `with` block, then `shutdown`: synchronised
    when the block ends normally, without the barrier when it raises (a failing rank's peers may never come)."""
    state = init(discover(), backend, timeout_s)
    try:
        yield state
    except BaseException:
        shutdown(state, synchronize=False)
        raise
    shutdown(state)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
