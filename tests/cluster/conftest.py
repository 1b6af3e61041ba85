"""A real one-node SLURM cluster (munge + slurmctld + slurmd) for the session, under a temp dir.

Installs the Debian packages when they are missing and we are root; skips with the reason
otherwise. The daemons run in the foreground (-D) as our child processes and are ended at the end.
"""

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tessera.cluster.dist import free_port

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


def _ensure_installed() -> str | None:
    """None when SLURM is usable, else the reason to skip."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return None
    if os.geteuid() != 0:
        return f"SLURM is not installed and we are not root to install it (apt-get install {' '.join(PACKAGES)})"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        r = subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        return f"apt-get install {' '.join(PACKAGES)} failed: {r.stderr.strip().splitlines()[-1:]}"
    return None


def _munge_ok() -> bool:
    return subprocess.run(["sh", "-c", "munge -n | unmunge"], capture_output=True).returncode == 0


def _start_munge() -> subprocess.Popen | None:
    """Start munged unless one answers already; returns the process we started (or None)."""
    if _munge_ok():
        return None
    run = Path("/run/munge")
    run.mkdir(parents=True, exist_ok=True)
    shutil.chown(run, "munge", "munge")
    if not Path("/etc/munge/munge.key").exists():
        subprocess.run(["mungekey", "--create"], check=True, capture_output=True)
        shutil.chown("/etc/munge/munge.key", "munge", "munge")
    p = subprocess.Popen(
        ["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--foreground"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    for _ in range(50):
        if _munge_ok():
            return p
        time.sleep(0.1)
    p.terminate()
    raise RuntimeError("munged did not start")


def _mem_mib() -> int:
    with open("/proc/meminfo") as f:
        kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    return max(512, kb // 1024 // 2)


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.host = socket.gethostname().split(".")[0]
        # at least 4 CPUs, whatever the machine has, so that a job of 4 one-CPU tasks fits on the one node
        # (SLURM refuses --ntasks-per-node above the node's CPUs even with --overcommit); config_overrides below
        self.cpus = max(os.cpu_count() or 1, 4)
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def write_conf(self) -> None:
        r = self.root
        for d in ("state", "spool", "jobs"):
            (r / d).mkdir(exist_ok=True)
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=tessera-test",
                    f"SlurmctldHost={self.host}",
                    f"SlurmctldPort={free_port()}",
                    f"SlurmdPort={free_port()}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CryptoType=crypto/munge",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core_Memory",
                    "MpiDefault=none",
                    "SlurmdParameters=config_overrides",  # the node as configured here, not as slurmd finds it
                    "ReturnToService=2",
                    "JobCompType=jobcomp/none",
                    "AccountingStorageType=accounting_storage/none",
                    "SchedulerType=sched/backfill",
                    "SchedulerParameters=sched_interval=1",
                    "MinJobAge=300",
                    "KillWait=5",
                    "InactiveLimit=0",
                    "Waittime=0",
                    "DefMemPerCPU=256",
                    f"StateSaveLocation={r / 'state'}",
                    f"SlurmdSpoolDir={r / 'spool'}",
                    f"SlurmctldPidFile={r / 'slurmctld.pid'}",
                    f"SlurmdPidFile={r / 'slurmd.pid'}",
                    f"SlurmctldLogFile={r / 'slurmctld.log'}",
                    f"SlurmdLogFile={r / 'slurmd.log'}",
                    "SlurmctldDebug=info",
                    "SlurmdDebug=info",
                    f"NodeName={self.host} CPUs={self.cpus} RealMemory={_mem_mib()} State=UNKNOWN",
                    "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                ]
            )
            + "\n"
        )

    def run(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=60, **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {r.stderr}")
        return r

    def logs(self) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            p = self.root / name
            if p.exists():
                out.append(f"--- {name}\n" + "\n".join(p.read_text().splitlines()[-30:]))
        return "\n".join(out)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    reason = _ensure_installed()
    if reason:
        pytest.skip(reason)
    if os.geteuid() != 0:
        pytest.skip("the test SLURM cluster runs its daemons as root (SlurmUser=root); not root here")
    munge = _start_munge()
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    c.write_conf()
    procs = [
        subprocess.Popen(["slurmctld", "-D", "-c", "-f", str(c.conf)], env=c.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    try:
        time.sleep(0.5)
        procs.append(subprocess.Popen(["slurmd", "-D", "-f", str(c.conf)], env=c.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            r = c.run("sinfo", "-h", "-N", "-o", "%T", check=False)
            state = r.stdout.strip()
            if state.startswith("idle"):
                break
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a SLURM daemon exited:\n" + c.logs())
            time.sleep(0.5)
        else:
            raise RuntimeError(f"the node never became idle (state {state!r}):\n" + c.logs())
        os.environ["SLURM_CONF"] = str(c.conf)  # tessera.cluster.slurm's calls (sbatch, squeue, scontrol) find it
        yield c
    finally:
        os.environ.pop("SLURM_CONF", None)
        subprocess.run(["scancel", "--full", "-u", "root"], env=c.env, capture_output=True)
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        if munge is not None:
            munge.terminate()
            munge.wait(timeout=10)
