"""tessera.cluster.slurm: rendered scripts (no cluster), then real jobs on a one-node SLURM cluster (conftest)."""

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tessera import cli
from tessera.cluster import slurm
from tessera.cluster.config import SlurmConfig
from tessera.dataprep import synthetic
from tessera.status import read_status

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
sys.path.insert(0, str(REPO / "tests" / "trainer"))
from dvae_shapes import write_shape_shards  # noqa: E402


def sbatch_lines(script: str) -> list[str]:
    return [line[len("#SBATCH ") :] for line in script.splitlines() if line.startswith("#SBATCH ")]


# ---------------------------------------------------------------- rendering (no cluster needed)


def test_render_train_srun():
    cfg = SlurmConfig(
        job_name="t", nodes=4, gpus_per_node=8, cpus_per_task=10, time="12:00:00", partition="gpu", mem="500G", signal_before_s=300
    )
    s = slurm.render_train_script(cfg, ["tessera", "train", "transformer", "--output", "runs/a b"])
    lines = sbatch_lines(s)
    for want in (
        "--nodes=4",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--cpus-per-task=10",
        "--time=12:00:00",
        "--partition=gpu",
        "--mem=500G",
        "--requeue",
        "--open-mode=append",
        "--signal=USR1@300",
        "--job-name=t",
    ):
        assert want in lines, (want, lines)
    assert s.startswith("#!/bin/bash\n")
    assert f"srun --kill-on-bad-exit=1 {PY} -m tessera.cli train transformer --output 'runs/a b'" in s
    assert "MASTER_ADDR" in s and "torch.distributed.run" not in s


def test_render_train_torchrun_and_no_requeue():
    cfg = SlurmConfig(nodes=2, gpus_per_node=4, launcher="torchrun", requeue=False, signal_before_s=60)
    s = slurm.render_train_script(cfg, ["--", "tessera", "train", "dvae"])
    lines = sbatch_lines(s)
    assert "--ntasks-per-node=1" in lines and "--signal=B:USR1@60" in lines
    assert "--requeue" not in lines
    assert "--nproc-per-node=4" in s and "--no-python" in s and "TESSERA_STOP_FILE" in s
    assert f"{PY} -m torch.distributed.run --nnodes=$SLURM_NNODES" in s


def test_render_array():
    s = slurm.render_array_script(SlurmConfig(cpus_per_task=4), 8, ["tessera", "prep", "encode", "--input", "img"], max_parallel=3)
    lines = sbatch_lines(s)
    assert "--array=0-7%3" in lines and "--cpus-per-task=4" in lines
    assert any(line.startswith("--output=") and "%a" in line for line in lines)
    assert f'exec {PY} -m tessera.cli prep encode --input img --part "${{SLURM_ARRAY_TASK_ID}}/8"' in s
    with pytest.raises(slurm.SlurmError, match="--part"):
        slurm.render_array_script(SlurmConfig(), 2, ["tessera", "prep", "crawl", "--part", "0/2"])
    with pytest.raises(slurm.SlurmError, match="parts"):
        slurm.render_array_script(SlurmConfig(), 0, ["x"])


def test_cli_dry_run_and_errors():
    r = subprocess.run(
        [
            PY,
            "-m",
            "tessera.cli",
            "cluster",
            "submit-train",
            "--config",
            "demo",
            "--tasks-per-node",
            "2",
            "--time",
            "5",
            "--dry-run",
            "--",
            "tessera",
            "train",
            "dvae",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --ntasks-per-node=2" in r.stdout and "#SBATCH --time=5" in r.stdout
    assert "train dvae --config demo" in r.stdout
    r = subprocess.run(
        [PY, "-m", "tessera.cli", "cluster", "submit-array", "--parts", "2", "--dry-run"], capture_output=True, text=True, cwd=REPO
    )
    assert r.returncode == 2 and "tessera: error:" in r.stderr and "--" in r.stderr
    r = subprocess.run(
        [PY, "-m", "tessera.cli", "cluster", "submit-train", "--time", "soon", "--dry-run", "--", "x"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 2 and "time" in r.stderr


def test_preemption_handler_signals_and_stop_file(tmp_path, monkeypatch):
    import os
    import signal

    before = signal.getsignal(signal.SIGUSR1)
    stop = tmp_path / "stop"
    with slurm.PreemptionHandler(stop_file=stop) as h:
        assert not h.should_stop
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert h.should_stop and h.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is before
    h2 = slurm.PreemptionHandler(stop_file=stop).install()
    try:
        assert not h2.should_stop
        stop.touch()
        assert h2.should_stop and h2.received is None
    finally:
        h2.uninstall()
    for k in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(k, raising=False)
    assert h2.requeue() is False and h2.restart_count() == 0  # outside SLURM
    monkeypatch.setenv("SLURM_JOB_ID", "17")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "12")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert h2.job_id() == "12_3" and h2.restart_count() == 2


# ---------------------------------------------------------------- a real cluster


def wait_for(path: Path, timeout: float, cluster, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: {path} never appeared\n" + cluster.run("squeue", check=False).stdout + cluster.logs())
        time.sleep(0.3)


def test_array_job_parts(slurm_cluster, tmp_path):
    worker = tmp_path / "part.py"
    worker.write_text(
        textwrap.dedent("""
        import json, os, sys
        out, part = sys.argv[1], sys.argv[sys.argv.index("--part") + 1]
        i, n = map(int, part.split("/"))
        json.dump({"part": [i, n], "task": os.environ["SLURM_ARRAY_TASK_ID"], "job": os.environ["SLURM_ARRAY_JOB_ID"]},
                  open(os.path.join(out, f"part{i}.json"), "w"))
    """)
    )
    cfg = SlurmConfig(job_name="arr", time="00:05:00", output=str(tmp_path / "arr-%A_%a.out"))
    job = slurm.submit(slurm.render_array_script(cfg, 2, [PY, str(worker), str(tmp_path)]), workdir=tmp_path)
    assert job.isdigit()
    for i in range(2):
        assert slurm.wait(f"{job}_{i}", timeout_s=60, poll_s=0.5) == "COMPLETED", slurm_cluster.logs()
    got = [json.loads((tmp_path / f"part{i}.json").read_text()) for i in range(2)]
    assert got == [{"part": [0, 2], "task": "0", "job": job}, {"part": [1, 2], "task": "1", "job": job}]
    assert slurm.array_states(job) == {0: "COMPLETED", 1: "COMPLETED"}


def test_array_job_runs_real_crawl_parts(slurm_cluster, tmp_path):
    """`tessera cluster submit-array --parts 2 -- tessera prep crawl ...` over images served on 127.0.0.1."""
    import csv
    import tarfile

    (tmp_path / "img").mkdir()
    rows = []
    for i, attrs in enumerate(synthetic.all_combinations()[:8]):
        synthetic.render(attrs, size=48).save(tmp_path / "img" / f"{i}.jpg")
        rows.append((f"img/{i}.jpg", synthetic.caption(attrs)))
    server, base = synthetic.serve(tmp_path)
    try:
        with open(tmp_path / "urls.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["url", "caption"])
            w.writerows((base.rstrip("/") + "/" + p, c) for p, c in rows)
        r = subprocess.run(
            [
                PY,
                "-m",
                "tessera.cli",
                "cluster",
                "submit-array",
                "--parts",
                "2",
                "--time",
                "00:05:00",
                "--job-name",
                "crawl",
                "--output-log",
                str(tmp_path / "crawl-%A_%a.out"),
                "--",
                "tessera",
                "prep",
                "crawl",
                "--input",
                "urls.csv",
                "--output",
                "shards",
                "--shard-size",
                "2",
                "--processes",
                "1",
                "--threads",
                "2",
                "--image-size",
                "32",
                "--min-image-size",
                "16",
                "--no-progress",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        job = r.stdout.strip()
        assert job.isdigit(), r.stdout
        states = [slurm.wait(f"{job}_{i}", timeout_s=90, poll_s=0.5) for i in range(2)]
    finally:
        server.stop()
    logs = {i: (tmp_path / f"crawl-{job}_{i}.out").read_text() for i in range(2)}
    assert states == ["COMPLETED", "COMPLETED"], logs
    assert "part 0/2" in logs[0] and "part 1/2" in logs[1]
    tars = sorted((tmp_path / "shards").glob("*.tar"))
    assert [t.name for t in tars] == [f"{i:05d}.tar" for i in range(4)]
    stats = [json.loads((tmp_path / "shards" / f"{i:05d}_stats.json").read_text()) for i in range(4)]
    assert sum(s["successes"] for s in stats) == 8
    for t in tars:
        with tarfile.open(t) as tf:
            assert len([n for n in tf.getnames() if n.endswith(".jpg")]) == 2


def test_training_job_sees_two_ranks(slurm_cluster, tmp_path):
    worker = tmp_path / "rank.py"
    worker.write_text(
        textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {str(REPO)!r})
        import torch
        from tessera.cluster.dist import discover, init, shutdown
        s = discover()
        d = dict(rank=s.rank, world=s.world_size, local=s.local_rank, source=s.source, procid=os.environ["SLURM_PROCID"])
        s = init(s, backend="gloo", timeout_s=60)
        t = torch.tensor([float(s.rank + 1)])
        s.all_reduce_mean(t)
        d["mean"] = t.item()
        shutdown(s)
        json.dump(d, open(os.path.join(sys.argv[1], f"rank{{d['rank']}}.json"), "w"))
    """)
    )
    cfg = SlurmConfig(job_name="ranks", tasks_per_node=2, time="00:05:00", signal_before_s=0, output=str(tmp_path / "ranks-%j.out"))
    script = slurm.render_train_script(cfg, [PY, str(worker), str(tmp_path)])
    job = slurm.submit(script, workdir=tmp_path)
    state = slurm.wait(job, timeout_s=90, poll_s=0.5)
    log = "".join(p.read_text() for p in tmp_path.glob("ranks-*.out"))
    assert state == "COMPLETED", log + slurm_cluster.logs()
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert got == [dict(rank=r, world=2, local=r, source="slurm", procid=str(r), mean=1.5) for r in range(2)]
    assert f"tessera: job {job} restart 0" in log


def test_preemption_checkpoint_requeue_resume(slurm_cluster, tmp_path):
    """USR1 -> checkpoint the counter -> requeue itself -> the second run resumes and finishes."""
    worker = tmp_path / "loop.py"
    worker.write_text(
        textwrap.dedent(f"""
        import json, os, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from tessera.cluster.slurm import PreemptionHandler
        out = sys.argv[1]
        ck = os.path.join(out, "counter.json")
        h = PreemptionHandler().install()
        state = json.load(open(ck)) if os.path.exists(ck) else {{"count": 0, "runs": []}}
        state["runs"].append({{"restart": h.restart_count(), "start": state["count"]}})
        def save(name, obj):
            tmp = os.path.join(out, name + ".tmp")
            json.dump(obj, open(tmp, "w"))
            os.replace(tmp, os.path.join(out, name))
        while state["count"] < 30:
            time.sleep(0.1)
            state["count"] += 1
            save("progress.json", {{"count": state["count"], "restart": h.restart_count()}})
            if h.should_stop:
                state["runs"][-1]["stopped_at"] = state["count"]
                save("counter.json", state)
                h.requeue()
                time.sleep(30)  # SLURM ends this run
                sys.exit(1)
        save("final.json", state)
    """)
    )
    cfg = SlurmConfig(job_name="preempt", tasks_per_node=1, time="00:05:00", output=str(tmp_path / "preempt-%j.out"))
    job = slurm.submit(slurm.render_train_script(cfg, [PY, str(worker), str(tmp_path)]), workdir=tmp_path)
    progress = tmp_path / "progress.json"
    wait_for(progress, 60, slurm_cluster, "first run")
    deadline = time.monotonic() + 30
    while json.loads(progress.read_text())["count"] < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    r = slurm_cluster.run("scancel", "--signal=USR1", job, check=False)
    assert r.returncode == 0, r.stderr
    # slurmctld holds a requeued batch job back (Reason=BeginTime, a delay that lets the old
    # run's clean-up finish, about two minutes); the test moves its start to now instead of waiting.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = slurm_cluster.run("squeue", "-h", "-j", job, "-o", "%T %r", check=False)
        if r.stdout.split()[:1] == ["PENDING"]:
            break
        time.sleep(0.3)
    assert r.stdout.split() == ["PENDING", "BeginTime"], r.stdout
    assert json.loads((tmp_path / "counter.json").read_text())["runs"][0]["stopped_at"] >= 5
    slurm_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    wait_for(tmp_path / "final.json", 60, slurm_cluster, "requeued run")
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["count"] == 30
    runs = final["runs"]
    assert len(runs) == 2, runs
    assert runs[0]["restart"] == 0 and runs[0]["start"] == 0 and 5 <= runs[0]["stopped_at"] < 30
    assert runs[1] == {"restart": 1, "start": runs[0]["stopped_at"]}
    assert slurm.wait(job, timeout_s=30, poll_s=0.5) == "COMPLETED"
    log = "".join(p.read_text() for p in tmp_path.glob("preempt-*.out"))
    assert f"tessera: job {job} restart 0" in log and f"tessera: job {job} restart 1" in log  # --open-mode=append


def test_torchrun_job_stops_on_batch_signal(slurm_cluster, tmp_path):
    """torchrun launcher: USR1 to the batch shell -> stop file -> every rank agrees to stop and exits cleanly."""
    worker = tmp_path / "tr.py"
    worker.write_text(
        textwrap.dedent(f"""
        import json, os, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from tessera.cluster.dist import discover, init, shutdown
        from tessera.cluster.slurm import PreemptionHandler
        out = sys.argv[1]
        s = init(discover(), backend="gloo", timeout_s=60)
        h = PreemptionHandler().install()
        step = 0
        while not h.should_stop_all(s):
            step += 1
            time.sleep(0.1)
            if s.rank == 0:
                open(os.path.join(out, "running"), "w").write(str(step))
            if step > 600:
                sys.exit(3)
        json.dump(dict(rank=s.rank, world=s.world_size, source=s.source, step=step, stop_file=str(h.stop_file)),
                  open(os.path.join(out, f"stopped{{s.rank}}.json"), "w"))
        shutdown(s)
    """)
    )
    cfg = SlurmConfig(
        job_name="tr", launcher="torchrun", tasks_per_node=2, cpus_per_task=2, time="00:05:00", output=str(tmp_path / "tr-%j.out")
    )
    script = slurm.render_train_script(cfg, [PY, str(worker), str(tmp_path)])
    job = slurm.submit(script, workdir=tmp_path)
    wait_for(tmp_path / "running", 90, slurm_cluster, "torchrun workers")
    r = slurm_cluster.run("scancel", "--batch", "--signal=USR1", job, check=False)
    assert r.returncode == 0, r.stderr
    state = slurm.wait(job, timeout_s=60, poll_s=0.5)
    log = "".join(p.read_text() for p in tmp_path.glob("tr-*.out"))
    assert state == "COMPLETED", log
    got = [json.loads((tmp_path / f"stopped{r}.json").read_text()) for r in range(2)]
    assert [(g["rank"], g["world"], g["source"]) for g in got] == [(0, 2, "torchrun"), (1, 2, "torchrun")]
    assert got[0]["step"] == got[1]["step"]  # they agreed on the same step
    assert got[0]["stop_file"] == str(tmp_path / f".tessera-stop-{job}")
    assert not (tmp_path / f".tessera-stop-{job}").exists()  # removed by the script at the end


# ---------------------------------------------------------------- tessera status of submitted jobs

STATUS_DVAE = [
    "dvae.train.codebook_init=none",
    "dvae.train.diversity_weight=0",
    "dvae.train.mse_weight=0",
    "dvae.model.image_size=16",
    "dvae.model.n_groups=3",
    "dvae.model.n_hid=8",
    "dvae.model.n_blk_per_group=1",
    "dvae.model.vocab_size=32",
    "dvae.model.n_init=16",
    "dvae.train.batch_size=8",
    "dvae.train.shuffle_buffer=8",
    "dvae.train.eval_samples=16",
    "dvae.train.time_budget_s=0",
    "dvae.train.steps=600",
    "dvae.train.log_every=20",
    "dvae.train.eval_every=600",
    "dvae.train.sample_every=600",
    "dvae.train.ckpt_every=200",
    "dvae.train.workers=0",
]


def cli_status(capsys, run_dir) -> dict[str, str]:
    assert cli.main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    return {line[:16].strip(): line[16:].strip() for line in out.splitlines()}


@pytest.mark.slurm
def test_status_of_a_dvae_job_submitted_with_submit_train(slurm_cluster, tmp_path, capsys):
    """submit-train -> the job id in RUN_DIR; status: RUNNING with a step while it trains, COMPLETED and finished after."""
    write_shape_shards(tmp_path / "shards", n_shards=2, per_shard=16, size=16, seed=3)
    r = subprocess.run(
        [PY, "-m", "tessera.cli", "cluster", "submit-train", "--time", "00:05:00", "--job-name", "status", "--signal-before", "0"]
        + ["--output-log", str(tmp_path / "status-%j.out"), "--config", "demo", "--"]
        + ["tessera", "train", "dvae", "--data", "shards", "--output", "runs/d", *STATUS_DVAE],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip()
    run = tmp_path / "runs" / "d"
    assert json.loads((run / "slurm_job.json").read_text())["job_id"] == job
    seen, running = [], None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        s = read_status(run)
        seen.append(s["slurm"]["state"])
        if s["slurm"]["state"] == "RUNNING" and s["step"] is not None and not s["finished"]:
            running = s
            break
        if s["slurm"]["state"] in slurm.TERMINAL_STATES:
            break
        time.sleep(0.2)
    log = "".join(p.read_text() for p in tmp_path.glob("status-*.out"))
    assert running is not None, (seen, log)
    assert running["slurm"]["job_id"] == job and running["slurm"]["state_source"] == "squeue"
    assert running["kind"] == "dvae" and 0 < running["step"] < 600 and running["target_steps"] == 600
    assert running["slurm"]["starts"] == 1 and running["slurm"]["restarts"] == 0
    assert slurm.wait(job, timeout_s=180, poll_s=0.5) == "COMPLETED", log + slurm_cluster.logs()
    # after the end: squeue no longer lists the job; slurmctld still holds it (MinJobAge=300 s), so scontrol
    # answers; this cluster keeps no accounting (accounting_storage/none), so sacct has nothing to say
    s = read_status(run)
    assert s["slurm"]["state"] == "COMPLETED" and s["slurm"]["state_source"] == "scontrol", s["slurm"]
    assert slurm._sacct_state(job) is None
    assert s["finished"] is True and s["step"] == 600 and s["stop_reason"] == "steps"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert s["loss"] == [r for r in rows if "loss" in r][-1]["loss"]
    t = cli_status(capsys, run)
    assert t["step"] == "600 / 600" and t["finished"] == "yes (the configured steps reached)"
    assert t["slurm job"] == f"{job}: COMPLETED (from scontrol); 1 start(s), 0 requeue(s)"


@pytest.mark.slurm
def test_status_counts_the_starts_of_a_requeued_job(slurm_cluster, tmp_path, capsys):
    """The job script appends every (re)start to RUN_DIR/slurm_starts.jsonl; status shows the requeue."""
    worker = tmp_path / "w.py"
    worker.write_text(
        textwrap.dedent("""
        import os, sys, time
        out = sys.argv[sys.argv.index("--output") + 1]
        if os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
            open(os.path.join(out, "first"), "w").write("1")
            time.sleep(120)  # requeued by the test
    """)
    )
    r = subprocess.run(
        [PY, "-m", "tessera.cli", "cluster", "submit-train", "--time", "00:05:00", "--job-name", "rq", "--signal-before", "0"]
        + ["--output-log", str(tmp_path / "rq-%j.out"), "--", PY, str(worker), "--output", "run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip()
    wait_for(tmp_path / "run" / "first", 60, slurm_cluster, "first start")
    s = read_status(tmp_path / "run")
    assert (s["kind"], s["step"], s["slurm"]["state"], s["slurm"]["starts"]) == (None, None, "RUNNING", 1)
    slurm_cluster.run("scontrol", "requeue", job)
    deadline = time.monotonic() + 30
    while slurm.job_state(job) != "PENDING" and time.monotonic() < deadline:
        time.sleep(0.3)
    s = read_status(tmp_path / "run")
    assert s["slurm"]["state"] == "PENDING" and s["slurm"]["reason"] == "BeginTime", s["slurm"]  # the requeue delay
    # slurmd refuses a credential made in the second its job's old one was revoked ("Job credential revoked")
    time.sleep(2)
    slurm_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    assert slurm.wait(job, timeout_s=60, poll_s=0.5) == "COMPLETED", slurm_cluster.logs()
    s = read_status(tmp_path / "run")
    assert (s["slurm"]["starts"], s["slurm"]["restarts"], s["slurm"]["state"]) == (2, 1, "COMPLETED")
    assert cli_status(capsys, tmp_path / "run")["slurm job"] == f"{job}: COMPLETED (from scontrol); 2 start(s), 1 requeue(s)"
