"""`tessera cluster submit-train|submit-array` (tessera.cli.cluster): flags -> sbatch script, submission, errors.

No SLURM needed: --dry-run prints the script, and submission goes to a stand-in `sbatch` on PATH
that records what it was given.
"""

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tessera import cli
from tessera.cluster import slurm
from tessera.core.errors import InputError

PY = sys.executable


def submit(capsys, *args):
    code = cli.main(["cluster", *args])
    out, err = capsys.readouterr()
    return code, out, err


def sbatch_lines(script: str) -> list[str]:
    return [line[len("#SBATCH ") :] for line in script.splitlines() if line.startswith("#SBATCH ")]


def body_lines(script: str) -> list[str]:
    lines = script.splitlines()
    return lines[lines.index("set -uo pipefail") + 1 :]


def test_submit_train_dry_run_carries_every_option(capsys):
    code, out, err = submit(
        capsys,
        "submit-train",
        "--dry-run",
        "--config",
        "demo",
        "--job-name",
        "big",
        "--time",
        "2-00:00:00",
        "--partition",
        "gpu",
        "--account",
        "acct",
        "--cpus-per-task",
        "6",
        "--mem",
        "64G",
        "--output-log",
        "logs/%x-%j.out",
        "--sbatch=--constraint=a100",
        "--sbatch=--exclusive",
        "--setup",
        "source .venv/bin/activate",
        "--setup",
        "module load cuda",
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
        "--signal-before",
        "300",
        "--",
        "tessera",
        "train",
        "transformer",
        "--data",
        "shards/tok",
        "--output",
        "runs/t",
    )
    assert code == 0 and err == ""
    assert out.startswith("#!/bin/bash\n")
    assert sbatch_lines(out) == [
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--job-name=big",
        "--time=2-00:00:00",
        "--cpus-per-task=6",
        "--partition=gpu",
        "--account=acct",
        "--mem=64G",
        "--requeue",
        "--open-mode=append",
        "--signal=USR1@300",
        "--output=logs/%x-%j.out",
        "--constraint=a100",
        "--exclusive",
    ]
    body = body_lines(out)
    assert body[:2] == ["source .venv/bin/activate", "module load cuda"]  # setup first, in order
    assert body[-1] == f"srun --kill-on-bad-exit=1 {PY} -m tessera.cli train transformer --data shards/tok --output runs/t --config demo"


def test_submit_train_defaults(capsys):
    code, out, _ = submit(capsys, "submit-train", "--dry-run", "--", "tessera", "train", "dvae")
    assert code == 0
    assert sbatch_lines(out) == [
        "--nodes=1",
        "--ntasks-per-node=1",
        "--job-name=tessera",
        "--time=01:00:00",
        "--cpus-per-task=1",
        "--requeue",
        "--open-mode=append",
        "--signal=USR1@120",
        "--output=slurm-%x-%j.out",
    ]
    assert out.rstrip().endswith("-m tessera.cli train dvae")  # no --config given: none added


def test_submit_train_cpu_torchrun_without_requeue(capsys):
    code, out, _ = submit(
        capsys,
        "submit-train",
        "--dry-run",
        "--launcher",
        "torchrun",
        "--tasks-per-node",
        "3",
        "--nodes",
        "2",
        "--no-requeue",
        "--signal-before",
        "60",
        "--",
        "tessera",
        "train",
        "transformer",
    )
    assert code == 0
    lines = sbatch_lines(out)
    assert "--ntasks-per-node=1" in lines and "--nodes=2" in lines  # one torchrun per node
    assert "--signal=B:USR1@60" in lines  # the batch shell gets the signal and touches the stop file
    assert "--requeue" not in lines and "--open-mode=append" not in lines
    assert not any(line.startswith("--gpus-per-node") for line in lines)
    assert "--nproc-per-node=3" in out and "TESSERA_STOP_FILE" in out


def test_signal_before_zero_sends_no_signal(capsys):
    code, out, _ = submit(capsys, "submit-train", "--dry-run", "--signal-before", "0", "--", "tessera", "train", "dvae")
    assert code == 0
    assert not any(line.startswith("--signal") for line in sbatch_lines(out))


def test_config_is_not_added_twice(capsys):
    code, out, _ = submit(
        capsys, "submit-train", "--dry-run", "--config", "demo", "--", "tessera", "train", "dvae", "--config", "mine.toml"
    )
    assert code == 0
    last = out.rstrip().splitlines()[-1]
    assert last.endswith("train dvae --config mine.toml") and last.count("--config") == 1


def test_submit_array_dry_run(capsys):
    code, out, err = submit(
        capsys,
        "submit-array",
        "--dry-run",
        "--parts",
        "4",
        "--max-parallel",
        "2",
        "--cpus-per-task",
        "8",
        "--output-log",
        "logs/%x-%j.out",
        "--",
        "tessera",
        "prep",
        "crawl",
        "--input",
        "urls.parquet",
        "--output",
        "shards/img",
    )
    assert code == 0 and err == ""
    assert sbatch_lines(out) == [
        "--array=0-3%2",
        "--ntasks=1",
        "--job-name=tessera-prep",
        "--time=01:00:00",
        "--cpus-per-task=8",
        "--output=slurm-%x-%A_%a.out",  # a pattern without %a would mix the tasks' logs: the default replaces it
    ]
    assert (
        body_lines(out)[-1]
        == f'exec {PY} -m tessera.cli prep crawl --input urls.parquet --output shards/img --part "${{SLURM_ARRAY_TASK_ID}}/4"'
    )
    code, out, _ = submit(
        capsys, "submit-array", "--dry-run", "--parts", "2", "--output-log", "logs/%A_%a.log", "--", "tessera", "prep", "encode"
    )
    assert code == 0 and "--output=logs/%A_%a.log" in sbatch_lines(out) and "--array=0-1" in sbatch_lines(out)


@pytest.mark.parametrize(
    "args, message",
    [
        (["submit-train", "--dry-run"], "no command given: put it after '--', e.g. -- tessera prep crawl ..."),
        (["submit-train", "--dry-run", "--"], "no command given: put it after '--', e.g. -- tessera prep crawl ..."),
        (["submit-train", "--dry-run", "--nodes", "0", "--", "x"], "slurm option 'nodes': expected >= 1, got 0"),
        (["submit-train", "--dry-run", "--gpus-per-node", "-1", "--", "x"], "slurm option 'gpus_per_node': expected >= 0, got -1"),
        (
            ["submit-train", "--dry-run", "--time", "tomorrow", "--", "x"],
            "slurm option 'time': expected [D-]HH:MM:SS or minutes, got 'tomorrow'",
        ),
        (["submit-array", "--dry-run", "--parts", "0", "--", "x"], "--parts: expected >= 1, got 0"),
        (
            ["submit-array", "--dry-run", "--cpus-per-task", "0", "--parts", "2", "--", "x"],
            "slurm option 'cpus_per_task': expected >= 1, got 0",
        ),
        (
            ["submit-array", "--dry-run", "--parts", "2", "--", "tessera", "prep", "crawl", "--part", "0/2"],
            "the array job adds '--part I/N' itself; remove --part from the command",
        ),
    ],
)
def test_errors_are_one_line_exit_2(capsys, args, message):
    code, out, err = submit(capsys, *args)
    assert code == 2 and out == ""
    assert err == f"tessera: error: {message}\n"


def test_array_needs_parts(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["cluster", "submit-array", "--dry-run", "--", "x"])
    assert e.value.code == 2
    assert "--parts" in capsys.readouterr().err


# ---------------------------------------------------------------- submission through a stand-in sbatch


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    """An `sbatch` first on PATH: saves its stdin, arguments and working directory; answers like --parsable."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    rec = tmp_path / "rec"
    rec.mkdir()
    script = bin_dir / "sbatch"
    script.write_text(
        "#!/bin/sh\n"
        f'cat > "{rec}/stdin"\n'
        f'echo "$@" > "{rec}/args"\n'
        f'pwd > "{rec}/cwd"\n'
        'if [ -n "$FAKE_SBATCH_FAIL" ]; then echo "sbatch: error: Batch job submission failed: $FAKE_SBATCH_FAIL" >&2; exit 1; fi\n'
        'echo "4242;cluster"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.delenv("FAKE_SBATCH_FAIL", raising=False)
    return rec


def test_submit_pipes_the_dry_run_script_and_prints_the_job_id(fake_sbatch, tmp_path, capsys):
    opts = ["--nodes", "2", "--tasks-per-node", "2", "--config", "demo", "--", "tessera", "train", "dvae"]
    workdir = tmp_path / "work"
    workdir.mkdir()
    code, out, err = submit(capsys, "submit-train", "--chdir", str(workdir), *opts)
    assert code == 0 and out == "4242\n" and err == ""  # the id only, without the cluster name
    assert (fake_sbatch / "args").read_text().split() == ["--parsable"]
    assert Path((fake_sbatch / "cwd").read_text().strip()).resolve() == workdir.resolve()
    sent = (fake_sbatch / "stdin").read_text()
    _, dry, _ = submit(capsys, "submit-train", "--dry-run", *opts)
    assert sent == dry and "#SBATCH --ntasks-per-node=2" in sent and "train dvae --config demo" in sent


def test_submit_array_prints_the_array_job_id(fake_sbatch, capsys):
    code, out, _ = submit(capsys, "submit-array", "--parts", "3", "--", "tessera", "prep", "encode")
    assert code == 0 and out == "4242\n"
    assert "#SBATCH --array=0-2" in (fake_sbatch / "stdin").read_text()


def test_sbatch_refusal_is_one_line_exit_2(fake_sbatch, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_SBATCH_FAIL", "Invalid partition name specified")
    code, out, err = submit(capsys, "submit-train", "--partition", "nope", "--", "tessera", "train", "dvae")
    assert code == 2 and out == ""
    assert err == "tessera: error: sbatch refused the job: sbatch: error: Batch job submission failed: Invalid partition name specified\n"


def test_missing_sbatch_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    code, out, err = submit(capsys, "submit-train", "--", "tessera", "train", "dvae")
    assert code == 2 and out == ""
    assert err == "tessera: error: 'sbatch' not found: is the SLURM client installed and on PATH?\n"


# ---------------------------------------------------------------- the job record in the run directory


def test_submit_train_records_the_job_in_the_run_dir(fake_sbatch, tmp_path, capsys):
    workdir = tmp_path / "work"
    workdir.mkdir()
    before = time.time()
    code, out, _ = submit(
        capsys, "submit-train", "--chdir", str(workdir), "--config", "demo", "--", "tessera", "train", "dvae", "--output", "runs/d"
    )
    assert code == 0 and out == "4242\n"
    rec = json.loads((workdir / "runs" / "d" / "slurm_job.json").read_text())  # relative to the job's directory, created
    assert rec["job_id"] == "4242" and rec["cluster"] == "cluster" and rec["job_name"] == "tessera"
    assert before <= rec["submitted"] <= time.time()
    assert rec["command"] == ["tessera", "train", "dvae", "--output", "runs/d", "--config", "demo"]  # the command the job runs
    assert not list((workdir / "runs" / "d").glob(".*tmp*"))  # written through a temporary name
    sent = (fake_sbatch / "stdin").read_text()
    assert "mkdir -p runs/d" in sent and ">> runs/d/slurm_starts.jsonl" in sent
    # --output=DIR, an absolute path, and a resubmission replacing the record
    abs_dir = tmp_path / "abs run"
    code, out, _ = submit(capsys, "submit-train", "--", "tessera", "train", "clip", f"--output={abs_dir}")
    assert code == 0 and json.loads((abs_dir / "slurm_job.json").read_text())["job_id"] == "4242"
    assert f">> '{abs_dir}'/slurm_starts.jsonl" in (fake_sbatch / "stdin").read_text()


def test_no_output_no_record_and_dry_run_writes_nothing(fake_sbatch, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = submit(capsys, "submit-train", "--", "tessera", "train", "dvae")
    assert code == 0 and "slurm_starts" not in (fake_sbatch / "stdin").read_text()
    code, out, _ = submit(capsys, "submit-train", "--dry-run", "--", "tessera", "train", "dvae", "--output", "runs/x")
    assert code == 0 and ">> runs/x/slurm_starts.jsonl" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "rec"]  # nothing recorded, no run dir created
    code, out, _ = submit(capsys, "submit-array", "--parts", "2", "--", "tessera", "prep", "encode", "--output", "tok")
    assert code == 0 and not (tmp_path / "tok").exists()  # array jobs have no run directory


def test_the_script_appends_each_start_to_the_run_dir(tmp_path, capsys):
    """The rendered start-record lines, run by bash as the job would at its first start and a requeue."""
    code, out, _ = submit(capsys, "submit-train", "--dry-run", "--", "tessera", "train", "dvae", "--output", "runs/a b")
    assert code == 0
    lines = [line for line in body_lines(out) if "runs/a b" in line and not line.startswith("srun")]
    assert len(lines) == 2
    for restart in ("", "1"):
        env = dict(os.environ, SLURM_JOB_ID="99", SLURM_JOB_NODELIST="node[1-2]")
        env.pop("SLURM_RESTART_COUNT", None)
        if restart:
            env["SLURM_RESTART_COUNT"] = restart
        r = subprocess.run(["bash", "-c", "set -uo pipefail\n" + "\n".join(lines)], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    starts = [json.loads(line) for line in (tmp_path / "runs" / "a b" / "slurm_starts.jsonl").read_text().splitlines()]
    assert [(s["job_id"], s["restart"], s["nodes"]) for s in starts] == [("99", 0, "node[1-2]"), ("99", 1, "node[1-2]")]
    assert all(abs(s["time"] - time.time()) < 60 for s in starts)
    rec = slurm.read_job_record(tmp_path / "runs" / "a b")  # no slurm_job.json: the job of the last start
    assert rec["job_id"] == "99" and len(rec["starts"]) == 2


def test_read_job_record_keeps_the_starts_of_the_recorded_job(tmp_path):
    run = tmp_path / "run"
    slurm.record_job(run, slurm.Submitted("7", "c1"), command=["x"])
    (run / "slurm_starts.jsonl").write_text(
        '{"job_id": "5", "restart": 0, "time": 1, "nodes": "n"}\n{"job_id": "7", "restart": 0, "time": 2, "nodes": "n"}\n{"job_id": "7", "re'
    )
    rec = slurm.read_job_record(run)
    assert rec["job_id"] == "7" and rec["cluster"] == "c1" and [s["time"] for s in rec["starts"]] == [2]  # cut line skipped
    assert slurm.read_job_record(tmp_path) is None
    (run / "slurm_job.json").write_text("{not json")
    with pytest.raises(InputError, match="slurm_job.json' is not a JSON job record"):
        slurm.read_job_record(run)


def test_job_info_without_a_slurm_client(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(slurm.SlurmError, match="'squeue' not found"):
        slurm.job_info("1")


def test_cluster_commands_do_not_import_torch(tmp_path):
    """Rendering or refusing a job needs no torch: a dry run answers in a fraction of a second, not after torch's ~3 s import."""
    code = (
        "import sys\n"
        "from tessera.cli import main\n"
        "code = main(['cluster', 'submit-train', '--config', 'demo', '--dry-run', '--', 'tessera', 'train', 'transformer'])\n"
        "assert code == 0 and 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]\n"
    )
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "#SBATCH" in r.stdout and "train transformer --config demo" in r.stdout
