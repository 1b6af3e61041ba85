"""tessera.cluster.config: DistConfig (the root [cluster] section) and SlurmConfig (sbatch options), their
validation messages and documentation."""

import dataclasses
import json

import pytest

from tessera.cluster.config import DistConfig, SlurmConfig
from tessera.core import config as C
from tessera.core.errors import ConfigError
from tessera.core.root_config import load_root


@pytest.mark.parametrize("cls", [DistConfig, SlurmConfig])
def test_every_field_is_documented(cls):
    assert (cls.__doc__ or "").strip()
    for f in dataclasses.fields(cls):
        assert f.metadata.get("doc", "").strip(), f"{cls.__name__}.{f.name}"


def test_defaults_validate():
    d = DistConfig()
    d.validate()
    assert (d.backend, d.zero_stage, d.precision, d.powersgd_rank, d.bucket_mb) == ("auto", 0, "fp32", 0, 25)
    s = SlurmConfig()
    s.validate()
    assert (s.nodes, s.gpus_per_node, s.tasks_per_node, s.launcher, s.requeue, s.time) == (1, 0, 1, "srun", True, "01:00:00")
    a, b = SlurmConfig(), SlurmConfig()
    a.extra_sbatch.append("--exclusive")
    a.setup.append("module load cuda")
    assert b.extra_sbatch == [] and b.setup == []


# ---------------------------------------------------------------- DistConfig, through the root config's [cluster]


@pytest.mark.parametrize(
    "values",
    [
        {"zero_stage": 0, "powersgd_rank": 4},
        {"zero_stage": 1, "precision": "bf16"},
        {"zero_stage": 2, "precision": "fp16", "offload_optimizer": True},
        {"zero_stage": 1, "offload_optimizer": True, "overlap_comm": True},
        {"zero_stage": 3, "overlap_comm": True, "backend": "nccl"},
        {"bucket_mb": 1, "timeout_s": 30.0},
    ],
)
def test_dist_valid_combinations(values):
    cfg = load_root(None, [f"cluster.{k}={json.dumps(v)}" for k, v in values.items()]).cluster
    assert isinstance(cfg, DistConfig)
    assert {k: getattr(cfg, k) for k in values} == values


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["cluster.zero_stage=4"], "config key 'cluster.zero_stage': expected 0, 1, 2 or 3, got 4"),
        (["cluster.zero_stage=-1"], "config key 'cluster.zero_stage': expected 0, 1, 2 or 3, got -1"),
        (["cluster.powersgd_rank=-2"], "config key 'cluster.powersgd_rank': expected >= 0, got -2"),
        (
            ["cluster.powersgd_rank=2", "cluster.zero_stage=2"],
            "config key 'cluster.powersgd_rank': PowerSGD needs DDP (zero_stage = 0), DeepSpeed ZeRO stage 2 has no gradient hook",
        ),
        (
            ["cluster.precision=bf16"],
            "config key 'cluster.precision': 'bf16' is applied by DeepSpeed only (zero_stage >= 1); use the trainer's autocast with DDP",
        ),
        (["cluster.bucket_mb=0"], "config key 'cluster.bucket_mb': expected >= 1, got 0"),
        (["cluster.backend=mpi"], "config key 'cluster.backend': expected one of 'auto', 'gloo', 'nccl', got 'mpi'"),
        (
            ["cluster.precision=fp8", "cluster.zero_stage=1"],
            "config key 'cluster.precision': expected one of 'fp32', 'bf16', 'fp16', got 'fp8'",
        ),
        (["cluster.zero_stage=two"], "config key 'cluster.zero_stage': expected int, got str 'two'"),
        (["cluster.overlap_comm=1"], "config key 'cluster.overlap_comm': expected bool, got int 1"),
        (
            ["cluster.overlap_comm=true"],
            "config key 'cluster.overlap_comm': applies to DeepSpeed only (zero_stage >= 1), got zero_stage = 0",
        ),
        (
            ["cluster.offload_optimizer=true"],
            "config key 'cluster.offload_optimizer': applies to DeepSpeed only (zero_stage >= 1), got zero_stage = 0",
        ),
        (["cluster.timeout_s=0"], "config key 'cluster.timeout_s': expected > 0, got 0.0"),
        (["cluster.powersgd_start_iter=-1"], "config key 'cluster.powersgd_start_iter': expected >= 0, got -1"),
        (["cluster.powersgd_min_compression_rate=0"], "config key 'cluster.powersgd_min_compression_rate': expected > 0, got 0.0"),
    ],
)
def test_dist_rejections_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_root(None, overrides)
    assert str(e.value) == message


def test_dist_validate_on_a_built_instance():
    with pytest.raises(ConfigError, match="cluster.powersgd_rank"):
        DistConfig(zero_stage=3, powersgd_rank=1).validate()


# ---------------------------------------------------------------- SlurmConfig


@pytest.mark.parametrize("time", ["01:00:00", "1-00:00:00", "12:00:00", "5", "90", "2-12", "30:00", "7-23:59:59"])
def test_slurm_time_formats_accepted(time):
    SlurmConfig(time=time).validate()


@pytest.mark.parametrize("time", ["soon", "", "1:2", "1h", "01:00:00:00", "-5", "1-", "12:60:00x"])
def test_slurm_time_formats_rejected(time):
    with pytest.raises(ConfigError) as e:
        SlurmConfig(time=time).validate()
    assert str(e.value) == f"slurm option 'time': expected [D-]HH:MM:SS or minutes, got {time!r}"


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"nodes": 0}, "slurm option 'nodes': expected >= 1, got 0"),
        ({"tasks_per_node": 0}, "slurm option 'tasks_per_node': expected >= 1, got 0"),
        ({"cpus_per_task": -1}, "slurm option 'cpus_per_task': expected >= 1, got -1"),
        ({"gpus_per_node": -1}, "slurm option 'gpus_per_node': expected >= 0, got -1"),
        ({"signal_before_s": -10}, "slurm option 'signal_before_s': expected >= 0, got -10"),
    ],
)
def test_slurm_rejections_name_the_option(kw, message):
    with pytest.raises(ConfigError) as e:
        SlurmConfig(**kw).validate()
    assert str(e.value) == message


def test_slurm_boundaries_accepted():
    SlurmConfig(nodes=1, tasks_per_node=1, cpus_per_task=1, gpus_per_node=0, signal_before_s=0).validate()


@pytest.mark.parametrize("gpus, tasks, ranks", [(0, 1, 1), (0, 6, 6), (8, 1, 8), (4, 16, 4)])
def test_ranks_per_node_gpus_win_over_tasks(gpus, tasks, ranks):
    assert SlurmConfig(gpus_per_node=gpus, tasks_per_node=tasks).ranks_per_node == ranks


def test_slurm_config_loads_from_a_dict_with_types_checked():
    cfg = C.from_dict(SlurmConfig, {"nodes": 2, "launcher": "torchrun", "extra_sbatch": ["--exclusive"]}, prefix="slurm")
    assert (cfg.nodes, cfg.launcher, cfg.extra_sbatch) == (2, "torchrun", ["--exclusive"])
    with pytest.raises(ConfigError, match=r"config key 'slurm.launcher': expected one of 'srun', 'torchrun', got 'mpirun'"):
        C.from_dict(SlurmConfig, {"launcher": "mpirun"}, prefix="slurm")
    with pytest.raises(ConfigError, match="slurm option 'nodes'"):
        C.from_dict(SlurmConfig, {"nodes": 0}, prefix="slurm")
