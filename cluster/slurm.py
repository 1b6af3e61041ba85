"""SLURM: render sbatch scripts, submit them, query their state, and handle preemption in the loop.

Two kinds of job:
- a training job (`render_train_script`): N nodes x G GPUs, launched with `srun` one task per GPU
  (each rank reads SLURM_PROCID; `tessera.cluster.dist.discover()` finds it) or with one `torchrun` per
  node. It is requeueable (`--requeue`, log opened in append mode) and SLURM sends SIGUSR1
  `signal_before_s` seconds before the time limit; the loop's `PreemptionHandler` sees it,
  checkpoints and calls `requeue()`, and the requeued job resumes from the checkpoint.
  `layout_overrides` turns `--layout paper|ddp|zero1-3|auto` into the `cluster.*` overrides of the command
  (paper: cluster.sharded=true cluster.ranks_per_node=G, one group of FSDP2 shards per node) and checks them.
- a dataset-sharding array job (`render_array_script`): `--array=0-(N-1)`, task i runs the
  given `tessera prep crawl|encode ...` command with `--part i/N`.

`submit` pipes a script to `sbatch --parsable` and returns the job id; `job_state` asks squeue,
then scontrol, then sacct. `submit_train` / `submit_array` are what `tessera cluster submit-train|-array` call.

A training job whose command names its run directory (`--output RUN_DIR`) is tracked there:
    RUN_DIR/slurm_job.json      written (atomically) by `submit_train`: job id, cluster, time, command
    RUN_DIR/slurm_starts.jsonl  one line appended by the job script at every (re)start of the job
                                ({"job_id", "restart", "time", "nodes"}), so requeues are visible
`read_job_record` reads both back (`tessera status RUN_DIR`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from tessera.cluster.config import DistConfig, SlurmConfig
from tessera.core.atomic import atomic_write_bytes
from tessera.core.errors import ConfigError, InputError, TesseraError


class SlurmError(TesseraError):
    """sbatch/squeue/scontrol missing or refusing a request."""


TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
JOB_RECORD = "slurm_job.json"
JOB_STARTS = "slurm_starts.jsonl"
NO_COMMAND = "no command given: put it after '--', e.g. -- tessera prep crawl ..."
LAYOUTS = ("auto", "paper", "ddp", "zero1", "zero2", "zero3")
OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.\w+)+=")


def job_command(command: Sequence[str]) -> list[str]:
    """The command after the CLI's '--' (which argparse.REMAINDER keeps); InputError when there is none."""
    cmd = list(command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise InputError(NO_COMMAND)
    return cmd


def output_dir_of(command: Sequence[str]) -> str | None:
    """The value of the command's `--output DIR` / `--output=DIR` (the run directory of `tessera train ...`)."""
    cmd = list(command)
    found = None
    for i, a in enumerate(cmd):
        if a == "--output" and i + 1 < len(cmd):
            found = cmd[i + 1]
        elif a.startswith("--output="):
            found = a[len("--output=") :]
    return found or None


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


def _start_record_lines(run_dir: str) -> list[str]:
    """Shell lines appending this (re)start of the job to RUN_DIR/slurm_starts.jsonl (relative paths: the job's cwd)."""
    d = shlex.quote(run_dir)
    line = '{"job_id": "%s", "restart": %s, "time": %s, "nodes": "%s"}\\n'
    return [
        f"mkdir -p {d}",
        f'printf \'{line}\' "$SLURM_JOB_ID" "${{SLURM_RESTART_COUNT:-0}}" "$(date +%s)" "$SLURM_JOB_NODELIST" >> {d}/{JOB_STARTS}',
    ]


def render_train_script(cfg: SlurmConfig, command: Sequence[str], run_dir: str | None = None, layout: str | None = None) -> str:
    """The sbatch script of a (multi-node) training job running `command` on every rank.

    With `run_dir` (the command's --output), each (re)start of the job appends a line to RUN_DIR/slurm_starts.jsonl.
    `layout` (a line from `layout_overrides`) is echoed to the job's log.
    """
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
    if layout:
        body.append(f"echo {shlex.quote('tessera: layout ' + layout)}")
    if run_dir:
        body += _start_record_lines(run_dir)
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


def _sbatch(script: str, workdir: str | Path | None, extra_args: Sequence[str]) -> tuple[str, str | None]:
    """(job id, cluster name or None) of `sbatch --parsable`, which answers 'ID' or 'ID;CLUSTER'."""
    r = _run(["sbatch", "--parsable", *extra_args], input=script, cwd=workdir)
    if r.returncode != 0:
        said = (r.stderr or r.stdout).strip()
        raise SlurmError(f"sbatch refused the job: {said.splitlines()[-1] if said else r.returncode}")
    job, _, cluster = r.stdout.strip().partition(";")
    return job, cluster or None


def submit(script: str, workdir: str | Path | None = None, extra_args: Sequence[str] = ()) -> str:
    """Submit `script` (text) with `sbatch --parsable`; returns the job id (the array's id for arrays)."""
    return _sbatch(script, workdir, extra_args)[0]


@dataclass
class Submitted:
    """A submitted job: its id, the cluster sbatch named (None on a single cluster) and the run directory it tracks."""

    job_id: str
    cluster: str | None = None
    run_dir: Path | None = None


def layout_overrides(layout: str, cfg: SlurmConfig, cluster: DistConfig | None) -> tuple[list[str], str]:
    """The `cluster.*=value` overrides that run the training command in `layout` on this job, and a line describing it.

    `cluster` is the training command's resolved `[cluster]` config (None: not a `tessera train` command, which
    takes no overrides; only "auto" is allowed then). "auto": the config decides (a config with cluster.sharded
    is the paper's layout); "paper": cluster.sharded=true and cluster.ranks_per_node = the job's ranks per node
    (one group per node) unless the config sets it; "ddp": neither sharding nor ZeRO; "zeroN": DeepSpeed ZeRO
    stage N. The result is checked (DistConfig.validate, groups dividing the world): ConfigError, one line.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    k, world = cfg.ranks_per_node, cfg.nodes * cfg.ranks_per_node
    if cluster is None:
        if layout != "auto":
            raise ConfigError(f"--layout {layout}: the job's command is not a 'tessera train ...' command; use --layout auto")
        return [], f"{cfg.nodes} nodes x {k} ranks"
    if layout == "auto":
        layout = "paper" if cluster.sharded else ("ddp" if cluster.zero_stage == 0 else f"zero{cluster.zero_stage}")
    if layout == "paper" and cluster.zero_stage > 0:
        raise ConfigError(
            f"--layout paper: the training config sets cluster.zero_stage = {cluster.zero_stage}; the paper's layout replaces ZeRO "
            f"(set it to 0, or use --layout zero{cluster.zero_stage})"
        )
    want: dict[str, Any] = {"sharded": layout == "paper", "zero_stage": int(layout[4:]) if layout.startswith("zero") else 0}
    if layout == "paper":
        want["ranks_per_node"] = cluster.ranks_per_node or k
    changed = {key: v for key, v in want.items() if getattr(cluster, key) != v}
    dataclasses.replace(cluster, **changed).validate()
    group = want.get("ranks_per_node", k)
    if world % group:
        raise ConfigError(f"config key 'cluster.ranks_per_node': {group} ranks per group do not divide the job's {world} ranks")
    over = [f"cluster.{key}={str(v).lower()}" for key, v in changed.items()]
    note = {
        "paper": f"paper: {world // group} groups x {group} ranks, FSDP2 within a group, PowerSGD rank {cluster.powersgd_rank} across groups",
        "ddp": f"ddp: {world} ranks, DDP" + (f" with PowerSGD rank {cluster.powersgd_rank}" if cluster.powersgd_rank else ""),
    }.get(layout, f"{layout}: {world} ranks, DeepSpeed ZeRO stage {want['zero_stage']}")
    return over, note


def with_overrides(command: Sequence[str], overrides: Sequence[str]) -> list[str]:
    """`command` with `overrides` placed right after its last `key.sub=value` (else at the end), where argparse reads them."""
    cmd = list(command)
    at = max((i + 1 for i, a in enumerate(cmd) if OVERRIDE.match(a)), default=len(cmd))
    return [*cmd[:at], *overrides, *cmd[at:]]


def train_job_script(
    cfg: SlurmConfig, command: Sequence[str], config: str | None = None, layout: str = "auto", cluster: DistConfig | None = None
) -> tuple[str, str | None]:
    """(sbatch script, run directory as the command names it) of `tessera cluster submit-train`.

    `config` (a preset or TOML) is passed on as the command's --config unless it has one; `layout` and `cluster`
    (the command's resolved cluster config) add the overrides of `layout_overrides`.
    """
    cmd, note = _layout_command(cfg, command, config, layout, cluster)
    run_dir = output_dir_of(cmd)
    return render_train_script(cfg, cmd, run_dir=run_dir, layout=note), run_dir


def _layout_command(cfg: SlurmConfig, command: Sequence[str], config: str | None, layout: str, cluster: DistConfig | None):
    over, note = layout_overrides(layout, cfg, cluster)
    return with_overrides(_train_command(command, config), over), note


def _train_command(command: Sequence[str], config: str | None) -> list[str]:
    cmd = job_command(command)
    return [*cmd, "--config", config] if config and "--config" not in cmd else cmd


def submit_train(
    cfg: SlurmConfig,
    command: Sequence[str],
    config: str | None = None,
    workdir: str | Path | None = None,
    layout: str = "auto",
    cluster: DistConfig | None = None,
) -> Submitted:
    """Render and submit a training job; record it in its run directory (relative to `workdir`) when the command names one."""
    cmd, note = _layout_command(cfg, command, config, layout, cluster)
    run_dir = output_dir_of(cmd)
    job, cluster_name = _sbatch(render_train_script(cfg, cmd, run_dir=run_dir, layout=note), workdir, ())
    out = Submitted(job, cluster_name)
    if run_dir:
        out.run_dir = Path(workdir or ".") / run_dir
        record_job(out.run_dir, out, command=cmd, job_name=cfg.job_name)
    return out


def array_job_script(cfg: SlurmConfig, parts: int, command: Sequence[str], max_parallel: int = 0) -> str:
    return render_array_script(cfg, parts, job_command(command), max_parallel=max_parallel)


def submit_array(
    cfg: SlurmConfig, parts: int, command: Sequence[str], max_parallel: int = 0, workdir: str | Path | None = None
) -> Submitted:
    """Render and submit the array job of `tessera cluster submit-array`."""
    job, cluster = _sbatch(array_job_script(cfg, parts, command, max_parallel), workdir, ())
    return Submitted(job, cluster)


def record_job(run_dir: str | Path, job: Submitted, command: Sequence[str] = (), job_name: str = "") -> Path:
    """Write RUN_DIR/slurm_job.json (atomically; RUN_DIR is created): the job id, cluster, submit host and time, command."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rec = {
        "job_id": job.job_id,
        "cluster": job.cluster,
        "job_name": job_name,
        "submit_host": socket.gethostname(),
        "submitted": round(time.time(), 3),
        "submitted_iso": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": list(command),
    }
    path = run_dir / JOB_RECORD
    atomic_write_bytes(path, (json.dumps(rec, indent=2) + "\n").encode())
    return path


def read_job_record(run_dir: str | Path) -> dict[str, Any] | None:
    """The SLURM job tracked in `run_dir` (slurm_job.json and the starts the job script appended), or None.

    Returns {"job_id", "cluster", "submitted", ..., "starts": [{"job_id", "restart", "time", "nodes"}, ...]} with
    only the starts of that job id; when slurm_job.json is missing the last start's job is taken.
    """
    run_dir = Path(run_dir)
    rec: dict[str, Any] = {}
    p = run_dir / JOB_RECORD
    if p.is_file():
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            raise InputError(f"'{p}' is not a JSON job record") from None
        if not isinstance(rec, dict) or not str(rec.get("job_id", "")).strip():
            raise InputError(f"'{p}' names no job_id")
    starts = []
    sp = run_dir / JOB_STARTS
    if sp.is_file():
        for line in sp.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut short by a node failure
            if isinstance(row, dict) and row.get("job_id"):
                starts.append(row)
    if not rec and not starts:
        return None
    job_id = str(rec.get("job_id") or starts[-1]["job_id"])
    return {**rec, "job_id": job_id, "starts": [r for r in starts if str(r["job_id"]) == job_id]}


@dataclass
class JobInfo:
    """A job's state and who said so: squeue, scontrol, sacct, or None when none of them knows the job (state UNKNOWN)."""

    state: str
    source: str | None = None
    reason: str | None = None


def _clean_state(state: str) -> str:
    """'CANCELLED by 0' (sacct), 'CANCELLED+' -> 'CANCELLED'."""
    return state.split()[0].rstrip("+").upper() if state.strip() else "UNKNOWN"


def _scontrol_fields(job_id: str) -> dict[str, str] | None:
    r = _run(["scontrol", "-o", "show", "job", job_id])
    if r.returncode != 0:
        return None
    for line in r.stdout.splitlines():
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if "_" in job_id and f"{fields.get('ArrayJobId')}_{fields.get('ArrayTaskId')}" != job_id:
            continue
        if "JobState" in fields:
            return fields
    return None


def _sacct_state(job_id: str) -> str | None:
    """sacct's state, None without accounting (slurmdbd): sacct then fails or is not installed at all."""
    try:
        r = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    lines = [line for line in r.stdout.splitlines() if line.strip()] if r.returncode == 0 else []
    return lines[0] if lines else None


def job_info(job_id: str) -> JobInfo:
    """Ask squeue (pending/running jobs), then scontrol (jobs slurmctld still holds: MinJobAge after the end), then sacct."""
    r = _run(["squeue", "-h", "-j", job_id, "-o", "%T|%r"])
    if r.returncode == 0 and r.stdout.strip():
        state, _, reason = r.stdout.splitlines()[0].partition("|")
        return JobInfo(_clean_state(state), "squeue", reason.strip() if reason.strip() not in ("", "None") else None)
    fields = _scontrol_fields(job_id)
    if fields is not None:
        reason = fields.get("Reason")
        return JobInfo(_clean_state(fields["JobState"]), "scontrol", reason if reason not in (None, "None") else None)
    state = _sacct_state(job_id)
    if state is not None:
        return JobInfo(_clean_state(state), "sacct")
    return JobInfo("UNKNOWN")


def job_state(job_id: str) -> str:
    """State of a job or array task ('123', '123_4'): PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, ...; UNKNOWN when no one knows it."""
    return job_info(job_id).state


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
        return dist.any_rank(self.should_stop)

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
