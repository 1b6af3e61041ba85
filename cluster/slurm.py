"""SLURM: render sbatch scripts, submit them, query their state, and handle preemption in the loop.

Two kinds of job:
- a training job (`render_train_script`): N nodes x G GPUs, launched with `srun` one task per GPU
  (each rank reads SLURM_PROCID; `tessera.cluster.dist.discover()` finds it) or with one `torchrun` per
  node. It is requeueable (`--requeue`, log opened in append mode) and SLURM sends SIGUSR1
  `signal_before_s` seconds before the time limit; the loop's `PreemptionHandler` sees it,
  checkpoints and calls `requeue()`, and the requeued job resumes from the checkpoint.
- a dataset-sharding array job (`render_array_script`): `--array=0-(N-1)`, task i runs the
  given `tessera prep crawl|encode ...` command with `--part i/N`.

`submit` pipes a script to `sbatch --parsable` and returns the job id; `job_state` asks squeue,
then scontrol, then sacct.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from tessera.cluster.config import SlurmConfig
from tessera.core.errors import TesseraError


class SlurmError(TesseraError):
    """sbatch/squeue/scontrol missing or refusing a request."""


TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _command_line(command: Sequence[str]) -> str:
    """Shell-quote `command`; a leading `tessera` runs this interpreter's tessera.cli (no PATH needed in the job)."""
    cmd = list(command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise SlurmError("no command to run in the job (give it after '--')")
    if cmd[0] == "tessera":
        cmd = [sys.executable, "-m", "tessera.cli", *cmd[1:]]
    return shlex.join(cmd)


def _common_sbatch(cfg: SlurmConfig) -> list[str]:
    lines = [f"--job-name={cfg.job_name}", f"--time={cfg.time}", f"--cpus-per-task={cfg.cpus_per_task}"]
    if cfg.partition:
        lines.append(f"--partition={cfg.partition}")
    if cfg.account:
        lines.append(f"--account={cfg.account}")
    if cfg.mem:
        lines.append(f"--mem={cfg.mem}")
    return lines


def _script(sbatch: Iterable[str], body: Iterable[str], setup: Iterable[str]) -> str:
    out = ["#!/bin/bash"] + [f"#SBATCH {s}" for s in sbatch]
    out += ["", "set -uo pipefail", *setup, *body]
    return "\n".join(out) + "\n"


def render_train_script(cfg: SlurmConfig, command: Sequence[str]) -> str:
    """The sbatch script of a (multi-node) training job running `command` on every rank."""
    cfg.validate()
    cmd = _command_line(command)
    sb = [f"--nodes={cfg.nodes}"]
    torchrun = cfg.launcher == "torchrun"
    sb.append(f"--ntasks-per-node={1 if torchrun else cfg.ranks_per_node}")
    if cfg.gpus_per_node > 0:
        sb.append(f"--gpus-per-node={cfg.gpus_per_node}")
    sb += _common_sbatch(cfg)
    if cfg.requeue:
        sb += ["--requeue", "--open-mode=append"]
    if cfg.signal_before_s > 0:
        # srun: SLURM signals every task (each rank's PreemptionHandler); torchrun would die on
        # SIGUSR1, so the batch shell gets it (B:) and tells the ranks through a stop file.
        sb.append(f"--signal={'B:' if torchrun else ''}USR1@{cfg.signal_before_s}")
    sb.append(f"--output={cfg.output}")
    sb += cfg.extra_sbatch
    body = [
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        f"export MASTER_PORT=$(( {cfg.master_port} + SLURM_JOB_ID % 1000 ))",
        "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK  # srun does not inherit --cpus-per-task (SLURM >= 22.05)",
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}",
        'echo "tessera: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST"',
    ]
    if not torchrun:
        body.append(f"srun --kill-on-bad-exit=1 {cmd}")
    else:
        body += [
            'export TESSERA_STOP_FILE="$SLURM_SUBMIT_DIR/.tessera-stop-$SLURM_JOB_ID"',
            'rm -f "$TESSERA_STOP_FILE"',
            "trap 'touch \"$TESSERA_STOP_FILE\"' USR1",
            f"srun --kill-on-bad-exit=1 {shlex.quote(sys.executable)} -m torch.distributed.run --nnodes=$SLURM_NNODES --nproc-per-node={cfg.ranks_per_node} "
            f'--rdzv-id=$SLURM_JOB_ID --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --no-python {cmd} &',
            "pid=$!",
            "# wait returns early when the trap runs; keep waiting until srun is gone",
            'while true; do wait "$pid"; rc=$?; kill -0 "$pid" 2>/dev/null || break; done',
            'rm -f "$TESSERA_STOP_FILE"',
            'exit "$rc"',
        ]
    return _script(sb, body, cfg.setup)


def render_array_script(cfg: SlurmConfig, parts: int, command: Sequence[str], max_parallel: int = 0) -> str:
    """An array job of `parts` tasks; task i runs `command --part i/parts` (tessera prep crawl/encode)."""
    cfg.validate()
    if parts < 1:
        raise SlurmError(f"--parts: expected >= 1, got {parts}")
    cmd = _command_line(command)
    if "--part" in shlex.split(cmd):
        raise SlurmError("the array job adds '--part I/N' itself; remove --part from the command")
    array = f"0-{parts - 1}" + (f"%{max_parallel}" if max_parallel > 0 else "")
    sb = [f"--array={array}", "--ntasks=1", *_common_sbatch(cfg)]
    out = cfg.output if "%a" in cfg.output else "slurm-%x-%A_%a.out"
    sb.append(f"--output={out}")
    sb += cfg.extra_sbatch
    body = [
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}",
        f'exec {cmd} --part "${{SLURM_ARRAY_TASK_ID}}/{parts}"',
    ]
    return _script(sb, body, cfg.setup)


def _run(args: list[str], **kw: Any) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=60, **kw)
    except FileNotFoundError:
        raise SlurmError(f"'{args[0]}' not found: is the SLURM client installed and on PATH?") from None


def submit(script: str, workdir: str | Path | None = None, extra_args: Sequence[str] = ()) -> str:
    """Submit `script` (text) with `sbatch --parsable`; returns the job id (the array's id for arrays)."""
    r = _run(["sbatch", "--parsable", *extra_args], input=script, cwd=workdir)
    if r.returncode != 0:
        raise SlurmError(
            f"sbatch refused the job: {(r.stderr or r.stdout).strip().splitlines()[-1] if (r.stderr or r.stdout).strip() else r.returncode}"
        )
    return r.stdout.strip().split(";")[0]


def job_state(job_id: str) -> str | None:
    """State of a job or array task ('123', '123_4'): PENDING, RUNNING, COMPLETED, ...; None if unknown."""
    r = _run(["squeue", "-h", "-j", job_id, "-o", "%T"])
    if r.returncode == 0 and r.stdout.strip():
        return r.stdout.split()[0]
    r = _run(["scontrol", "-o", "show", "job", job_id])
    if r.returncode == 0:
        for line in r.stdout.splitlines():
            fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            if "_" in job_id and f"{fields.get('ArrayJobId')}_{fields.get('ArrayTaskId')}" != job_id:
                continue
            if "JobState" in fields:
                return fields["JobState"]
    r = _run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"])
    if r.returncode == 0 and r.stdout.strip():
        return r.stdout.split()[0]
    return None


def array_states(job_id: str) -> dict[int, str]:
    """Per-task states of array job `job_id` that slurmctld still knows of."""
    r = _run(["scontrol", "-o", "show", "job", job_id])
    out: dict[int, str] = {}
    for line in r.stdout.splitlines() if r.returncode == 0 else []:
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        task = fields.get("ArrayTaskId", "")
        if task.isdigit():
            out[int(task)] = fields.get("JobState", "?")
    return out


def wait(job_id: str, timeout_s: float = 600.0, poll_s: float = 1.0, states: set[str] = TERMINAL_STATES) -> str:
    """Poll until the job reaches one of `states`; returns it. Raises SlurmError on timeout."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = job_state(job_id)
        if last in states:
            return last
        time.sleep(poll_s)
    raise SlurmError(f"job {job_id} still {last} after {timeout_s:.0f} s")


class PreemptionHandler:
    """Turns SLURM's warning signals into a flag the training loop polls.

        handler = PreemptionHandler().install()
        for step in ...:
            ...
            if handler.should_stop_all(dist):      # every rank agrees
                engine.save_checkpoint(...)
                if dist.is_main: handler.requeue()
                break

    SIGUSR1 (sbatch --signal) and SIGTERM (scancel, preemption, the time limit) set the flag; so
    does the stop file that a torchrun-launched job's batch shell touches (TESSERA_STOP_FILE).
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGUSR1, signal.SIGTERM), stop_file: str | Path | None = None):
        self.signals = tuple(signals)
        sf = stop_file if stop_file is not None else os.environ.get("TESSERA_STOP_FILE")
        self.stop_file = Path(sf) if sf else None
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> "PreemptionHandler":
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._on_signal)
        return self

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def __enter__(self) -> "PreemptionHandler":
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.received = signum

    @property
    def should_stop(self) -> bool:
        return self.received is not None or (self.stop_file is not None and self.stop_file.exists())

    def should_stop_all(self, dist: Any) -> bool:
        """`should_stop` of any rank, on every rank (one all-reduce when a process group is up)."""
        flag = self.should_stop
        if getattr(dist, "initialized", False) and getattr(dist, "world_size", 1) > 1:
            import torch

            t = torch.tensor([1.0 if flag else 0.0], device=dist.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = bool(t.item() > 0)
        return flag

    @staticmethod
    def job_id() -> str | None:
        """The id to requeue: the array task's 'A_T' inside an array job, else SLURM_JOB_ID."""
        e = os.environ
        if e.get("SLURM_ARRAY_JOB_ID") and e.get("SLURM_ARRAY_TASK_ID"):
            return f"{e['SLURM_ARRAY_JOB_ID']}_{e['SLURM_ARRAY_TASK_ID']}"
        return e.get("SLURM_JOB_ID")

    @staticmethod
    def restart_count() -> int:
        v = os.environ.get("SLURM_RESTART_COUNT", "0")
        return int(v) if v.isdigit() else 0

    def requeue(self) -> bool:
        """`scontrol requeue` this job (call it after the checkpoint); False outside SLURM.

        SLURM then ends the running job (SIGTERM, then SIGKILL after KillWait) and queues it again
        with the same id; the new run sees SLURM_RESTART_COUNT + 1.
        """
        jid = self.job_id()
        if not jid:
            return False
        r = _run(["scontrol", "requeue", jid])
        if r.returncode != 0:
            raise SlurmError(f"scontrol requeue {jid} failed: {(r.stderr or r.stdout).strip()}")
        return True
