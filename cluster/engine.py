"""Wrapping a model and its optimizer for training: plain, DDP, or DeepSpeed ZeRO, behind one interface.

Every training run goes through `build_engine`, the one place that creates the process group
(`cluster.backend`, `cluster.timeout_s`) and wraps the model; no trainer wraps a model itself.
The loop builds the model (on `dist.device`) and a torch optimizer, then:

    engine = build_engine(model, optimizer, dist, cfg.cluster, grad_clip=..., micro_batch_size=..., checkpoint_kind=...)
    out = engine(*inputs)              # forward through the wrapper (DDP / DeepSpeed hooks); at ZeRO bf16/fp16
                                       # floating-point inputs are cast to the model's dtype (outputs come back in it)
    engine.backward(loss)
    engine.step()                      # clip (grad_clip), optimizer step, zero the gradients
    engine.last_grad_norm              # the norm before clipping, when grad_clip > 0 (else None)
    engine.set_lr(lr)                  # the loop's schedule, on the real optimizer's groups
    engine.comm_stats()                # {"bytes_sent", "bytes_dense", "compression"} of the last step, or {}
    engine.save_checkpoint(dir, step, client_state)   # every rank calls it
    step, client_state = engine.load_checkpoint(dir)  # (0, {}) when dir holds none
    engine.full_state_dict()           # the whole model's weights on every rank (ZeRO-3 gathered)
    engine.module / engine.dist / engine.kind          # the unwrapped model, the DistState, "plain" | "ddp" | "deepspeed"

Kinds, chosen by `cluster.zero_stage` and the world size:
- `PlainEngine` (zero_stage 0, one process): no process group, no wrapper.
- `DDPEngine` (zero_stage 0, more processes): torch DistributedDataParallel (gloo or nccl) with
  `bucket_cap_mb = cluster.bucket_mb`, and, when `cluster.powersgd_rank > 0`, the PowerSGD reducer
  of `tessera.cluster.powersgd` as its comm hook (`powersgd_start_iter`, `powersgd_min_compression_rate`), whose
  state the checkpoint keeps ("powersgd_step", "powersgd_state": the error buffers summed over the ranks and the Qs, by
  parameter; each rank resumes from the mean error, as the sharded layout does).
  Plain and DDP checkpoints are our run-dir format (`tessera.core.files.save_checkpoint`, kind
  `checkpoint_kind`): `dir/step_XXXXXXXX.pt` and `dir/latest.pt`, written by rank 0.
  Every layout's directory also holds `manifest.json` (sha256 and size of each kept checkpoint's files,
  `tessera.core.files`); `load_checkpoint` verifies the newest against it and falls back to the previous one
  (docs/CONTRACTS.md, "Checkpoint manifest").
- `DeepSpeedEngine` (zero_stage 1, 2, 3, even in one process): `deepspeed.initialize` with a config
  dict built from `DistConfig` (`deepspeed_config`: precision, bucket_mb as the reduce / allgather /
  prefetch bucket sizes, overlap_comm, offload_optimizer); checkpoints are DeepSpeed's own sharded
  layout (`dir/latest` naming the tag `step_XXXXXXXX`, one model-states file and one optimizer
  shard per rank). `consolidate_zero_checkpoint(dir)` turns one into a single fp32 state dict
  (DeepSpeed's zero_to_fp32), e.g. for export.

`comm_stats()` counts, per rank, what one backward pass hands to all-reduce: with PowerSGD the
reducer's measured P, Q and uncompressed tensors against the dense size of the same gradients;
plain DDP hands over every gradient (`bytes_sent == bytes_dense`); plain and DeepSpeed engines give {}.

On CPU, DeepSpeed runs with DS_ACCELERATOR=cpu and a gloo process group. A torch optimizer object
is passed in (not an "optimizer" config entry) so that no C++ op is JIT-built.
"""

from __future__ import annotations

import datetime
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tessera.cluster.config import DistConfig
from tessera.cluster.dist import DistState, discover, init
from tessera.cluster.powersgd import PowerSGDReducer, ddp_comm_hook
from tessera.cluster.sharded import ShardedPowerSGDEngine, choose_checkpoint, record_checkpoint
from tessera.cluster.sharded_powersgd import error_sums, load_error_sums
from tessera.core import files
from tessera.core.errors import CheckpointError, ConfigError
from tessera.kernels.powersgd import MAX_RANK

CHECKPOINT_KIND = "engine"
_RESERVED = ("kind", "format", "step", "model", "optimizer", "powersgd_step", "powersgd_state")


def _tag(step: int) -> str:
    return f"step_{int(step):08d}"


class Engine:
    """The uniform interface; `module` is always the unwrapped model (what the loop built)."""

    kind = "base"
    scaler: Any = None  # a torch.amp.GradScaler for fp16 (build_engine's `scaler`)
    last_step_skipped = False

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, dist: DistState, grad_clip: float = 0.0):
        self.module = module
        self.optimizer = optimizer
        self.dist = dist
        self.grad_clip = grad_clip
        self.wrapped: torch.nn.Module = module
        self.last_grad_norm: float | None = None
        self.checkpoint_kind = CHECKPOINT_KIND

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapped(*args, **kwargs)

    def train(self, mode: bool = True) -> "Engine":
        self.wrapped.train(mode)
        return self

    def eval(self) -> "Engine":
        return self.train(False)

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of `loss`, scaled by the loss scaler when one is set (fp16)."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self) -> None:
        """Unscale (fp16), clip to `grad_clip` (0: measure only), step, zero the gradients.

        With a scaler the step is skipped when a gradient is inf/nan (`last_step_skipped`) and the
        scale adapts (torch.amp.GradScaler); `last_grad_norm` is the unscaled norm before clipping.
        """
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm))
        if self.scaler is None:
            self.optimizer.step()
            self.last_step_skipped = False
        else:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.last_step_skipped = self.scaler.get_scale() < scale
        self.optimizer.zero_grad(set_to_none=True)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def comm_stats(self) -> dict[str, float]:
        """Bytes this rank handed to all-reduce in the last backward pass (see the module docstring); {} without a measure."""
        return {}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer of the model, whole, on the CPU (identical on every rank)."""
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    # -- checkpoints: our run-dir format, written by rank 0, read by every rank
    def save_checkpoint(self, directory: str | Path, step: int, client_state: dict[str, Any] | None = None, keep_last: int = 2) -> Path:
        """Every rank calls it; rank 0 writes step_XXXXXXXX.pt and latest.pt and keeps the last `keep_last` steps (0 = all).

        The file is a run-dir checkpoint of kind `self.checkpoint_kind`: `client_state`'s entries
        at the top level beside "step", "model" and "optimizer" (the trainers' own layout).
        """
        directory = Path(directory)
        path = directory / f"{_tag(step)}.pt"
        extra = self._extra_state()  # on every rank: it may be a collective
        if self.dist.is_main:
            clash = sorted(set(client_state or {}) & set(_RESERVED))
            if clash:
                raise ValueError(f"client_state keys {clash} are reserved by the engine checkpoint")
            state = {**(client_state or {}), "step": int(step), "model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}
            state.update(extra)
            data = files.checkpoint_bytes(self.checkpoint_kind, state)
            directory.mkdir(parents=True, exist_ok=True)
            files.atomic_write_bytes(path, data)  # the step file, the manifest (checksums), latest.pt (a copy), then pruning
            old = record_checkpoint(directory, path.name, step, keep_last, "step_*.pt", {path.name: files.digest(data)})
            files.atomic_write_bytes(directory / "latest.pt", data)
            _remove(old)
        self.dist.barrier()
        return path

    def load_checkpoint(self, directory: str | Path) -> tuple[int, dict[str, Any]]:
        directory = Path(directory)
        path = directory / "latest.pt"
        if not path.exists() and not (directory / files.MANIFEST).exists():
            if (directory / "latest").exists():
                raise CheckpointError(
                    f"checkpoint directory '{directory}' holds a DeepSpeed ZeRO checkpoint; set cluster.zero_stage to load it or consolidate it"
                )
            return 0, {}
        name, verified = choose_checkpoint(self.dist, directory, sorted(p.name for p in directory.glob("step_*.pt")))
        if verified:
            if name is None:
                return 0, {}
            path = directory / name
            if self.dist.is_main:
                _repair_copy(path, directory / "latest.pt")
        ck = files.load_checkpoint(
            path, self.checkpoint_kind, map_location=str(self.dist.device) if self.dist.device.type != "cpu" else "cpu"
        )
        self.module.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self._load_extra_state(ck)
        return int(ck["step"]), {k: v for k, v in ck.items() if k not in _RESERVED}

    def _extra_state(self) -> dict[str, Any]:
        """Entries of the engine's own beside "model" and "optimizer"; every rank calls it (rank 0's are written)."""
        return {}

    def _load_extra_state(self, ck: dict[str, Any]) -> None:
        pass


class PlainEngine(Engine):
    kind = "plain"


class DDPEngine(Engine):
    kind = "ddp"

    def __init__(self, module, optimizer, dist, cfg: DistConfig, grad_clip: float = 0.0):
        super().__init__(module, optimizer, dist, grad_clip)
        dev = dist.device
        self.wrapped = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[dev.index] if dev.type == "cuda" else None, bucket_cap_mb=cfg.bucket_mb
        )
        self.reducer: PowerSGDReducer | None = None
        if cfg.powersgd_rank > 0:
            self.reducer = PowerSGDReducer(
                rank=cfg.powersgd_rank,
                min_compression_rate=cfg.powersgd_min_compression_rate,
                start_iter=cfg.powersgd_start_iter,
                param_names={id(p): n for n, p in module.named_parameters()},  # error buffers and Qs by parameter (checkpoints)
            )
            self.wrapped.register_comm_hook(self.reducer, ddp_comm_hook)
        # what DDP's own all-reduce hands over each backward pass: every gradient, in its buckets
        self._dense_bytes = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)

    def comm_stats(self) -> dict[str, float]:
        if self.reducer is None:
            return {"bytes_sent": self._dense_bytes, "bytes_dense": self._dense_bytes, "compression": 1.0}
        sent, dense = self.reducer.bytes_sent_last_step, self.reducer.bytes_dense_last_step
        return {"bytes_sent": sent, "bytes_dense": dense, "compression": dense / sent if sent else 1.0}

    # PowerSGD: the step count, the warm-start Qs (the same on every rank) and the error-feedback buffers as the paper keeps
    # them (tessera.cluster.sharded_powersgd.error_sums: summed over the ranks); on resume rank 0 divides the sums by the
    # number of ranks that wrote them and broadcasts the mean (load_error_sums), which keeps the sum over the ranks, so the
    # compressed updates go on as in the uninterrupted run (exactly in real arithmetic; within float rounding here).
    def _extra_state(self) -> dict[str, Any]:
        if self.reducer is None:
            return {}
        sums = error_sums(self.reducer.error_state(), None)  # a collective over every rank
        qs = {k: v.detach().clone() for k, v in sorted(self.reducer.q_state().items())}
        return {"powersgd_step": self.reducer.step, "powersgd_state": {"ranks": self.dist.world_size, "error_sum": sums, "q": qs}}

    def _load_extra_state(self, ck: dict[str, Any]) -> None:
        if self.reducer is None:
            return
        if "powersgd_step" in ck:
            self.reducer.step = int(ck["powersgd_step"])
        st = ck.get("powersgd_state")
        if st:  # every rank read the same file; rank 0's mean is broadcast
            errors = {k: torch.empty_like(v, device=self.dist.device) for k, v in st["error_sum"].items()}
            load_error_sums(errors, st["error_sum"], None, int(st["ranks"]), src=0)
            self.reducer.load_state(errors, st["q"])


class DeepSpeedEngine(Engine):
    kind = "deepspeed"

    def __init__(self, module, optimizer, dist, cfg: DistConfig, grad_clip: float = 0.0, micro_batch_size: int = 1):
        import deepspeed

        super().__init__(module, optimizer, dist, grad_clip)
        self.cfg = cfg
        self.ds_config = deepspeed_config(cfg, dist.world_size, micro_batch_size, grad_clip)
        if not torch.cuda.is_available() and os.environ.get("TESSERA_DS_SHM_COMM") != "1":
            # DeepSpeed's CPU communicator JIT-compiles a shared-memory all-reduce op (minutes of C++
            # on a small machine) that only speeds up inference all-reduce; marking it incompatible
            # makes DeepSpeed fall back to the gloo group, as it does off Linux.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # the group exists (build_engine made it); DeepSpeed wraps it, and any group it adds gets the same timeout
        deepspeed.init_distributed(dist_backend=dist.backend, timeout=datetime.timedelta(seconds=cfg.timeout_s), verbose=False)
        self.ds, self.ds_optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=self.ds_config)
        self.wrapped = self.ds
        # DeepSpeed casts the model to bf16/fp16 but not the inputs: floating-point inputs are cast here
        self.input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.input_dtype is not None:
            args = tuple(_cast(a, self.input_dtype) for a in args)
            kwargs = {k: _cast(v, self.input_dtype) for k, v in kwargs.items()}
        return self.ds(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        self.ds.step()  # clips (config gradient_clipping), steps, zeros the gradients
        norm = self.ds.get_global_grad_norm()
        self.last_grad_norm = None if norm is None else float(norm)

    def zero_grad(self) -> None:
        self.ds.zero_grad()

    def set_lr(self, lr: float) -> None:
        for g in self.ds_optimizer.param_groups:
            g["lr"] = lr

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        if self.cfg.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                return _cpu_fp32(self.module.state_dict())
        return _cpu_fp32(self.module.state_dict())

    def save_checkpoint(self, directory: str | Path, step: int, client_state: dict[str, Any] | None = None, keep_last: int = 2) -> Path:
        """Every rank writes its shard under `directory/step_XXXXXXXX/`; `directory/latest` names it."""
        directory = Path(directory)
        if self.dist.is_main:
            directory.mkdir(parents=True, exist_ok=True)
        self.dist.barrier()
        state = {"step": int(step), "client": client_state or {}}
        self.ds.save_checkpoint(str(directory), tag=_tag(step), client_state=state)  # ends with a barrier; writes `latest`
        if self.dist.is_main:  # every rank's files are complete: the manifest records their checksums, then pruning
            _remove(record_checkpoint(directory, _tag(step), step, keep_last, "step_*/"))
        self.dist.barrier()
        return directory / _tag(step)

    def load_checkpoint(self, directory: str | Path) -> tuple[int, dict[str, Any]]:
        directory = Path(directory)
        if not (directory / "latest").exists() and not (directory / files.MANIFEST).exists():
            if (directory / "latest.pt").exists():
                raise CheckpointError(
                    f"checkpoint directory '{directory}' holds a DDP/plain checkpoint (latest.pt), not a ZeRO one; set cluster.zero_stage = 0"
                )
            return 0, {}
        tag, verified = choose_checkpoint(self.dist, directory, sorted(p.name for p in directory.glob("step_*") if p.is_dir()))
        if verified and tag is None:
            return 0, {}
        if verified and self.dist.is_main and (directory / "latest").read_text().strip() != tag:
            files.atomic_write_bytes(directory / "latest", tag.encode())  # DeepSpeed's pointer (export reads it) names it again
        self.dist.barrier()
        path, state = self.ds.load_checkpoint(str(directory), tag=tag)
        if path is None:
            raise CheckpointError(f"DeepSpeed checkpoint in '{directory}' could not be loaded (tag in {directory / 'latest'})")
        return int(state.get("step", 0)), dict(state.get("client") or {})


def _cast(x: Any, dtype: torch.dtype) -> Any:
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _cpu_fp32(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone() for k, v in sd.items()}


def _repair_copy(src: Path, copy: Path) -> None:
    """latest.pt made a copy of the verified checkpoint `src` again where it differs (a save cut short, a corrupt copy)."""
    if not copy.exists() or copy.stat().st_size != src.stat().st_size or files.file_digest(copy) != files.file_digest(src):
        files.atomic_write_bytes(copy, src.read_bytes())


def _remove(paths: list[Path]) -> None:
    for old in paths:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def deepspeed_config(cfg: DistConfig, world_size: int, micro_batch_size: int = 1, grad_clip: float = 0.0) -> dict[str, Any]:
    """The DeepSpeed config dict for `cfg` (no "optimizer" entry: the loop's torch optimizer is used)."""
    bucket = int(cfg.bucket_mb * 2**20 // 4)  # elements
    zero: dict[str, Any] = {
        "stage": cfg.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": cfg.overlap_comm,
        "reduce_scatter": True,
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
    }
    if cfg.zero_stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": bucket,
                "stage3_param_persistence_threshold": 0,
                "stage3_gather_16bit_weights_on_model_save": False,
            }
        )
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(micro_batch_size),
        "gradient_accumulation_steps": 1,
        "train_batch_size": int(micro_batch_size) * int(world_size),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        out["zero_force_ds_cpu_optimizer"] = False  # the loop's torch optimizer steps the offloaded states (no C++ CPU Adam)
    if grad_clip > 0:
        out["gradient_clipping"] = float(grad_clip)
    if cfg.precision == "bf16":
        out["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
        out["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return out


def _prepare_deepspeed_env(dist: DistState) -> None:
    """DeepSpeed reads the ranks from the environment (and tries mpi4py discovery when they are missing): write the one
    discovered layout there (the master address follows in `init`)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"] = str(dist.rank), str(dist.world_size), str(dist.local_rank)


def build_engine(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    dist: DistState | None = None,
    cfg: DistConfig | None = None,
    *,
    grad_clip: float = 0.0,
    micro_batch_size: int = 1,
    checkpoint_kind: str = CHECKPOINT_KIND,
    scaler: Any = None,
    grad_scale: Callable[[str], float] | None = None,
) -> Engine:
    """Wrap `model` (already on `dist.device`) and `optimizer` as `cfg` asks, creating the process group if needed.

    `dist` None = discovered from the launcher's environment. The group is created with
    `cfg.backend` and `cfg.timeout_s`; one that exists already must agree with both (else a
    ConfigError naming the key). zero_stage 0: DDP when the world is larger than one process,
    else plain (no group; PowerSGD has nothing to compress). zero_stage 1-3: DeepSpeed, even in a
    single process (a one-rank group is created for it). `micro_batch_size` is the per-rank batch
    (DeepSpeed's bookkeeping only). `checkpoint_kind` is the run-dir kind of plain/DDP checkpoints
    (e.g. "transformer", so export reads them). The engine's `dist` is the initialised state.
    `scaler`: a torch.amp.GradScaler (fp16 autocast) that backward/step apply; plain and DDP only
    (DeepSpeed scales the loss itself with cluster.precision = "fp16"; the sharded layout takes
    per-resblock scales, tessera.trainer.grad_scale). `grad_scale(fqn)`: the per-resblock scale of a
    parameter (`PerBlockScaler.scale_of`), which the sharded layout's PowerSGD error buffers divide by;
    the plain and DDP engines need none (the loop unscales their gradients after backward).
    """
    cfg = cfg or DistConfig()
    cfg.validate()
    if cfg.powersgd_rank > MAX_RANK:
        raise ConfigError(f"config key 'cluster.powersgd_rank': expected <= {MAX_RANK}, got {cfg.powersgd_rank}")
    dist = dist or discover()  # the one discovered layout; in the sharded layout cluster.ranks_per_node (> 0) sets its groups
    if scaler is not None and (cfg.sharded or cfg.zero_stage > 0):
        layout = "cluster.sharded = true" if cfg.sharded else f"cluster.zero_stage = {cfg.zero_stage}"
        raise ConfigError(f"training precision 'fp16' with one global loss scale is for the plain and DDP engines, not {layout}")
    if cfg.sharded:
        dist = init(dist.set_ranks_per_node(cfg.ranks_per_node), cfg.backend, cfg.timeout_s, single_group=True)
        eng: Engine = ShardedPowerSGDEngine(
            model,
            optimizer,
            dist,
            powersgd_rank=cfg.powersgd_rank,
            grad_clip=grad_clip,
            grad_scale=grad_scale,
            timeout_s=cfg.timeout_s,
            checkpoint_kind=checkpoint_kind,
        )
    elif cfg.zero_stage == 0:
        dist = init(dist, cfg.backend, cfg.timeout_s)
        eng = DDPEngine(model, optimizer, dist, cfg, grad_clip) if dist.world_size > 1 else PlainEngine(model, optimizer, dist, grad_clip)
        eng.scaler = scaler
    else:
        if cfg.precision == "fp16" and not torch.cuda.is_available():
            if not (hasattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported") and torch.ops.mkldnn._is_mkldnn_fp16_supported()):
                raise ConfigError("config key 'cluster.precision': fp16 is not supported by this CPU (mkldnn fp16); use 'fp32' or 'bf16'")
        _prepare_deepspeed_env(dist)
        dist = init(dist, cfg.backend, cfg.timeout_s, single_group=True)
        eng = DeepSpeedEngine(model, optimizer, dist, cfg, grad_clip, micro_batch_size)
    eng.checkpoint_kind = checkpoint_kind
    return eng


def consolidate_zero_checkpoint(directory: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """One fp32 state dict from a DeepSpeed ZeRO (1, 2 or 3) checkpoint directory; no process group needed.

    `directory` is what `engine.save_checkpoint` was given (holding `latest`); `tag` picks another
    than the latest, e.g. "step_00000100".
    """
    directory = Path(directory)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if tag is None and not (directory / "latest").exists():
        raise CheckpointError(f"'{directory}' is not a DeepSpeed checkpoint directory (no 'latest' file)")
    if tag is not None and not (directory / tag).is_dir():
        raise CheckpointError(f"DeepSpeed checkpoint '{directory / tag}' does not exist")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        sd = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(
            f"DeepSpeed checkpoint in '{directory}' is incomplete ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    return {k: v.detach().clone() for k, v in sd.items()}


def zero_checkpoint_client_state(directory: str | Path, tag: str | None = None) -> tuple[int, dict[str, Any]]:
    """(step, client_state) saved with a DeepSpeed checkpoint by `DeepSpeedEngine.save_checkpoint`, without DeepSpeed."""
    directory = Path(directory)
    if tag is None:
        latest = directory / "latest"
        if not latest.exists():
            raise CheckpointError(f"'{directory}' is not a DeepSpeed checkpoint directory (no 'latest' file)")
        tag = latest.read_text().strip()
    # ZeRO 1/2 write one mp_rank_00_model_states.pt; ZeRO 3 one per rank (rank 0's holds the same client state)
    cands = [directory / tag / n for n in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")]
    path = next((c for c in cands if c.exists()), None)
    if path is None:
        raise CheckpointError(f"DeepSpeed checkpoint '{directory / tag}' has no model-states file (expected {cands[0].name})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint '{path}' is truncated or corrupt ({type(e).__name__})") from None
    return int(obj.get("step", 0)), dict(obj.get("client") or {})
