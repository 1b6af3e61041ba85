"""Sharding within a node (FSDP2), PowerSGD across nodes: the "sharded" engine (DALL-E paper section 2.5, App. E).

Topology: the world's ranks form groups of `ranks_per_node` consecutive ranks (a node, as torchrun,
mpirun and SLURM's block distribution number them). The engine takes it from its `DistState`, the one
layout `tessera.cluster.dist.discover` found (LOCAL_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_SIZE,
SLURM_NTASKS_PER_NODE, ...); an explicit `ranks_per_node` (`cluster.ranks_per_node`) replaces it there.
The device mesh is (replicate = groups, shard = ranks per node).

Within a group, `torch.distributed.fsdp.fully_shard` on the 1-D "shard" mesh shards every parameter
on dim 0 and reduce-scatters the gradients (one FSDP unit per resblock, then the root, as torchtitan
applies it per transformer block). Across groups nothing is reduced by FSDP; the all-reduce hook of
each unit (`FSDPModule.set_all_reduce_hook`) hands the unit's flat reduce-scatter output to
`tessera.cluster.sharded_powersgd.CrossGroupReducer`, which averages it over the ranks of the same
local ordinal: PowerSGD for matrix shards, fp32 all-reduce for embeddings, gains and biases.

    model = DALLE(cfg).to(dist.device)       # identical on every rank (rank 0's weights are broadcast)
    engine = ShardedPowerSGDEngine(model, lambda params: torch.optim.AdamW(params, lr=...), dist,
                                   ranks_per_node=2, powersgd_rank=4, d_model=cfg.d_model)
    loss = engine.module.loss(text, image)["loss"]; engine.backward(loss); engine.step()
    engine.comm_stats()                      # bytes of the last step, within and across groups

The optimizer: FSDP2 replaces the parameters by DTensors, so it must be built after sharding. Pass a
factory `make_optimizer(params) -> Optimizer`, or an optimizer built on the unsharded model (no state
yet): it is rebuilt, same class, defaults and param-group settings, on the sharded parameters.

Checkpoints: `dir/step_XXXXXXXX/` holds `meta.pt` (step, client state, topology) and one
`ordinal_OOOO.pt` per local ordinal (its parameter and optimizer shards, the parameters' whole shapes, the
error buffers summed over the same-ordinal ranks, and the shards of client-state tensors sharded like the
parameters, e.g. the loop's parameter EMA, which come back as such DTensors), written by group 0 into a
temporary directory that is renamed; then `dir/latest.sharded` names it. On resume every rank reads its
ordinal's file; group 0 divides the error sums by the number of groups and broadcasts them (the paper's
scheme: the mean error keeps the sum over groups, so the compressed updates continue as before). Resuming
needs the same topology. `consolidate_sharded_checkpoint` joins the shards into whole tensors without a
process group (export).
"""

from __future__ import annotations

import datetime
import inspect
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as tdist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from tessera.cluster.dist import DistState, free_port, init, node_size
from tessera.cluster.sharded_powersgd import CrossGroupReducer, Slot, error_sums, load_error_sums, paper_compression_rate
from tessera.core import files
from tessera.core.errors import CheckpointError, ConfigError
from tessera.core.files import atomic_write_bytes, load_checkpoint, save_checkpoint

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule

# FSDP2 and DTensor are imported where the sharded layout runs: importing them costs ~1.3 s per process on machine A
# (DTensor's ops pull in sympy), paid by every rank and CLI process that never shards anything.

LATEST = "latest.sharded"
DENSE_NAME = re.compile(r"emb")


@dataclass(frozen=True)
class Topology:
    """`world` ranks in groups of `ranks_per_node`; this rank's group and local ordinal."""

    rank: int
    world: int
    ranks_per_node: int

    def __post_init__(self) -> None:
        k, w = self.ranks_per_node, self.world
        if k < 1 or k > w or w % k:
            raise ConfigError(f"config key 'cluster.ranks_per_node': {k} ranks per node do not divide the world of {w} ranks")

    @property
    def n_groups(self) -> int:
        return self.world // self.ranks_per_node

    @property
    def group(self) -> int:
        return self.rank // self.ranks_per_node

    @property
    def ordinal(self) -> int:
        return self.rank % self.ranks_per_node

    @classmethod
    def of(cls, dist: DistState) -> "Topology":
        """The layout `tessera.cluster.dist.discover` found (and `cluster.ranks_per_node` set): no environment is read here."""
        return cls(dist.rank, dist.world_size, dist.group_size)

    @classmethod
    def discover(cls, rank: int, world: int, ranks_per_node: int = 0, env: dict[str, str] | None = None) -> "Topology":
        """`ranks_per_node` > 0 wins; else the launcher's ranks per node in `env` (`tessera.cluster.dist.node_size`); else one node."""
        return cls(rank, world, ranks_per_node if ranks_per_node > 0 else (node_size(os.environ if env is None else env) or world))


def build_mesh(topo: Topology, device_type: str = "cpu") -> DeviceMesh:
    """The 2-D mesh (replicate, shard): row g holds group g's ranks, column o the ranks of local ordinal o."""
    return init_device_mesh(device_type, (topo.n_groups, topo.ranks_per_node), mesh_dim_names=("replicate", "shard"))


def default_units(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP units below the root: every element of every nn.ModuleList (the resblocks), outermost lists only."""
    units: list[torch.nn.Module] = []
    for _, m in module.named_modules():
        if isinstance(m, torch.nn.ModuleList) and not any(_is_inside(m, u) for u in units):
            units.extend(m)
    return units


def _is_inside(m: torch.nn.Module, unit: torch.nn.Module) -> bool:
    return any(x is m for x in unit.modules())


def dense_parameter_names(module: torch.nn.Module, pattern: re.Pattern = DENSE_NAME) -> set[str]:
    """Parameters all-reduced uncompressed: 1-D ones (gains, biases), those of nn.Embedding modules, names matching `pattern`."""
    out = {n for n, p in module.named_parameters() if p.dim() < 2 or pattern.search(n)}
    for mname, m in module.named_modules():
        if isinstance(m, torch.nn.Embedding):
            out.update(f"{mname}.{n}" if mname else n for n, _ in m.named_parameters(recurse=False))
    return out


def _fsdp_groups(m: FSDPModule) -> list:
    return list(m._get_fsdp_state()._fsdp_param_groups)  # torch 2.13: no public accessor for a unit's parameters


def _unit_slots(m: FSDPModule, names: dict[int, str]) -> list[Slot]:
    """The unit's parameters in the order of its flat reduce-scatter output (torch's foreach_reduce layout)."""
    slots, offset = [], 0
    for group in _fsdp_groups(m):
        for fp in group.fsdp_params:
            if fp.fsdp_placement.dim != 0:
                raise ConfigError("the sharded engine shards parameters on dim 0 only")
            padded = fp.padded_sharded_param_size.numel()
            slots.append(Slot(fqn=names[id(fp.sharded_param)], offset=offset, shape=tuple(fp.sharded_size), padded_numel=padded))
            offset += padded
    return slots


def _rebuild_optimizer(opt: torch.optim.Optimizer, old_names: dict[int, str], new_params: dict[str, torch.nn.Parameter]):
    if any(opt.state.values()):
        raise ConfigError("the sharded engine needs an optimizer that has not stepped yet (it is rebuilt on the sharded parameters)")
    groups = []
    for g in opt.param_groups:
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": [new_params[old_names[id(p)]] for p in g["params"]]})
    accepted = inspect.signature(type(opt)).parameters
    return type(opt)(groups, **{k: v for k, v in opt.defaults.items() if k in accepted})


def _local(v: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return v.to_local().detach().clone() if isinstance(v, DTensor) else v


def _ensure_group(dist: DistState, timeout_s: float) -> DistState:
    if dist.world_size > 1 or tdist.is_initialized():
        return init(dist, backend=dist.backend or ("nccl" if torch.cuda.is_available() else "gloo"), timeout_s=timeout_s)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    tdist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1, timeout=datetime.timedelta(seconds=timeout_s)
    )
    dist.backend, dist.initialized = backend, True
    return dist


def choose_checkpoint(dist: DistState, directory: Path, names: list[str]) -> tuple[str | None, bool]:
    """`tessera.core.files.select_checkpoint` taken on rank 0 (which verifies, moves bad checkpoints aside and warns) and
    shared with every rank: (name, verified); (None, False) without a manifest. Its CheckpointError is raised on every rank.
    Every engine's restore calls it (tessera.cluster.engine imports it from here)."""
    out: list[Any] = [None]
    if dist.is_main:
        try:
            out = [files.select_checkpoint(directory, names)]
        except CheckpointError as e:
            out = [str(e)]
    if dist.initialized and dist.world_size > 1:
        tdist.broadcast_object_list(out, src=0)
    if isinstance(out[0], str):
        raise CheckpointError(out[0])
    return out[0]


def record_checkpoint(directory: Path, name: str, step: int, keep_last: int, pattern: str, known: dict | None = None) -> list[Path]:
    """Rank 0, after checkpoint `name` is complete: the manifest records it with the last `keep_last` of `pattern` (0 = all);
    returns the older ones to prune (after the manifest no longer lists them)."""
    on_disk = sorted(p for p in directory.glob(pattern) if p.name == name or files.step_of(p.name) is not None)
    keep = on_disk[-keep_last:] if keep_last > 0 else on_disk
    files.record_checkpoint(directory, name, step, [p.name for p in keep], known)
    return [p for p in on_disk if p not in keep]


class ShardedPowerSGDEngine:
    """FSDP2 within groups of `ranks_per_node` ranks, PowerSGD (rank `powersgd_rank`, 0 = fp32 all-reduce) across them.

    `grad_scale(fqn) -> float` is the current gradient scale of the parameter's resblock (default 1;
    `tessera.trainer.grad_scale.PerBlockScaler.scale_of` with per-resblock fp16 scales): the error
    buffers hold the reduced shard gradient / scale. With per-resblock scales the loop unscales the
    gradients after `backward` (the scaler checks the local shards, its flags combined over every
    rank), then calls `step()`, or `zero_grad()` on every rank for a skipped update, which (given a
    `grad_scale`) also puts the error buffers back as they were before that step. `units(module)` lists the FSDP units (default: the
    elements of the model's ModuleLists). `d_model` only feeds the paper's rate in `comm_stats`.
    """

    kind = "sharded"  # the interface of tessera.cluster.engine.Engine, without importing it (engine.py may import this module)
    scaler: Any = None  # no global fp16 loss scale here (per-resblock scales are the loop's)
    last_step_skipped = False  # what tessera.trainer.fit reads after step(): this engine never skips on its own

    def __init__(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer | Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer],
        dist: DistState | None = None,
        *,
        ranks_per_node: int = 0,
        powersgd_rank: int = 0,
        grad_clip: float = 0.0,
        grad_scale: Callable[[str], float] | None = None,
        units: Callable[[torch.nn.Module], list[torch.nn.Module]] = default_units,
        reshard_after_forward: bool = True,
        d_model: int | None = None,
        seed: int = 0,
        backend: str = "auto",
        timeout_s: float = 600.0,
        checkpoint_kind: str = "engine",
        powersgd_warm_start: bool = False,
        powersgd_start_iter: int = 0,
        dense_pattern: re.Pattern = DENSE_NAME,
    ):
        from torch.distributed.fsdp import fully_shard

        dist = _ensure_group(dist or DistState(), timeout_s).set_ranks_per_node(ranks_per_node)  # 0 keeps the discovered layout
        self.topology = Topology.of(dist)
        self.mesh = build_mesh(self.topology, dist.device.type)
        self.shard_mesh, self.replicate_group = self.mesh["shard"], self.mesh["replicate"].get_group()
        old_names = {id(p): n for n, p in module.named_parameters()}
        dense = dense_parameter_names(module, dense_pattern)
        with torch.no_grad():  # every rank starts from rank 0's weights, as DDP does
            for t in [*module.parameters(), *module.buffers()]:
                if dist.world_size > 1:
                    tdist.broadcast(t.data, src=0)
        self.units = [*units(module), module]
        for u in self.units[:-1]:
            fully_shard(u, mesh=self.shard_mesh, reshard_after_forward=reshard_after_forward)
        fully_shard(module, mesh=self.shard_mesh, reshard_after_forward=reshard_after_forward)
        new_params = dict(module.named_parameters())
        if isinstance(optimizer, torch.optim.Optimizer):
            optimizer = _rebuild_optimizer(optimizer, old_names, new_params)
        else:
            optimizer = optimizer(list(new_params.values()))
        self.module = self.wrapped = module
        self.optimizer, self.dist, self.grad_clip = optimizer, dist, grad_clip
        self.last_grad_norm: float | None = None
        self.checkpoint_kind = checkpoint_kind
        self.powersgd_rank, self.d_model = powersgd_rank, d_model
        self.reducer = CrossGroupReducer(
            powersgd_rank,
            self.replicate_group,
            self.topology.n_groups,
            scale=grad_scale,
            seed=seed,
            backend=backend,
            device=dist.device,
            warm_start=powersgd_warm_start,
            start_iter=powersgd_start_iter,
        )
        self._pending_errors: dict[str, list[torch.Tensor]] = {}  # per unit: its error buffers before this step's backward
        self._plan_units({id(p): n for n, p in new_params.items()}, dense)
        self._last_bytes: dict[str, Any] = {}

    def _plan_units(self, names: dict[int, str], dense: set[str]) -> None:
        names_of_units = {id(m): n or "<root>" for n, m in self.module.named_modules()}
        self._intra = {"reduce_scatter": 0, "all_gather": 0}
        k = self.topology.ranks_per_node
        for u in self.units:
            if not _fsdp_groups(u):
                continue
            name = names_of_units[id(u)]
            slots = _unit_slots(u, names)
            self.reducer.plan(name, slots, dense)
            u.set_all_reduce_hook(self._hook(name))
            if k > 1:  # payload per rank: the padded unsharded gradient in, the padded unsharded parameters out
                es = next(iter(_fsdp_groups(u)[0].fsdp_params)).sharded_param.element_size()
                full = sum(s.padded_numel for s in slots) * k * es
                gathers = 1 if u is self.module else (2 if self._reshards(u) else 1)
                self._intra["reduce_scatter"] += full
                self._intra["all_gather"] += gathers * full

    def _hook(self, name: str) -> Callable[[torch.Tensor], None]:
        """The unit's cross-group reduction; with per-resblock scales first a copy of its error buffers, which
        `zero_grad` (a skipped update) puts back (one more copy of the error buffers in memory, made once)."""
        reduce, plan = self.reducer.hook(name), self.reducer.plans[name]
        if self.reducer.scale is None or not plan.batches:
            return reduce
        copies = [torch.empty_like(b.error) for b in plan.batches]

        def hook(flat: torch.Tensor) -> None:
            if name not in self._pending_errors:
                for b, c in zip(plan.batches, copies):
                    c.copy_(b.error)
                self._pending_errors[name] = copies
            reduce(flat)

        return hook

    @staticmethod
    def _reshards(u: FSDPModule) -> bool:
        return all(g.post_forward_mesh_info is not None for g in _fsdp_groups(u))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> "ShardedPowerSGDEngine":
        self.module.train(mode)
        return self

    def eval(self) -> "ShardedPowerSGDEngine":
        return self.train(False)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()  # FSDP reduce-scatters each unit's gradients; its hook reduces them across groups

    def zero_grad(self) -> None:
        """Drop this step's gradients (the loop's skipped update); given a `grad_scale`, the error buffers go back to what
        they held before it: a skipped update applies nothing, so nothing of it may stay in the error feedback (else the
        finite blocks' buffers would keep M - P Q^T of a P Q^T that was never applied)."""
        with torch.no_grad():
            for name, saved in self._pending_errors.items():
                for b, e in zip(self.reducer.plans[name].batches, saved):
                    b.error.copy_(e)
        self._pending_errors.clear()
        self.reducer.take_bytes()
        self.optimizer.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    # -- the step ------------------------------------------------------------------------------------
    def step(self) -> None:
        from torch.distributed.tensor import DTensor

        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.grad is not None], self.grad_clip)
            self.last_grad_norm = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._pending_errors.clear()  # the update is applied: the new error buffers stand
        self._last_bytes = self._bytes(self.reducer.take_bytes())

    def _bytes(self, inter) -> dict[str, Any]:
        sent = inter.compressed + inter.uncompressed
        out: dict[str, Any] = {
            "intra_reduce_scatter_bytes": self._intra["reduce_scatter"],
            "intra_all_gather_bytes": self._intra["all_gather"],
            "inter_compressed_bytes": inter.compressed,
            "inter_uncompressed_bytes": inter.uncompressed,
            "inter_bytes": sent,
            "inter_dense_bytes": inter.dense_equivalent,
            "inter_ratio": sent / inter.dense_equivalent if inter.dense_equivalent else 1.0,
            "measured_compression_rate": 1.0 - inter.compressed / inter.compressed_dense_equivalent
            if inter.compressed_dense_equivalent
            else 0.0,
        }
        if self.d_model and self.powersgd_rank:
            out["paper_compression_rate"] = paper_compression_rate(self.powersgd_rank, self.d_model)
        return out

    def comm_stats(self) -> dict[str, Any]:
        """Payload bytes each rank handed to collectives in the last step, within and across groups, and the rates."""
        return dict(self._last_bytes)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model on every rank, on the CPU (every rank must call it: it all-gathers)."""
        from torch.distributed.tensor import DTensor

        out = {}
        for k, v in self.module.state_dict().items():
            v = v.full_tensor() if isinstance(v, DTensor) else v
            out[k] = v.detach().cpu().clone()
        return out

    # -- checkpoints --------------------------------------------------------------------------------
    def save_checkpoint(self, directory: str | Path, step: int, client_state: dict[str, Any] | None = None, keep_last: int = 2) -> Path:
        from torch.distributed.tensor import DTensor

        directory = Path(directory)
        tag = f"step_{int(step):08d}"
        final, tmp = directory / tag, directory / f".{tag}.tmp"
        topo = self.topology
        client, client_shards = self._split_client(client_state or {})  # e.g. the loop's EMA: sharded like the parameters
        errors = error_sums(self.reducer.error_state(), self.replicate_group)  # the sum over same-ordinal ranks
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.dist.barrier()
        if topo.group == 0:
            sd = self.module.state_dict()
            state = {
                "model": {k: _local(v) for k, v in sd.items()},
                "model_shapes": {k: list(v.shape) for k, v in sd.items() if isinstance(v, DTensor)},  # what consolidation joins
                "optimizer": _localize_optimizer(self.optimizer.state_dict()),
                "error_sum": errors,
                "client_shards": client_shards,
            }
            save_checkpoint(tmp / f"ordinal_{topo.ordinal:04d}.pt", self.checkpoint_kind, state)
        if self.dist.is_main:
            meta = {"step": int(step), "client": client, "world": topo.world, "ranks_per_node": topo.ranks_per_node}
            save_checkpoint(tmp / "meta.pt", self.checkpoint_kind, meta)
        self.dist.barrier()
        if self.dist.is_main:  # the folder, then the manifest (checksums), then latest.sharded, then pruning
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            old = record_checkpoint(directory, tag, step, keep_last, "step_*/")
            atomic_write_bytes(directory / LATEST, tag.encode())
            for p in old:
                shutil.rmtree(p, ignore_errors=True)
        self.dist.barrier()
        return final

    def load_checkpoint(self, directory: str | Path) -> tuple[int, dict[str, Any]]:
        from torch.distributed.tensor import DTensor, Shard

        directory = Path(directory)
        if not (directory / LATEST).exists():
            for other in ("latest.pt", "latest"):
                if (directory / other).exists():
                    raise CheckpointError(
                        f"checkpoint directory '{directory}' holds a {other} checkpoint of another engine, not a sharded one"
                    )
            return 0, {}
        folder = directory / self._choose(directory)
        meta = load_checkpoint(folder / "meta.pt", self.checkpoint_kind)
        topo = self.topology
        if (meta["world"], meta["ranks_per_node"]) != (topo.world, topo.ranks_per_node):
            raise CheckpointError(
                f"checkpoint '{folder}' was written by {meta['world']} ranks in groups of {meta['ranks_per_node']}, "
                f"this run has {topo.world} in groups of {topo.ranks_per_node}"
            )
        shard = load_checkpoint(folder / f"ordinal_{topo.ordinal:04d}.pt", self.checkpoint_kind, map_location=str(self.dist.device))
        with torch.no_grad():
            for k, v in self.module.state_dict().items():
                (v.to_local() if isinstance(v, DTensor) else v).copy_(shard["model"][k])
        self.optimizer.load_state_dict(shard["optimizer"])
        _wrap_optimizer_state(self.optimizer)
        self._load_errors(shard["error_sum"])
        client = dict(meta["client"])
        for rec in shard.get("client_shards", []):
            local = rec["local"].to(self.dist.device)
            t = DTensor.from_local(
                local, self.shard_mesh, [Shard(0)], run_check=False, shape=torch.Size(rec["shape"]), stride=tuple(rec["stride"])
            )
            _put(client, rec["path"], t)
        return int(meta["step"]), client

    def _split_client(self, client: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """`client` without its DTensors (meta.pt, rank 0), and their local shards as records {"path", "local", "shape", "stride"}
        (this ordinal's file): a client entry such as the loop's parameter EMA is sharded like the parameters, and saved so."""
        from torch.distributed.tensor import DTensor, Shard

        records: list[dict[str, Any]] = []

        def walk(obj: dict[str, Any], path: list[str]) -> dict[str, Any]:
            out = {}
            for k, v in obj.items():
                if isinstance(v, DTensor):
                    if v.device_mesh != self.shard_mesh or tuple(v.placements) != (Shard(0),):
                        where = ".".join([*path, str(k)])
                        raise ValueError(f"client_state entry '{where}': a DTensor sharded unlike the parameters ({v.placements})")
                    records.append({"path": [*path, k], "local": _local(v), "shape": list(v.shape), "stride": list(v.stride())})
                else:
                    out[k] = walk(v, [*path, k]) if isinstance(v, dict) else v
            return out

        return walk(client, []), records

    def _choose(self, directory: Path) -> str:
        """The newest intact checkpoint folder (verified against the manifest; latest.sharded is rewritten to name it), or the
        one latest.sharded names for a directory written before manifests."""
        names = sorted(p.name for p in directory.glob("step_*") if p.is_dir())
        name, verified = choose_checkpoint(self.dist, directory, names)
        if not verified:
            return (directory / LATEST).read_text().strip()
        if name is None:
            raise CheckpointError(f"checkpoint directory '{directory}' lists no checkpoint in its {files.MANIFEST}")
        if self.dist.is_main and (directory / LATEST).read_text().strip() != name:
            atomic_write_bytes(directory / LATEST, name.encode())
        self.dist.barrier()
        return name

    def _load_errors(self, sums: dict[str, torch.Tensor]) -> None:
        topo = self.topology  # the mean over the groups, from group 0's rank of this ordinal (global rank `ordinal`)
        load_error_sums(self.reducer.error_state(), sums, self.replicate_group, topo.n_groups, src=topo.ordinal)


def _put(obj: dict[str, Any], path: list[str], value: Any) -> None:
    for k in path[:-1]:
        obj = obj.setdefault(k, {})
    obj[path[-1]] = value


def consolidate_sharded_checkpoint(
    directory: str | Path, kind: str | tuple[str, ...], tag: str | None = None
) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """(step, client state, model state dict) of a sharded checkpoint, whole, without a process group (e.g. for export): each
    parameter's and each sharded client entry's (the EMA's) ordinal shards joined on dim 0, FSDP2's layout. `directory` is what
    `save_checkpoint` was given; `tag` picks another checkpoint than the one latest.sharded names."""
    directory = Path(directory)
    if tag is None:
        if not (directory / LATEST).is_file():
            raise CheckpointError(f"'{directory}' is not a sharded checkpoint directory (no '{LATEST}' file)")
        tag = (directory / LATEST).read_text(errors="replace").strip()
    folder = directory / tag
    if not folder.is_dir():
        raise CheckpointError(f"sharded checkpoint '{folder}' does not exist")
    meta = load_checkpoint(folder / "meta.pt", kind)
    shards = [load_checkpoint(folder / f"ordinal_{o:04d}.pt", kind) for o in range(int(meta["ranks_per_node"]))]
    if len(shards) > 1 and any("model_shapes" not in s for s in shards):
        raise CheckpointError(
            f"sharded checkpoint '{folder}' does not record its parameters' whole shapes (an older one); resume the run to write one that does"
        )

    def join(parts: list[torch.Tensor], shape: list[int], what: str) -> torch.Tensor:
        whole = torch.cat(parts) if len(parts) > 1 else parts[0]
        if list(whole.shape) != list(shape):
            raise CheckpointError(f"sharded checkpoint '{folder}': the shards of '{what}' join to {list(whole.shape)}, expected {shape}")
        return whole

    model = {}
    for k, v in shards[0]["model"].items():
        shape = shards[0].get("model_shapes", {}).get(k)
        model[k] = join([s["model"][k] for s in shards], shape, k) if shape is not None else v
    client = dict(meta["client"])
    for j, rec in enumerate(shards[0].get("client_shards", [])):
        _put(client, rec["path"], join([s["client_shards"][j]["local"] for s in shards], rec["shape"], ".".join(rec["path"])))
    return int(meta["step"]), client, model


def _localize_optimizer(sd: dict[str, Any]) -> dict[str, Any]:
    return {**sd, "state": {i: {k: _local(v) for k, v in s.items()} for i, s in sd["state"].items()}}


def _wrap_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """After load_state_dict: per-parameter state tensors become DTensors shaped like their (sharded) parameter again."""
    from torch.distributed.tensor import DTensor

    for g in opt.param_groups:
        for p in g["params"]:
            if not isinstance(p, DTensor):
                continue
            st = opt.state.get(p, {})
            local_shape = p.to_local().shape
            for k, v in list(st.items()):
                if torch.is_tensor(v) and not isinstance(v, DTensor) and v.dim() > 0 and v.shape == local_shape:
                    st[k] = DTensor.from_local(v, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
