"""One training, three launchers: torchrun, mpirun and srun (a `tessera cluster submit-train` job on the one-node
SLURM cluster of conftest.py) start the same 4-process run of the tiny transformer in the paper's layout (2 groups
x 2, PowerSGD across groups); the rank layout is discovered once (tessera.cluster.dist.discover) and recorded in
RUN/layout.json, and the loss curves are identical. Then the layouts `submit-train --layout` renders (--dry-run)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tessera import cli
from tessera.cluster import slurm

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
sys.path.insert(0, str(REPO / "tests" / "trainer"))
from token_fixtures import make_token_shards  # noqa: E402

STEPS = 5
# the tiny transformer of tests/trainer/token_fixtures.py, PowerSGD rank 2 across groups of 2 ranks (set in the file:
# "forced via config", since the test machine is one node)
TOML = f"""extends = "demo"

[transformer.model]
text_len = 8
d_model = 32
n_layers = 4
n_heads = 2
conv_kernel = 3

[transformer.train]
batch_size = 16
warmup_steps = 2
steps = {STEPS}
log_every = 1
sample_every = 0
eval_every = 0
ckpt_every = 0
time_budget_s = 0
lr = 3e-3
shuffle_buffer = 64
precision = "fp32"
threads = 1

[sample]
batch_size = 8

[cluster]
ranks_per_node = 2
powersgd_rank = 2
"""
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env() -> dict[str, str]:
    """This environment without any launcher's variables (each launcher sets its own), one thread per rank."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith(("SLURM_", "OMPI_", "PMI_", "TORCHELASTIC"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("launch")
    make_token_shards(d / "tokens", n=128, per_shard=64)
    (d / "tiny.toml").write_text(TOML)
    return d


def train_args(setup: Path, run: str, sharded: bool = True) -> list[str]:
    out = ["train", "transformer", "--config", str(setup / "tiny.toml"), "--data", str(setup / "tokens"), "--output", str(setup / run)]
    return out + (["cluster.sharded=true"] if sharded else [])


def run_launcher(cmd: list[str], setup: Path, name: str) -> None:
    r = subprocess.run(cmd, env=clean_env(), cwd=setup, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, f"{name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-4000:]}"


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def check_layout(run: Path, launcher: str) -> dict:
    lay = json.loads((run / "layout.json").read_text())
    assert (lay["launcher"], lay["world_size"], lay["n_groups"], lay["ranks_per_node"]) == (launcher, 4, 2, 2), lay
    assert [(r["rank"], r["local_rank"], r["group"], r["ordinal"]) for r in lay["ranks"]] == [
        (0, 0, 0, 0),
        (1, 1, 0, 1),
        (2, 2, 1, 0),
        (3, 3, 1, 1),
    ]
    assert lay["master_addr"] and lay["master_port"] > 0
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["engine"], summary["world_size"], summary["steps"]) == ("sharded", 4, STEPS)
    return lay


@pytest.fixture(scope="module")
def torchrun_run(setup):
    cmd = [PY, "-m", "torch.distributed.run", "--nproc-per-node", "4", "-m", "tessera.cli", *train_args(setup, "torchrun")]
    run_launcher(cmd, setup, "torchrun")
    return setup / "torchrun"


def test_torchrun_discovers_two_groups_of_two(torchrun_run):
    check_layout(torchrun_run, "torchrun")
    ref = losses(torchrun_run)
    assert len(ref) == STEPS and ref[-1] < 0.9 * ref[0], ref  # it learns


@pytest.mark.mpi
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun is not installed (apt-get install openmpi-bin)")
def test_mpirun_same_layout_same_curve(setup, torchrun_run):
    """No MASTER_ADDR: rank 0's address goes round by mpi4py; OMPI_COMM_WORLD_LOCAL_SIZE would say 4 per node, the config says 2."""
    mpi = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", "4", "-x", "OMP_NUM_THREADS", "-x", "PYTHONPATH"]
    run_launcher([*mpi, PY, "-m", "tessera.cli", *train_args(setup, "mpirun")], setup, "mpirun")
    check_layout(setup / "mpirun", "mpi")
    assert losses(setup / "mpirun") == losses(torchrun_run)


@pytest.mark.slurm
def test_submit_train_srun_same_layout_same_curve(slurm_cluster, setup, torchrun_run, monkeypatch, capsys):
    """`submit-train --layout paper`: 4 srun tasks on the one node (conftest's node has >= 4 CPUs), groups of 2 from the config file."""
    for k in list(os.environ):
        if k in LAUNCH_VARS or k.startswith(("OMPI_", "PMI_")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    log = setup / "srun-%j.out"
    sub = ["cluster", "submit-train", "--nodes", "1", "--tasks-per-node", "4", "--layout", "paper", "--time", "00:10:00"]
    sub += ["--job-name", "launch", "--output-log", str(log), "--mem", "3000M", "--chdir", str(setup)]
    assert cli.main([*sub, "--", "tessera", *train_args(setup, "srun", sharded=False)]) == 0
    job = capsys.readouterr().out.strip()
    state = slurm.wait(job, timeout_s=400, poll_s=1.0)
    text = "".join(p.read_text() for p in setup.glob("srun-*.out"))
    assert state == "COMPLETED", text[-4000:] + slurm_cluster.logs()
    run = setup / "srun"
    assert "tessera: layout paper: 2 groups x 2 ranks, FSDP2 within a group, PowerSGD rank 2 across groups" in text
    assert "tessera: layout: slurm, 4 ranks = 2 groups x 2" in text  # what the ranks discovered
    rec = json.loads((run / "slurm_job.json").read_text())
    assert rec["job_id"] == job and rec["command"][-1] == "cluster.sharded=true"  # added by --layout paper; groups from the file
    check_layout(run, "slurm")
    assert losses(run) == losses(torchrun_run)


# ---------------------------------------------------------------- what submit-train renders (--dry-run)


def dry_run(capsys, *flags: str, command: tuple[str, ...] = ()) -> tuple[int, str, str]:
    code = cli.main(["cluster", "submit-train", "--dry-run", *flags, "--", "tessera", "train", "transformer", "--output", "r", *command])
    out = capsys.readouterr()
    return code, out.out, out.err


def srun_line(script: str) -> str:
    return next(line for line in script.splitlines() if line.startswith("srun "))


def test_submit_train_layouts_rendered(capsys):
    code, s, _ = dry_run(capsys, "--nodes", "4", "--gpus-per-node", "8", "--layout", "paper", command=("cluster.powersgd_rank=32",))
    assert code == 0
    assert {"--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--requeue"} <= set(slurm_lines(s))
    assert srun_line(s).endswith("cluster.powersgd_rank=32 cluster.sharded=true cluster.ranks_per_node=8")
    assert "echo 'tessera: layout paper: 4 groups x 8 ranks, FSDP2 within a group, PowerSGD rank 32 across groups'" in s
    # auto: the config decides; a sharded one gets its groups from the job, a DDP one nothing
    _, s, _ = dry_run(capsys, "--nodes", "2", "--gpus-per-node", "4", command=("cluster.sharded=true",))
    assert srun_line(s).endswith("--output r cluster.sharded=true cluster.ranks_per_node=4")
    _, s, _ = dry_run(capsys, "--nodes", "2", "--gpus-per-node", "4")
    assert srun_line(s).endswith("--output r") and "tessera: layout ddp: 8 ranks, DDP" in s
    # the user's own ranks per node wins; ddp and zero switch the layout off / on
    _, s, _ = dry_run(capsys, "--nodes", "1", "--tasks-per-node", "4", "--layout", "paper", command=("cluster.ranks_per_node=2",))
    assert srun_line(s).endswith("cluster.ranks_per_node=2 cluster.sharded=true")
    _, s, _ = dry_run(capsys, "--nodes", "2", "--gpus-per-node", "4", "--layout", "ddp", command=("cluster.sharded=true",))
    assert srun_line(s).endswith("cluster.sharded=true cluster.sharded=false")
    _, s, _ = dry_run(capsys, "--nodes", "2", "--gpus-per-node", "4", "--layout", "zero2", "--launcher", "torchrun")
    assert "cluster.zero_stage=2 &" in s and "--nproc-per-node=4" in s and "--ntasks-per-node=1" in slurm_lines(s)


def slurm_lines(script: str) -> list[str]:
    return [line[len("#SBATCH ") :] for line in script.splitlines() if line.startswith("#SBATCH ")]


@pytest.mark.parametrize(
    "flags, command, says",
    [
        (("--layout", "paper"), ("cluster.zero_stage=2",), "--layout paper: the training config sets cluster.zero_stage = 2"),
        (("--tasks-per-node", "4", "--layout", "paper"), ("cluster.ranks_per_node=3",), "3 ranks per group do not divide the job's 4"),
        (("--layout", "zero1"), ("cluster.powersgd_rank=4",), "config key 'cluster.powersgd_rank': PowerSGD needs DDP"),
        (("--layout", "paper"), ("cluster.no_such_key=1",), "cluster.no_such_key"),
    ],
)
def test_submit_train_bad_layouts_are_one_line_errors(capsys, flags, command, says):
    code, out, err = dry_run(capsys, *flags, command=command)
    assert (code, out) == (2, "")
    assert err.startswith("tessera: error: ") and says in err and err.count("\n") == 1, err


def test_submit_train_layout_needs_a_tessera_train_command(capsys):
    assert cli.main(["cluster", "submit-train", "--dry-run", "--layout", "paper", "--", PY, "x.py"]) == 2
    assert "not a 'tessera train ...' command" in capsys.readouterr().err
    assert cli.main(["cluster", "submit-train", "--dry-run", "--", PY, "x.py"]) == 0  # auto leaves any other command alone
    assert srun_line(capsys.readouterr().out).endswith(f"{PY} x.py")
