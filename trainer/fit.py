"""The one training loop, `fit(task, cfg, run, dist, cluster)`, for the dVAE, the transformer and the CLIP.

A task (trainer/dvae_task.py, transformer_task.py, clip_task.py) supplies the model and its parameter
groups, the batches (with a resumable position), the loss, the per-step schedules (lr, and e.g. the
dVAE's KL weight and temperature), evaluation, samples and its own checkpoint entries. The loop does
the rest once, for every task: exact resume (tessera.trainer.loop_state), checkpoint cadence, the
learning rate set through the engine, autocast and the fp16 gradient scale (grad_scaling: one loss scale
owned by the engine's backward/step with clipping, or one scale per resblock, tessera.trainer.grad_scale,
unscaled here before the engine's step, which is skipped on every rank after an overflow), EMA, the
divergence error, the stop decision (time budget, SLURM preemption, decided on rank 0 and shared so that
every rank stops after the same step), metrics.jsonl / TensorBoard / progress bar, evaluation and the
summary. Every run goes through tessera.cluster.engine.build_engine: one process, DDP or DeepSpeed ZeRO 1-3.
"""

from __future__ import annotations

from typing import Any

import torch

from tessera.cluster.config import DistConfig
from tessera.cluster.dist import DistState, write_layout
from tessera.cluster.engine import build_engine
from tessera.core.errors import ConfigError
from tessera.trainer.config import LoopConfig
from tessera.trainer.ema import EMA
from tessera.trainer.grad_scale import PerBlockScaler
from tessera.trainer.loop_state import Checkpoints, Evaluator, Lines, Stopper, resblock_scaler, write_summary
from tessera.trainer.precision import autocast, autocast_dtype, resolve_precision
from tessera.trainer.rundir import RunDir


def _engine(task: Any, cfg: LoopConfig, dist: DistState, cluster: DistConfig, dtype: Any) -> tuple[Any, PerBlockScaler | None]:
    """The task's model (its resblocks wrapped for per-resblock scales) and an AdamW over its parameter groups, wrapped by
    tessera.cluster.engine.build_engine (with the global fp16 GradScaler when that is the scaling); and the per-resblock scaler."""
    model = task.build_model()
    blocks = resblock_scaler(task, cfg, cluster, model, dist.world_size, dtype)
    fp16 = dtype == torch.float16
    scaler = torch.amp.GradScaler(task.device.type) if fp16 and cfg.grad_scaling == "global" else None
    opt = torch.optim.AdamW(task.param_groups(model), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cluster.zero_stage == 3 and cfg.ema_decay > 0:
        raise ConfigError(
            f"config key '{cfg.KEY_PREFIX}.ema_decay': parameter EMA needs whole parameters on every rank; set it to 0 with cluster.zero_stage = 3"
        )
    eng = build_engine(
        model,
        opt,
        dist,
        cluster,
        grad_clip=cfg.grad_clip,
        micro_batch_size=task.local_batch,
        checkpoint_kind=task.kind,
        scaler=scaler,
        grad_scale=blocks.scale_of if blocks is not None else None,
    )
    return eng, blocks


def _update(eng: Any, blocks: PerBlockScaler | None) -> bool:
    """The optimizer update through the engine; True when it was skipped for an fp16 overflow (the same on every rank)."""
    if blocks is None:
        eng.step()
        return bool(eng.last_step_skipped)
    blocks.unscale_()
    if blocks.update():
        eng.step()
        return False
    eng.zero_grad()
    eng.last_grad_norm = float("inf")  # as the global scaler's skipped steps log it
    return True


def fit(task: Any, cfg: LoopConfig, run: RunDir, dist: DistState, cluster: DistConfig) -> dict[str, Any]:
    """Train `task` for `cfg.steps` updates (or until stopped) in `run`; returns the summary (also summary.json)."""
    dtype = autocast_dtype(cfg.precision, task.device)
    eng, blocks = _engine(task, cfg, dist, cluster, dtype)
    write_layout(eng.dist, run.path / "layout.json")  # the discovered ranks and groups, every rank's
    model, ema = eng.module, EMA(eng.module, cfg.ema_decay) if cfg.ema_decay > 0 else None
    ck = Checkpoints(eng, run, task, ema, cluster.zero_stage, blocks)
    st = ck.restore()
    task.start(st.step, st.data, run.metrics.log)
    ck.restore_rng(st.rng)
    stopper = Stopper(cfg, eng.dist, st)
    sharded = cluster.zero_stage == 3 or eng.kind == "sharded"  # weights split over the ranks: evaluation gathers them
    ev, lines = Evaluator(task, eng, ema, sharded, run), Lines(task, cfg, run, eng, stopper, st, blocks)

    def forward(*args: Any, **kw: Any) -> Any:
        with autocast(dtype, task.device):
            return eng(*args, **kw)

    threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        reason = stopper.decide(st.step, 0.0)
        model.train()
        while reason is None:
            sch = task.schedules(st.step, st.horizon)
            eng.set_lr(sch["lr"])
            loss, metrics = task.loss(forward, task.next_batch(), st.step, sch)
            eng.backward(loss)
            skipped = _update(eng, blocks)
            if ema is not None:
                ema.update(model)
            st.step += 1
            st.skipped += int(skipped)
            reason = stopper.decide(st.step, loss.item())
            lines.step(loss, metrics, sch, last=reason is not None)
            ev.periodic(st.step, cfg)
            if reason is None and cfg.ckpt_every > 0 and st.step % cfg.ckpt_every == 0:
                ck.save(st, stopper)
    finally:
        torch.set_num_threads(threads)
        stopper.close()
        lines.close()
    ev.final(st.step, cfg)
    final = {**{f"final_{k}": v for k, v in lines.last.items()}, **ev.last}
    final.update({"skipped_steps": st.skipped} if blocks is not None else {})
    summary = _summary(task, cfg, run, eng, st, stopper, reason, cluster.zero_stage, final)
    summary.update(task.summary(summary, ev.last))
    summary["checkpoint"] = str(ck.save(st, stopper, metrics=summary))
    stopper.after_stop(reason)
    write_summary(run, summary)
    run.close()
    eng.dist.barrier()
    return summary


def _summary(task: Any, cfg: LoopConfig, run: RunDir, eng: Any, st: Any, stopper: Any, reason: str | None, zero: int, extra: dict) -> dict:
    return {
        "run_dir": str(run.path),
        "steps": st.step,
        "resumed_from": st.start,
        "stop_reason": reason,
        "planned_steps": cfg.steps,
        "horizon": st.horizon or cfg.steps,
        **_failure(task, cfg, st, reason),
        "time_s": round(stopper.elapsed(), 2),
        f"{task.unit}_per_s": round((st.step - st.start) * task.items_per_step / max(stopper.elapsed_here(), 1e-9), 2),
        "precision": resolve_precision(cfg.precision, task.device),
        "world_size": eng.dist.world_size,
        "engine": f"deepspeed-zero{zero}" if zero else eng.kind,
        **({"comm": eng.comm_stats()} if eng.comm_stats() else {}),  # this rank's bytes of the last update
        **({"skipped_steps": st.skipped} if eng.scaler is not None else {}),
        **extra,
    }


def _failure(task: Any, cfg: LoopConfig, st: Any, reason: str | None) -> dict[str, str]:
    """{"failure": ...} when a step-bound run (time_budget_mode = "safety") was stopped by its time limit; else {}."""
    if reason != "time_budget" or cfg.time_budget_mode != "safety":
        return {}
    return {"failure": f"{task.kind} stopped by its safety time limit ({cfg.time_budget_s:g} s) at update {st.step} of {cfg.steps}"}
