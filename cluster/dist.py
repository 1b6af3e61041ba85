"""Rank discovery and the process group, held in one `DistState` object passed around (never globals).

Discovery order: torchrun (RANK/WORLD_SIZE/LOCAL_RANK), SLURM (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID),
MPI launchers (OMPI_COMM_WORLD_*, PMI_*); otherwise a single process. Under an MPI launcher without
MASTER_ADDR, `init` finds rank 0's address with mpi4py (when importable).

`init(state, backend, timeout_s)` creates the one process group (`tessera.cluster.engine.build_engine`
calls it with `cluster.backend` and `cluster.timeout_s`); `group_timeout_s()` reads the timeout back.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch

from tessera.cluster.config import DEFAULT_TIMEOUT_S
from tessera.core.errors import ConfigError


@dataclass
class DistState:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    source: str = "single"
    backend: str | None = None
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % max(torch.cuda.device_count(), 1))
        return torch.device("cpu")

    def barrier(self) -> None:
        if self.initialized:
            torch.distributed.barrier()

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.initialized and self.world_size > 1:
            torch.distributed.all_reduce(t)
            t /= self.world_size
        return t


def _env_int(*names: str) -> int | None:
    for n in names:
        v = os.environ.get(n)
        if v is not None and v.strip().lstrip("-").isdigit():
            return int(v)
    return None


def discover(env: dict[str, str] | None = None) -> DistState:
    """Find this process's rank and the world size from the launcher's environment."""
    e = os.environ if env is None else env

    def get(*names: str) -> int | None:
        for n in names:
            v = e.get(n)
            if v is not None and v.strip().isdigit():
                return int(v)
        return None

    if get("RANK") is not None and get("WORLD_SIZE") is not None:
        return DistState(get("RANK"), get("WORLD_SIZE"), get("LOCAL_RANK") or 0, "torchrun")
    if get("SLURM_PROCID") is not None and get("SLURM_NTASKS") is not None:
        return DistState(get("SLURM_PROCID"), get("SLURM_NTASKS"), get("SLURM_LOCALID") or 0, "slurm")
    if get("OMPI_COMM_WORLD_RANK") is not None:
        return DistState(get("OMPI_COMM_WORLD_RANK"), get("OMPI_COMM_WORLD_SIZE") or 1, get("OMPI_COMM_WORLD_LOCAL_RANK") or 0, "mpi")
    if get("PMI_RANK") is not None:
        return DistState(get("PMI_RANK"), get("PMI_SIZE") or 1, get("MPI_LOCALRANKID") or 0, "mpi")
    return DistState()


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
    if state.source == "mpi" and "MASTER_ADDR" not in os.environ:
        _mpi_rendezvous()
    os.environ.setdefault("MASTER_ADDR", os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
    os.environ.setdefault("MASTER_PORT", str(free_port()) if state.world_size <= 1 else "29500")
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


def _mpi_rendezvous() -> None:
    """Under mpirun without MASTER_ADDR: rank 0's address and a free port, broadcast with mpi4py."""
    try:
        from mpi4py import MPI
    except ImportError:
        return
    comm = MPI.COMM_WORLD
    addr = None
    if comm.Get_rank() == 0:
        try:
            addr = (socket.gethostbyname(socket.gethostname()), free_port())
        except OSError:
            addr = ("127.0.0.1", free_port())
    addr = comm.bcast(addr, root=0)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr[0], str(addr[1])


def shutdown(state: DistState) -> None:
    if state.initialized and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        state.initialized = False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
