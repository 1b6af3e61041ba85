"""`tessera cluster submit-train` and `tessera cluster submit-array`: render and submit sbatch jobs.

    tessera cluster submit-train --config demo --nodes 2 --gpus-per-node 8 --time 12:00:00 \\
        -- tessera train transformer --data shards/tokens --output runs/t
    tessera cluster submit-array --parts 16 -- tessera prep crawl --input urls.parquet --output shards/img

Both print the job id (or, with --dry-run, the script). A training job whose command has `--output RUN_DIR`
is recorded in RUN_DIR (slurm_job.json, slurm_starts.jsonl) for `tessera status RUN_DIR`.
The rendering, submission and job records are tessera.cluster.slurm.
"""

from __future__ import annotations

import argparse

from tessera.cluster import slurm
from tessera.cluster.config import SlurmConfig


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
    _add_command(parser)


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
    if args.dry_run:
        print(slurm.train_job_script(cfg, args.command, config=args.config)[0], end="")
        return 0
    print(slurm.submit_train(cfg, args.command, config=args.config, workdir=args.chdir).job_id)
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
