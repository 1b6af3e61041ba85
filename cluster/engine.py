"""Wrapping a model and its optimizer for training: plain, DDP, or DeepSpeed ZeRO, behind one interface.

The training loop builds the model and the optimizer, then calls `build_engine(model, optimizer,
dist, cfg)`; from then on it uses only the engine:

    out = engine(*inputs)              # forward through the wrapper (DDP / DeepSpeed hooks)
    engine.backward(loss)
    engine.step()                      # clip (grad_clip), optimizer step, zero the gradients
    engine.set_lr(lr)                  # the loop's schedule, on the real optimizer's groups
    engine.save_checkpoint(dir, step, client_state)   # every rank calls it
    step, client_state = engine.load_checkpoint(dir)  # (0, {}) when dir holds none
    engine.full_state_dict()           # the whole model's weights on every rank (ZeRO-3 gathered)

Kinds:
- `PlainEngine`: one process; `DDPEngine`: torch DistributedDataParallel (gloo or nccl), with the
  PowerSGD reducer of `tessera.cluster.powersgd` as its comm hook when `cfg.powersgd_rank > 0`. Their
  checkpoints are our run-dir format (`tessera.core.files.save_checkpoint`, kind "engine"):
  `dir/step_XXXXXXXX.pt` and `dir/latest.pt`, written by rank 0.
- `DeepSpeedEngine`: `deepspeed.initialize` at ZeRO stage 1, 2 or 3 with a config dict built
  from `DistConfig`; checkpoints are DeepSpeed's own sharded layout (`dir/latest` naming the tag
  `step_XXXXXXXX`, one model-states file and one optimizer shard per rank).
  `consolidate_zero_checkpoint(dir)` turns such a checkpoint into one fp32 state dict (DeepSpeed's
  zero_to_fp32), e.g. for export.

On CPU, DeepSpeed runs with DS_ACCELERATOR=cpu and a gloo process group. A torch optimizer object
is passed in (not an "optimizer" config entry) so that no C++ op is JIT-built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from tessera.cluster.config import DistConfig
from tessera.cluster.dist import DistState, free_port, init
from tessera.core.errors import CheckpointError, ConfigError

CHECKPOINT_KIND = "engine"
_RESERVED = ("kind", "format", "step", "model", "optimizer", "powersgd_step")


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

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer of the model, whole, on the CPU (identical on every rank)."""
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    # -- checkpoints: our run-dir format, written by rank 0, read by every rank
    def save_checkpoint(self, directory: str | Path, step: int, client_state: dict[str, Any] | None = None, keep_last: int = 2) -> Path:
        """Every rank calls it; rank 0 writes step_XXXXXXXX.pt and latest.pt and keeps the last `keep_last` steps (0 = all).

        The file is a run-dir checkpoint of kind `self.checkpoint_kind`: `client_state`'s entries
        at the top level beside "step", "model" and "optimizer" (the trainers' own layout).
        """
        from tessera.core.files import save_checkpoint

        directory = Path(directory)
        path = directory / f"{_tag(step)}.pt"
        if self.dist.is_main:
            clash = sorted(set(client_state or {}) & set(_RESERVED))
            if clash:
                raise ValueError(f"client_state keys {clash} are reserved by the engine checkpoint")
            state = {**(client_state or {}), "step": int(step), "model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}
            state.update(self._extra_state())
            save_checkpoint(path, self.checkpoint_kind, state)
            save_checkpoint(directory / "latest.pt", self.checkpoint_kind, state)
            _prune(sorted(directory.glob("step_*.pt")), keep_last)
        self.dist.barrier()
        return path

    def load_checkpoint(self, directory: str | Path) -> tuple[int, dict[str, Any]]:
        from tessera.core.files import load_checkpoint

        path = Path(directory) / "latest.pt"
        if not path.exists():
            if (Path(directory) / "latest").exists():
                raise CheckpointError(
                    f"checkpoint directory '{directory}' holds a DeepSpeed ZeRO checkpoint; set cluster.zero_stage to load it or consolidate it"
                )
            return 0, {}
        ck = load_checkpoint(path, self.checkpoint_kind, map_location=str(self.dist.device) if self.dist.device.type != "cpu" else "cpu")
        self.module.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self._load_extra_state(ck)
        return int(ck["step"]), {k: v for k, v in ck.items() if k not in _RESERVED}

    def _extra_state(self) -> dict[str, Any]:
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
        self.reducer = None
        if cfg.powersgd_rank > 0:
            from tessera.cluster.powersgd import PowerSGDReducer, ddp_comm_hook

            self.reducer = PowerSGDReducer(
                rank=cfg.powersgd_rank, min_compression_rate=cfg.powersgd_min_compression_rate, start_iter=cfg.powersgd_start_iter
            )
            self.wrapped.register_comm_hook(self.reducer, ddp_comm_hook)

    # PowerSGD: the step count is saved so that compression resumes at once; the error-feedback
    # buffers and warm-start Qs are per rank and not saved (they rebuild within a few steps).
    def _extra_state(self) -> dict[str, Any]:
        return {"powersgd_step": self.reducer.step} if self.reducer is not None else {}

    def _load_extra_state(self, ck: dict[str, Any]) -> None:
        if self.reducer is not None and "powersgd_step" in ck:
            self.reducer.step = int(ck["powersgd_step"])


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
        deepspeed.init_distributed(dist_backend=dist.backend or _backend(cfg), verbose=False)
        self.ds, self.ds_optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=self.ds_config)
        self.wrapped = self.ds

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

            params = list(self.module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return {
                    k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone()
                    for k, v in self.module.state_dict().items()
                }
        return {
            k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone()
            for k, v in self.module.state_dict().items()
        }

    def save_checkpoint(self, directory: str | Path, step: int, client_state: dict[str, Any] | None = None, keep_last: int = 2) -> Path:
        """Every rank writes its shard under `directory/step_XXXXXXXX/`; `directory/latest` names it."""
        directory = Path(directory)
        if self.dist.is_main:
            directory.mkdir(parents=True, exist_ok=True)
        self.dist.barrier()
        state = {"step": int(step), "client": client_state or {}}
        self.ds.save_checkpoint(str(directory), tag=_tag(step), client_state=state)  # ends with a barrier
        if self.dist.is_main:
            _prune(sorted(p for p in directory.glob("step_*") if p.is_dir()), keep_last)
        self.dist.barrier()
        return directory / _tag(step)

    def load_checkpoint(self, directory: str | Path) -> tuple[int, dict[str, Any]]:
        directory = Path(directory)
        if not (directory / "latest").exists():
            if (directory / "latest.pt").exists():
                raise CheckpointError(
                    f"checkpoint directory '{directory}' holds a DDP/plain checkpoint (latest.pt), not a ZeRO one; set cluster.zero_stage = 0"
                )
            return 0, {}
        path, state = self.ds.load_checkpoint(str(directory))
        if path is None:
            raise CheckpointError(f"DeepSpeed checkpoint in '{directory}' could not be loaded (tag in {directory / 'latest'})")
        return int(state.get("step", 0)), dict(state.get("client") or {})


def _prune(paths: list[Path], keep_last: int) -> None:
    """Delete all but the last `keep_last` of `paths` (sorted oldest first); 0 keeps everything."""
    import shutil

    for old in paths[:-keep_last] if keep_last > 0 else []:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _backend(cfg: DistConfig) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


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
    if cfg.offload_optimizer and cfg.zero_stage >= 2:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(micro_batch_size),
        "gradient_accumulation_steps": 1,
        "train_batch_size": int(micro_batch_size) * int(world_size),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if grad_clip > 0:
        out["gradient_clipping"] = float(grad_clip)
    if cfg.precision == "bf16":
        out["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
        out["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return out


def _prepare_deepspeed_env(dist: DistState) -> None:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed reads these (and tries mpi4py discovery when they are missing)
    os.environ.setdefault("RANK", str(dist.rank))
    os.environ.setdefault("WORLD_SIZE", str(dist.world_size))
    os.environ.setdefault("LOCAL_RANK", str(dist.local_rank))
    os.environ.setdefault("MASTER_ADDR", os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
    if dist.world_size == 1:
        os.environ.setdefault("MASTER_PORT", str(free_port()))


def build_engine(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    dist: DistState | None,
    cfg: DistConfig | None = None,
    *,
    grad_clip: float = 0.0,
    micro_batch_size: int = 1,
    checkpoint_kind: str = CHECKPOINT_KIND,
    scaler: Any = None,
) -> Engine:
    """Wrap `model` (already on `dist.device`) and `optimizer` as `cfg` asks; initialises the process group if needed.

    zero_stage 0: DDP when the world is larger than one process, else plain. zero_stage 1-3:
    DeepSpeed, even in a single process (a one-rank gloo/nccl group is created for it).
    `micro_batch_size` is the per-rank batch (DeepSpeed's bookkeeping only). `checkpoint_kind`
    is the run-dir kind of plain/DDP checkpoints (e.g. "transformer", so export reads them).
    `scaler`: a torch.amp.GradScaler (fp16 autocast) that backward/step apply; plain and DDP only
    (DeepSpeed scales the loss itself with cluster.precision = "fp16").
    """
    cfg = cfg or DistConfig()
    cfg.validate()
    dist = dist or DistState()
    backend = _backend(cfg)
    if cfg.zero_stage == 0:
        dist = init(dist, backend=backend, timeout_s=cfg.timeout_s)
        eng: Engine = (
            DDPEngine(model, optimizer, dist, cfg, grad_clip) if dist.world_size > 1 else PlainEngine(model, optimizer, dist, grad_clip)
        )
        eng.checkpoint_kind = checkpoint_kind
        eng.scaler = scaler
        return eng
    if scaler is not None:
        raise ConfigError("fp16 training precision under DeepSpeed: set cluster.precision = 'fp16' (DeepSpeed's own loss scaling)")

    if cfg.precision == "fp16" and not torch.cuda.is_available():
        if not (hasattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported") and torch.ops.mkldnn._is_mkldnn_fp16_supported()):
            raise ConfigError("config key 'cluster.precision': fp16 is not supported by this CPU (mkldnn fp16); use 'fp32' or 'bf16'")
    _prepare_deepspeed_env(dist)
    if dist.world_size == 1 and not torch.distributed.is_initialized():
        import datetime

        torch.distributed.init_process_group(backend=backend, rank=0, world_size=1, timeout=datetime.timedelta(seconds=cfg.timeout_s))
        dist.backend, dist.initialized = backend, True
    else:
        dist = init(dist, backend=backend, timeout_s=cfg.timeout_s)
    return DeepSpeedEngine(model, optimizer, dist, cfg, grad_clip, micro_batch_size)


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
