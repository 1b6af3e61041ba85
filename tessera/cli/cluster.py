"""`tessera cluster submit-train` and `tessera cluster submit-array`: render and submit sbatch jobs.

    tessera cluster submit-train --config demo --nodes 2 --gpus-per-node 8 --time 12:00:00 --layout paper \\
        -- tessera train transformer --data shards/tokens --output runs/t cluster.powersgd_rank=32
    tessera cluster submit-array --parts 16 -- tessera prep crawl --input urls.parquet --output shards/img

Both print the job id (or, with --dry-run, the script). A training job whose command has `--output RUN_DIR`
is recorded in RUN_DIR (slurm_job.json, slurm_starts.jsonl) for `tessera status RUN_DIR`.
A `tessera train ...` command is parsed and its config resolved here (an unknown key fails before sbatch), so
that `--layout` can add what its layout needs (tessera.cluster.slurm.layout_overrides).
The rendering, submission and job records are tessera.cluster.slurm.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from tessera.cli import train_flags
from tessera.cluster import slurm
from tessera.cluster.config import DistConfig, SlurmConfig
from tessera.core.errors import InputError, TesseraError
from tessera.core.root_config import load_root

TRAIN_TASKS = ("dvae", "transformer", "clip")
LAYOUT_HELP = (
    "how the ranks train: 'paper' = the DALL-E layout (cluster.sharded=true cluster.ranks_per_node=RANKS_PER_NODE: "
    "FSDP2 shards within each node, PowerSGD across nodes with cluster.powersgd_rank); 'ddp' = DDP over every rank; "
    "'zero1|zero2|zero3' = DeepSpeed ZeRO; 'auto' (default) = as the training config says (cluster.sharded, "
    "cluster.zero_stage), a sharded config getting cluster.ranks_per_node=RANKS_PER_NODE. The overrides are added to the "
    "command; a cluster.ranks_per_node that the config or command sets is kept; the result is checked before submitting"
)


def _add_common(parser: argparse.ArgumentParser, job_name: str) -> argparse._ArgumentGroup:
    d = SlurmConfig()
    g = parser.add_argument_group("slurm")
    g.add_argument("--job-name", default=job_name, help="sbatch --job-name (default: %(default)s)")
    g.add_argument("--time", default=d.time, help="time limit [D-]HH:MM:SS (default: %(default)s)")
    g.add_argument("--partition", default=d.partition, help="partition (default: the cluster's)")
    g.add_argument("--account", default=d.account, help="account to charge")
    g.add_argument("--cpus-per-task", type=int, default=d.cpus_per_task, help="CPU cores per task (default: %(default)s)")
    g.add_argument("--mem", default=d.mem, help="memory per node, e.g. 64G")
    g.add_argument("--output-log", default=None, help="sbatch --output pattern")
    g.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        help="another #SBATCH option, e.g. --sbatch=--constraint=a100 (repeatable)",
    )
    g.add_argument("--setup", action="append", default=[], metavar="LINE", help="a shell line run before the launch (repeatable)")
    g.add_argument("--chdir", default=None, help="directory the job starts in (default: the current one)")
    g.add_argument("--dry-run", action="store_true", help="print the rendered script instead of submitting it")
    return g


def _add_command(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the tessera command to run")


def _common_config(args: argparse.Namespace, **more) -> SlurmConfig:
    kw = dict(
        job_name=args.job_name,
        time=args.time,
        partition=args.partition,
        account=args.account,
        cpus_per_task=args.cpus_per_task,
        mem=args.mem,
        extra_sbatch=list(args.sbatch),
        setup=list(args.setup),
        **more,
    )
    if args.output_log:
        kw["output"] = args.output_log
    return SlurmConfig(**kw)


def add_submit_train(parser: argparse.ArgumentParser) -> None:
    d = SlurmConfig()
    g = _add_common(parser, d.job_name)
    parser.add_argument("--config", default=None, help="the training config (preset or TOML), passed to the training command as --config")
    g.add_argument("--nodes", type=int, default=d.nodes, help="nodes (default: %(default)s)")
    g.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node, help="GPUs (= ranks) per node; 0 = CPU job")
    g.add_argument("--tasks-per-node", type=int, default=d.tasks_per_node, help="ranks per node of a CPU job (default: %(default)s)")
    g.add_argument("--launcher", choices=("srun", "torchrun"), default=d.launcher, help="one srun task per rank, or torchrun per node")
    g.add_argument(
        "--signal-before",
        type=int,
        default=d.signal_before_s,
        help="seconds before the time limit to send SIGUSR1 (default: %(default)s)",
    )
    g.add_argument("--no-requeue", action="store_true", help="do not make the job requeueable")
    g.add_argument("--layout", choices=slurm.LAYOUTS, default="auto", help=LAYOUT_HELP)
    _add_command(parser)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # a one-line InputError instead of argparse's usage and exit
        raise InputError(f"the training command after '--': {message}")


def training_cluster_config(command: Sequence[str], config: str | None, strict: bool = True) -> DistConfig | None:
    """The resolved `[cluster]` config of a `tessera train TASK ...` command (also `python -m tessera.cli train ...`), else None.

    A command that does not parse or whose config does not load is a one-line error when `strict`, else None
    (--layout auto submits it as it is, and the job reports the error, as before --layout existed).
    """
    try:
        return _cluster_config(slurm.job_command(command), config)
    except TesseraError:
        if strict:
            raise
        return None


def _cluster_config(cmd: list[str], config: str | None) -> DistConfig | None:
    i = next((j for j in range(len(cmd) - 1) if cmd[j] == "train" and cmd[j + 1] in TRAIN_TASKS), None)
    if i is None or not any(c == "tessera" or c.endswith("tessera.cli") or c.endswith("/tessera") for c in cmd[:i]):
        return None
    task = cmd[i + 1]
    parser = _Parser(prog=f"tessera train {task}")
    getattr(train_flags, f"add_{task}")(parser)
    args = parser.parse_args(cmd[i + 2 :] + (["--config", config] if config and "--config" not in cmd else []))
    return load_root(args.config, args.overrides).cluster


def run_submit_train(args: argparse.Namespace) -> int:
    cfg = _common_config(
        args,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        launcher=args.launcher,
        signal_before_s=args.signal_before,
        requeue=not args.no_requeue,
    )
    cluster = training_cluster_config(args.command, args.config, strict=args.layout != "auto")
    kw = dict(config=args.config, layout=args.layout, cluster=cluster)
    if args.dry_run:
        print(slurm.train_job_script(cfg, args.command, **kw)[0], end="")
        return 0
    print(slurm.submit_train(cfg, args.command, workdir=args.chdir, **kw).job_id)
    return 0


def add_submit_array(parser: argparse.ArgumentParser) -> None:
    _add_common(parser, "tessera-prep")
    parser.add_argument("--parts", type=int, required=True, help="number of array tasks; task i gets --part i/N")
    parser.add_argument("--max-parallel", type=int, default=0, help="at most this many tasks at once (0 = no limit)")
    _add_command(parser)


def run_submit_array(args: argparse.Namespace) -> int:
    cfg = _common_config(args)
    if args.dry_run:
        print(slurm.array_job_script(cfg, args.parts, args.command, max_parallel=args.max_parallel), end="")
        return 0
    print(slurm.submit_array(cfg, args.parts, args.command, max_parallel=args.max_parallel, workdir=args.chdir).job_id)
    return 0
