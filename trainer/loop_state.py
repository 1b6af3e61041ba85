"""The parts of tessera.trainer.fit's loop that hold state: checkpoints and exact resume, the stop decision, evaluation.

Checkpoint entries written for every task (beside the engine's "step", "model", "optimizer" and the
task's own): "ema" (None without EMA), "data" and "rng" (one entry per rank: its data position and
torch RNG states), "horizon" (the cosine horizon fitted to the time budget, 0 = steps), "elapsed_s"
(training seconds of all runs so far), "scaler" (the fp16 loss scale), "grad_scale" (the per-resblock
scales, tessera.trainer.grad_scale, with grad_scaling = "per_resblock"; None otherwise) and, in the last
one of a run, "metrics" (the summary). Plain/DDP checkpoints are checkpoints/step_XXXXXXXX.pt and latest.pt;
DeepSpeed ZeRO's are checkpoints/zero/; the sharded layout's are checkpoints/step_XXXXXXXX/ folders, where the EMA of
the FSDP2-sharded parameters is sharded like them, in each ordinal's file (the engines' own layouts).
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tessera.cluster.slurm import PreemptionHandler, SlurmError
from tessera.core.errors import CheckpointError, ConfigError
from tessera.core.files import atomic_write_bytes
from tessera.core.progress import bar
from tessera.trainer.grad_scale import PerBlockScaler, wrap_resblocks

ZERO_DIR = "zero"  # checkpoints/zero/: DeepSpeed ZeRO checkpoints (cluster.zero_stage > 0)
HORIZON_PROBE = 20  # updates between re-estimates of the budget's horizon


class DivergedError(ConfigError):
    """The loss became inf/nan."""


@dataclass
class LoopState:
    step: int = 0
    start: int = 0
    horizon: int = 0
    elapsed: float = 0.0
    skipped: int = 0
    data: list | None = None
    rng: Any = None


def scalar(v: Any) -> Any:
    """A metric value for metrics.jsonl: tensors and callables (computed only on logged steps) become numbers."""
    v = v() if callable(v) else v
    return v.item() if isinstance(v, torch.Tensor) else v


def _gather(dist: Any, obj: Any) -> list[Any]:
    if dist.initialized and dist.world_size > 1:
        out: list[Any] = [None] * dist.world_size
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


def rank_mean(dist: Any, values: dict[str, Any]) -> dict[str, Any]:
    """The numeric values averaged over ranks, in one collective: each rank's are on its equal slice of the global
    batch, so the logged loss is the global batch's (the same at any world size). Every rank calls it with the same keys."""
    keys = sorted(k for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    if not (dist.initialized and dist.world_size > 1) or not keys:
        return values
    t = dist.all_reduce_mean(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=dist.device))
    return {**values, **dict(zip(keys, t.tolist()))}


def resblock_scaler(task: Any, cfg: Any, cluster: Any, model: torch.nn.Module, replicas: int, dtype: Any) -> PerBlockScaler | None:
    """With grad_scaling = "per_resblock": the task's resblocks wrapped, each with its own scale; None otherwise.

    The scales are active under fp16 autocast (`dtype` torch.float16), where they keep the small gradients
    of the later resblocks from flushing to zero, and in fp32 (`dtype` None), where they change nothing
    but rounding (each branch's gradient is multiplied and divided by its scale) while the rest of the
    machinery runs as in fp16: the finite flags, the skipped updates, the sharded layout's error buffers
    in unscaled units. That is how a CPU without fp16 matrix products trains "with the scales on"
    (`tessera demo --ranks`). bf16 has fp32's exponent range and needs no scale: None.
    Refused, whatever the precision, where it cannot work: a task without resblocks (the dVAE, the CLIP)
    and DeepSpeed ZeRO (it scales the loss itself). The sharded layout takes them: the blocks are wrapped
    here, before build_engine shards them, and the engine gets `scale_of` for its PowerSGD error buffers."""
    if cfg.grad_scaling != "per_resblock":
        return None
    key = f"config key '{cfg.KEY_PREFIX}.grad_scaling'"
    if not hasattr(task, "resblocks"):
        raise ConfigError(f"{key}: 'per_resblock' is for the transformer's pre-LN resblocks; the {task.kind} trains with 'global'")
    if cluster.zero_stage > 0:
        zero = f"cluster.zero_stage = {cluster.zero_stage} (DeepSpeed scales the loss itself)"
        raise ConfigError(f"{key}: 'per_resblock' is for the plain, DDP and sharded engines, not {zero}; use 'global'")
    if dtype not in (torch.float16, None):
        return None
    blocks, fp32_modules = task.resblocks(model)
    return wrap_resblocks(model, blocks, fp32_modules=fp32_modules, replicas=replicas)


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


class Checkpoints:
    """Save and restore a run: the engine's checkpoint plus the loop's and the task's entries."""

    def __init__(self, engine: Any, run: Any, task: Any, ema: Any, zero_stage: int, grad_scale: PerBlockScaler | None = None):
        self.engine, self.run, self.task, self.ema, self.zero = engine, run, task, ema, zero_stage > 0
        self.grad_scale = grad_scale
        self.dir = run.checkpoint_dir / ZERO_DIR if self.zero else run.checkpoint_dir

    def save(self, st: LoopState, stopper: "Stopper", metrics: dict | None = None) -> Path:
        dist = self.engine.dist
        ranks = _gather(dist, {"data": self.task.data_state(), "rng": _rng_state()})
        client = {
            **self.task.state_dict(st.step),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "data": [r["data"] for r in ranks],
            "rng": [r["rng"] for r in ranks],
            "horizon": st.horizon,
            "elapsed_s": stopper.elapsed(),
            "scaler": self.engine.scaler.state_dict() if self.engine.scaler is not None else None,
            "grad_scale": self.grad_scale.state_dict() if self.grad_scale is not None else None,
        }
        if metrics is not None:
            client["metrics"] = dict(metrics)
        return self.engine.save_checkpoint(self.dir, st.step, client, keep_last=2)

    def restore(self) -> LoopState:
        """The run's latest checkpoint loaded into the engine, EMA, scaler and task (a fresh LoopState without one)."""
        other = self.run.checkpoint_dir / ("latest.pt" if self.zero else f"{ZERO_DIR}/latest")
        if other.exists():
            raise CheckpointError(
                f"run directory '{self.run.path}' holds a {'plain/DDP' if self.zero else 'DeepSpeed ZeRO'} checkpoint ({other}); "
                "resume it with the cluster.zero_stage it was written with, or use a new --output"
            )
        try:
            step, client = self.engine.load_checkpoint(self.dir)
        except (RuntimeError, KeyError) as e:
            raise CheckpointError(
                f"checkpoint in '{self.dir}' does not fit this {self.task.kind} model ({str(e).splitlines()[0][:100]}); use a new --output"
            ) from None
        if not step and not client:
            return LoopState()
        self.task.load_state_dict(client, self.dir)
        if self.ema is not None and client.get("ema"):
            self.ema.load_state_dict(client["ema"])
        if self.engine.scaler is not None and client.get("scaler"):
            self.engine.scaler.load_state_dict(client["scaler"])
        if self.grad_scale is not None and client.get("grad_scale"):
            self.grad_scale.load_state_dict(client["grad_scale"])
        rank, world = self.engine.dist.rank, self.engine.dist.world_size
        data, rng = client.get("data"), client.get("rng")
        if isinstance(data, dict):  # an older transformer checkpoint: {str(rank): state}
            data = [data[str(r)] for r in range(len(data))]
        if isinstance(rng, list):
            rng = rng[rank] if len(rng) == world else None
        return LoopState(step, step, int(client.get("horizon", 0)), float(client.get("elapsed_s", 0.0)), 0, data, rng)

    @staticmethod
    def restore_rng(rng: dict | None) -> None:
        if rng:
            torch.set_rng_state(rng["torch"].cpu())
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"].cpu())


class Stopper:
    """The per-step stop decision, one collective on every rank: steps, the time budget and its cosine horizon
    (rank 0's clock), SLURM preemption (any rank's signal or stop file) and divergence (any rank's loss)."""

    def __init__(self, cfg: Any, dist: Any, st: LoopState):
        self.cfg, self.dist, self.st = cfg, dist, st
        self.t0 = time.time()
        self.probe: tuple[int, float] | None = None
        self.handler = PreemptionHandler()
        if threading.current_thread() is threading.main_thread():
            self.handler.install()

    def elapsed_here(self) -> float:
        return time.time() - self.t0

    def elapsed(self) -> float:
        return self.st.elapsed + self.elapsed_here()

    def _horizon(self, step: int) -> int:
        """Rank 0: min(steps, updates that fit in the budget at the speed measured since update 5), every HORIZON_PROBE updates."""
        cfg = self.cfg
        if cfg.time_budget_s <= 0 or cfg.time_budget_mode == "safety" or step == self.st.start:
            return self.st.horizon
        if self.probe is None and step >= 5:  # skip the first updates (shuffle-buffer fill, allocator warm-up)
            self.probe = (step, time.time())
        elif self.probe is not None and (step - self.probe[0]) % HORIZON_PROBE == 0:
            per_step = (time.time() - self.probe[1]) / (step - self.probe[0])
            left = cfg.time_budget_s - self.elapsed()
            return max(min(cfg.steps, step + int(left / per_step)), cfg.warmup_steps + 1)
        return self.st.horizon

    def decide(self, step: int, loss: float) -> str | None:
        """None to go on, or the reason to stop after `step` ("steps", "time_budget", "preempted"); raises DivergedError."""
        main = self.dist.rank == 0
        budget = main and self.cfg.time_budget_s > 0 and self.elapsed() >= self.cfg.time_budget_s
        flags = [float(budget), float(self.handler.should_stop), float(not math.isfinite(loss)), float(self._horizon(step) if main else 0)]
        if self.dist.initialized and self.dist.world_size > 1:
            t = torch.tensor(flags, dtype=torch.float64, device=self.dist.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)  # rank 0's clock, any rank's signal
            flags = t.tolist()
        self.st.horizon = int(flags[3])
        if flags[2]:
            where = f"loss {loss}" if not math.isfinite(loss) else f"loss {loss} here, non-finite on another rank"
            p = self.cfg.KEY_PREFIX
            raise DivergedError(f"{p.split('.')[0]} training diverged at step {step} ({where}); lower {p}.lr")
        if step >= self.cfg.steps:
            return "steps"
        return "time_budget" if flags[0] else "preempted" if flags[1] else None

    def close(self) -> None:
        self.handler.uninstall()

    def after_stop(self, reason: str | None) -> None:
        """Rank 0 of a SLURM job warned by SIGUSR1 (or the stop file) requeues it after the last checkpoint."""
        h = self.handler
        warned = h.received == signal.SIGUSR1 or (h.stop_file is not None and h.stop_file.exists())
        if reason == "preempted" and warned and self.dist.rank == 0 and h.job_id():
            try:
                h.requeue()
            except SlurmError as e:
                print(f"tessera: could not requeue the job: {e}", flush=True)


class Evaluator:
    """Evaluation and samples on the EMA weights when kept (rank 0, on a plain copy of the model). `sharded`: the weights (and
    so the EMA's shadows) are split over the ranks (ZeRO-3, or the sharded layout's FSDP2 DTensors): every rank gathers them."""

    def __init__(self, task: Any, engine: Any, ema: Any, sharded: bool, run: Any):
        self.task, self.engine, self.ema, self.sharded, self.run = task, engine, ema, sharded, run
        self.copy: torch.nn.Module | None = None
        self.last: dict[str, Any] = {}
        self.evaluated = self.sampled = -1

    def _model(self) -> torch.nn.Module | None:
        if not self.sharded and self.ema is None:
            return self.engine.module if self.engine.dist.is_main else None
        weights = self.engine.full_state_dict() if self.sharded else None  # collective
        shadow = self.ema.full_state_dict() if self.ema is not None else None  # collective for DTensor shadows
        if not self.engine.dist.is_main:
            return None
        if self.copy is None:
            with torch.random.fork_rng(devices=[]):  # building it must not move the training RNG
                self.copy = self.task.make_model()
        self.copy.load_state_dict(weights if weights is not None else self.engine.module.state_dict())
        if self.ema is not None:
            self.ema.copy_to(self.copy, shadow)
        return self.copy

    def run_at(self, step: int, evaluate: bool, sample: bool) -> None:
        if not (evaluate or sample):
            return
        model = self._model()
        if model is not None:
            if evaluate:
                self.last = self.task.evaluate(model, step)
                if self.last:
                    self.run.metrics.log(step, **self.last)
            if sample:
                self.task.sample(model, step)
        self.engine.train()
        self.evaluated = step if evaluate else self.evaluated
        self.sampled = step if sample else self.sampled

    def periodic(self, step: int, cfg: Any) -> None:
        self.run_at(step, cfg.eval_every > 0 and step % cfg.eval_every == 0, cfg.sample_every > 0 and step % cfg.sample_every == 0)

    def final(self, step: int, cfg: Any) -> None:
        self.run_at(step, self.evaluated != step, cfg.sample_every > 0 and step > 0 and self.sampled != step)


class Lines:
    """The metric lines (metrics.jsonl and TensorBoard on rank 0, every log_every updates and the last; loss and metrics averaged
    over ranks: the global batch's) and the progress bar."""

    def __init__(self, task: Any, cfg: Any, run: Any, engine: Any, stopper: "Stopper", st: LoopState, grad_scale: Any = None):
        self.task, self.cfg, self.run, self.engine, self.stopper, self.st = task, cfg, run, engine, stopper, st
        self.grad_scale = grad_scale
        self.pbar = bar(cfg.steps, task.kind, "step", initial=st.step) if engine.dist.is_main else None
        self.t, self.at = time.time(), st.step
        self.last: dict[str, Any] = {}

    def step(self, loss: torch.Tensor, metrics: dict[str, Any], sch: dict[str, float], last: bool) -> None:
        st = self.st
        if self.pbar is not None:
            self.pbar.update(1)
        if st.step % self.cfg.log_every and not last:
            return
        now = time.time()
        rate = (st.step - self.at) * self.task.items_per_step / max(now - self.t, 1e-9)
        self.last = rank_mean(self.engine.dist, {"loss": loss.item(), **{k: scalar(v) for k, v in metrics.items()}})
        row = {
            **self.last,
            **sch,
            "grad_norm": self.engine.last_grad_norm,
            f"{self.task.unit}_per_s": rate,
            "elapsed_s": self.stopper.elapsed(),
        }
        if self.engine.scaler is not None:
            row.update(loss_scale=self.engine.scaler.get_scale(), skipped_steps=st.skipped)
        if self.grad_scale is not None:  # grad_scale/min, /max, /block_XX, /skipped (the run's, resumes included)
            row.update(self.grad_scale.metrics(), skipped_steps=st.skipped)
        self.run.metrics.log(st.step, **row)
        self.task.observe(st.step, row)
        if self.pbar is not None:
            self.pbar.set_postfix(loss=f"{row['loss']:.4f}")
        self.t, self.at = now, st.step

    def close(self) -> None:
        if self.pbar is not None:
            self.pbar.close()


def write_summary(run: Any, summary: dict[str, Any]) -> None:
    if run.is_main:
        atomic_write_bytes(run.path / "summary.json", json.dumps(summary, indent=2, default=str).encode())
