"""Config of the distributed set-up (the `[cluster]` root section once wired) and of SLURM jobs.

No `from __future__ import annotations` here: tessera.config resolves the type hints at load time.
"""

import re
from dataclasses import dataclass
from typing import Literal

from tessera.core.config import param
from tessera.core.errors import ConfigError

DEFAULT_TIMEOUT_S = 600.0  # the process group's collective timeout when nothing else is configured


@dataclass
class DistConfig:
    """How a training loop's model is wrapped: plain, DDP, or DeepSpeed ZeRO (see tessera.cluster.engine)."""

    backend: Literal["auto", "gloo", "nccl"] = param(
        "auto", "torch.distributed backend of the process group; auto = nccl with CUDA, else gloo (one process needs no group)."
    )
    zero_stage: int = param(
        0, "0 = DDP (plain in a single process); 1, 2, 3 = DeepSpeed ZeRO stage (optimizer, + gradient, + parameter sharding)."
    )
    precision: Literal["fp32", "bf16", "fp16"] = param(
        "fp32", "DeepSpeed's training precision at ZeRO stages 1-3 (fp16 with dynamic loss scaling); DDP leaves the model as built."
    )
    powersgd_rank: int = param(
        0, "PowerSGD rank of the DDP gradient all-reduce (0 = uncompressed); DDP only, DeepSpeed has no gradient hook."
    )
    powersgd_start_iter: int = param(10, "Steps of uncompressed all-reduce before PowerSGD compression starts.")
    powersgd_min_compression_rate: float = param(2.0, "Matrices that compress less than this are all-reduced uncompressed.")
    bucket_mb: int = param(25, "Gradient bucket size in MiB (DDP bucket_cap_mb, DeepSpeed reduce/allgather/prefetch bucket sizes).")
    overlap_comm: bool = param(
        False, "DeepSpeed ZeRO 1-3: overlap gradient reduction with the backward pass (more memory); DDP always overlaps."
    )
    offload_optimizer: bool = param(False, "DeepSpeed ZeRO 1-3: keep the optimizer states in CPU memory and step them there.")
    timeout_s: float = param(DEFAULT_TIMEOUT_S, "Collective timeout of the process group, seconds.")
    sharded: bool = param(
        False,
        "The paper's layout (App. E): FSDP2 shards parameters within groups of ranks_per_node ranks; ranks of the same local "
        "ordinal all-reduce PowerSGD factors of their shard gradients across groups (powersgd_rank; 0 = uncompressed fp32).",
    )
    ranks_per_node: int = param(
        0, "Ranks per group of the sharded layout (0 = LOCAL_WORLD_SIZE, else SLURM_NTASKS_PER_NODE, else the world)."
    )

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"config key 'cluster.zero_stage': expected 0, 1, 2 or 3, got {self.zero_stage}")
        if self.powersgd_rank < 0:
            raise ConfigError(f"config key 'cluster.powersgd_rank': expected >= 0, got {self.powersgd_rank}")
        if self.sharded and self.zero_stage > 0:
            raise ConfigError(
                f"config key 'cluster.sharded': the sharded layout replaces DeepSpeed ZeRO; set zero_stage = 0, got {self.zero_stage}"
            )
        if self.ranks_per_node < 0:
            raise ConfigError(f"config key 'cluster.ranks_per_node': expected >= 0, got {self.ranks_per_node}")
        if self.powersgd_rank > 0 and self.zero_stage > 0:
            raise ConfigError(
                f"config key 'cluster.powersgd_rank': PowerSGD needs DDP (zero_stage = 0), DeepSpeed ZeRO stage {self.zero_stage} has no gradient hook"
            )
        if self.powersgd_start_iter < 0:
            raise ConfigError(f"config key 'cluster.powersgd_start_iter': expected >= 0, got {self.powersgd_start_iter}")
        if not self.powersgd_min_compression_rate > 0:
            raise ConfigError(f"config key 'cluster.powersgd_min_compression_rate': expected > 0, got {self.powersgd_min_compression_rate}")
        if self.precision != "fp32" and self.zero_stage == 0:
            raise ConfigError(
                f"config key 'cluster.precision': {self.precision!r} is applied by DeepSpeed only (zero_stage >= 1); use the trainer's autocast with DDP"
            )
        for key in ("overlap_comm", "offload_optimizer"):
            if getattr(self, key) and self.zero_stage == 0:
                raise ConfigError(f"config key 'cluster.{key}': applies to DeepSpeed only (zero_stage >= 1), got zero_stage = 0")
        if self.bucket_mb < 1:
            raise ConfigError(f"config key 'cluster.bucket_mb': expected >= 1, got {self.bucket_mb}")
        if not self.timeout_s > 0:
            raise ConfigError(f"config key 'cluster.timeout_s': expected > 0, got {self.timeout_s}")


@dataclass
class SlurmConfig:
    """An sbatch job for training (see tessera.cluster.slurm.render_train_script)."""

    job_name: str = param("tessera", "Job name (sbatch --job-name).")
    nodes: int = param(1, "Nodes (sbatch --nodes).")
    gpus_per_node: int = param(0, "GPUs per node; also the ranks per node (0 = CPU job with tasks_per_node ranks).")
    tasks_per_node: int = param(1, "Ranks per node of a CPU job (gpus_per_node = 0).")
    cpus_per_task: int = param(1, "CPU cores per task (sbatch --cpus-per-task).")
    mem: str = param("", "Memory per node, e.g. '64G' (empty = the partition's default).")
    time: str = param("01:00:00", "Time limit, [D-]HH:MM:SS (sbatch --time).")
    partition: str = param("", "Partition (empty = the cluster's default).")
    account: str = param("", "Account to charge (empty = the user's default).")
    launcher: Literal["srun", "torchrun"] = param(
        "srun", "srun: one task per GPU (rank from SLURM_PROCID); torchrun: one task per node running torchrun."
    )
    signal_before_s: int = param(120, "Seconds before the time limit at which SLURM sends SIGUSR1 (checkpoint and requeue).")
    requeue: bool = param(True, "Let the job be requeued (sbatch --requeue) after preemption or a checkpoint-and-requeue.")
    output: str = param("slurm-%x-%j.out", "Log file (sbatch --output, appended across requeues); %x = job name, %j = job id.")
    master_port: int = param(29500, "TCP port of the rendezvous on the first node.")
    extra_sbatch: list[str] = param(doc="More #SBATCH options, e.g. ['--constraint=a100'].", factory=list)
    setup: list[str] = param(doc="Shell lines run before the launch, e.g. ['source .venv/bin/activate'].", factory=list)

    def validate(self) -> None:
        for key in ("nodes", "tasks_per_node", "cpus_per_task"):
            if getattr(self, key) < 1:
                raise ConfigError(f"slurm option '{key}': expected >= 1, got {getattr(self, key)}")
        if self.gpus_per_node < 0:
            raise ConfigError(f"slurm option 'gpus_per_node': expected >= 0, got {self.gpus_per_node}")
        if self.signal_before_s < 0:
            raise ConfigError(f"slurm option 'signal_before_s': expected >= 0, got {self.signal_before_s}")
        if not re.fullmatch(r"(\d+-)?\d{1,2}(:\d{2}){0,2}|\d+", self.time):
            raise ConfigError(f"slurm option 'time': expected [D-]HH:MM:SS or minutes, got {self.time!r}")

    @property
    def ranks_per_node(self) -> int:
        return self.gpus_per_node if self.gpus_per_node > 0 else self.tasks_per_node
