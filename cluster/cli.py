"""`tessera cluster submit-train` and `tessera cluster submit-array`: render and submit sbatch jobs.

    tessera cluster submit-train --config demo --nodes 2 --gpus-per-node 8 --time 12:00:00 \\
        -- tessera train transformer --data shards/tokens --output runs/t
    tessera cluster submit-array --parts 16 -- tessera prep crawl --input urls.parquet --output shards/img

Both print the job id (or, with --dry-run, the script). One module serves both commands: the
command table gives each its own parser, whose prog names the command.
"""

from __future__ import annotations

import argparse

from tessera.cluster.config import SlurmConfig
from tessera.core.errors import InputError


def _is_array(parser: argparse.ArgumentParser) -> bool:
    return parser.prog.endswith("submit-array")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SlurmConfig()
    array = _is_array(parser)
    parser.set_defaults(kind="array" if array else "train")
    g = parser.add_argument_group("slurm")
    g.add_argument("--job-name", default="tessera-prep" if array else d.job_name, help="sbatch --job-name")
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
    if array:
        parser.add_argument("--parts", type=int, required=True, help="number of array tasks; task i gets --part i/N")
        parser.add_argument("--max-parallel", type=int, default=0, help="at most this many tasks at once (0 = no limit)")
    else:
        parser.add_argument(
            "--config", default=None, help="the training config (preset or TOML), passed to the training command as --config"
        )
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
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the tessera command to run")


def run(args: argparse.Namespace) -> int:
    from tessera.cluster import slurm

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise InputError("no command given: put it after '--', e.g. -- tessera prep crawl ...")
    cfg = SlurmConfig(
        job_name=args.job_name,
        time=args.time,
        partition=args.partition,
        account=args.account,
        cpus_per_task=args.cpus_per_task,
        mem=args.mem,
        extra_sbatch=list(args.sbatch),
        setup=list(args.setup),
    )
    if args.output_log:
        cfg.output = args.output_log
    if args.kind == "array":
        script = slurm.render_array_script(cfg, args.parts, command, max_parallel=args.max_parallel)
    else:
        cfg.nodes, cfg.gpus_per_node, cfg.tasks_per_node = args.nodes, args.gpus_per_node, args.tasks_per_node
        cfg.launcher, cfg.signal_before_s, cfg.requeue = args.launcher, args.signal_before, not args.no_requeue
        if args.config and "--config" not in command:
            command = [*command, "--config", args.config]
        script = slurm.render_train_script(cfg, command)
    if args.dry_run:
        print(script, end="")
        return 0
    print(slurm.submit(script, workdir=args.chdir))
    return 0
