"""`tessera status RUN_DIR`: where a training run stands, read from its run directory.

What the trainers write, and what is read from it (tessera.trainer.rundir for the layout):
- metrics.jsonl: one row per logged step. The last row gives the step reached; the last row with `loss` the
  last loss; the last row with a throughput key (dVAE `images_per_s`, transformer `tokens_per_s`) the
  throughput. The CLIP logs none: its steps/s is derived from the `step` and `time` of its last two loss rows.
- checkpoints/latest.pt (a copy of the newest step_XXXXXXXX.pt; DeepSpeed ZeRO runs: checkpoints/zero/latest
  naming the tag): the checkpoint step, its kind, and the time of the last checkpoint (the file's mtime). It is
  opened memory-mapped, so even a large checkpoint costs only its pickled header.
- whether the run finished, per trainer:
  dVAE: summary.json, written last by train_dvae, and newer than config.toml (a resumed run rewrites that);
  transformer: no summary file; its final checkpoint is written after the loop, so finished = the checkpoint
  step reached transformer.train.steps, or the checkpoint's elapsed_s reached a time budget;
  CLIP: its final checkpoint alone carries a non-empty `metrics` entry (periodic ones hold {}).
  The stop reason is "steps" when the configured steps were reached, else "time_budget".
- slurm_job.json / slurm_starts.jsonl (written by `tessera cluster submit-train` and its job script): the job
  id, its (re)starts, and its state from squeue, then scontrol, then sacct (tessera.cluster.slurm.job_info).

A demo output folder (`tessera demo --output DIR`) holds several runs: each of dvae/, transformer/, clip/ is
reported, with the demo's report.json (written last, so its presence means the demo completed).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from tessera.cluster import slurm
from tessera.core.errors import InputError, TesseraError
from tessera.demo import STAGE_DIRS

KINDS = ("dvae", "transformer", "clip")
DEMO_RUNS = ("dvae", "transformer", "clip")
THROUGHPUT_KEYS = (("tokens_per_s", "tokens/s"), ("images_per_s", "images/s"), ("samples_per_s", "samples/s"), ("steps_per_s", "steps/s"))
# metrics.jsonl keys only one trainer logs (to tell the kind before its first checkpoint)
KIND_KEYS = {"dvae": ("rec_nll", "images_per_s", "kmeans_time_s"), "transformer": ("image_ce", "tokens_per_s"), "clip": ("temperature",)}
RUN_MARKERS = ("config.toml", "metrics.jsonl", "checkpoints", slurm.JOB_RECORD, slurm.JOB_STARTS)
REPORT_KEYS = ("config", "dvae_psnr", "color_acc", "shape_acc", "position_acc", "all_acc", "total_seconds")


def is_run_dir(path: Path) -> bool:
    return any((path / m).exists() for m in RUN_MARKERS)


def is_demo_dir(path: Path) -> bool:
    return (path / "report.json").is_file() or any(is_run_dir(path / r) for r in DEMO_RUNS if (path / r).is_dir())


def read_status(path: str | Path, query_slurm: bool = True) -> dict[str, Any]:
    """The status of a run directory, or of a demo output folder (its runs and report.json)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"run directory '{p}' does not exist")
    if not p.is_dir():
        raise InputError(f"'{p}' is not a run directory (a file)")
    if is_run_dir(p):
        return run_status(p, query_slurm)
    if is_demo_dir(p):
        return demo_status(p, query_slurm)
    raise InputError(
        f"'{p}' is not a run directory (no {', '.join(RUN_MARKERS)}) nor a demo output folder (no report.json, {'/, '.join(DEMO_RUNS)}/)"
    )


def demo_status(path: str | Path, query_slurm: bool = True) -> dict[str, Any]:
    p = Path(path)
    report_path = p / "report.json"
    report = _read_json(report_path) if report_path.is_file() else None
    runs = {r: run_status(p / r, query_slurm) for r in DEMO_RUNS if (p / r).is_dir() and is_run_dir(p / r)}
    return {
        "path": str(p),
        "kind": "demo",
        "finished": report is not None,
        "report": {k: report.get(k) for k in REPORT_KEYS} if isinstance(report, dict) else None,
        "report_time": _mtime(report_path),
        "stages": [s for s in STAGE_DIRS if (p / s).exists()],
        "runs": runs,
    }


def run_status(path: str | Path, query_slurm: bool = True) -> dict[str, Any]:
    """Step, last loss, throughput, last checkpoint, finished, and the SLURM job of one run directory."""
    p = Path(path)
    notes: list[str] = []
    rows = read_metrics(p / "metrics.jsonl")
    ck = _checkpoint(p, notes)
    job = slurm.read_job_record(p)
    kind = ck.get("kind") or _kind_from_metrics(rows) or _kind_from_command(job)
    if kind is None and (p / "summary.json").is_file():
        kind = "dvae"  # the only trainer that writes summary.json
    cfg = _train_config(p, kind)
    out: dict[str, Any] = {"path": str(p), "kind": kind, "target_steps": cfg.get("steps")}
    out.update(_progress(rows, ck))
    out.update(
        {
            "checkpoint": ck.get("path"),
            "checkpoint_step": ck.get("step"),
            "checkpoint_time": ck.get("time"),
        }
    )
    out.update(_finished(p, kind, ck, cfg, notes))
    if out["finished"] and out["step"] is None:
        out["step"] = out["checkpoint_step"]
    out["slurm"] = _slurm_status(job, query_slurm, notes) if job else None
    out["notes"] = notes
    return out


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl; a line cut short (the trainer appending, a crash) is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def _progress(rows: list[dict[str, Any]], ck: dict[str, Any]) -> dict[str, Any]:
    """step (the last logged row, or the checkpoint when newer), last loss, throughput."""
    step = rows[-1]["step"] if rows else None
    if ck.get("step") is not None and (step is None or ck["step"] > step):
        step = ck["step"]
    losses = [r for r in rows if _number(r.get("loss"))]
    out: dict[str, Any] = {
        "step": step,
        "loss": losses[-1]["loss"] if losses else None,
        "loss_step": losses[-1]["step"] if losses else None,
        "last_log_time": rows[-1].get("time") if rows else None,
        "throughput": None,
        "throughput_unit": None,
        "throughput_source": None,
    }
    for r in reversed(rows):
        hit = next(((k, u) for k, u in THROUGHPUT_KEYS if _number(r.get(k))), None)
        if hit:
            out.update(throughput=r[hit[0]], throughput_unit=hit[1], throughput_source=f"logged {hit[0]} at step {r['step']}")
            return out
    if len(losses) >= 2:  # no rate logged (the CLIP): steps per second between the last two loss rows
        a, b = losses[-2], losses[-1]
        ds, dt = b["step"] - a["step"], (b.get("time") or 0) - (a.get("time") or 0)
        if ds > 0 and dt > 0:
            out.update(
                throughput=ds / dt, throughput_unit="steps/s", throughput_source=f"metrics.jsonl times of steps {a['step']}-{b['step']}"
            )
    return out


def _checkpoint(p: Path, notes: list[str]) -> dict[str, Any]:
    """{path, step, time, kind, elapsed_s, final_metrics} of the newest checkpoint ({} when none)."""
    cdir = p / "checkpoints"
    latest = cdir / "latest.pt"
    zero = cdir / "zero" / "latest"
    if zero.is_file():
        return _zero_checkpoint(cdir / "zero", zero.read_text().strip(), notes)
    steps = sorted(cdir.glob("step_*.pt")) if cdir.is_dir() else []
    target = latest if latest.is_file() else (steps[-1] if steps else None)
    if target is None:
        return {}
    out: dict[str, Any] = {"path": str(target), "time": _mtime(target), "step": _step_of_name(steps[-1]) if steps else None}
    ck = _load_mmap(target, notes)
    if isinstance(ck, dict):
        if isinstance(ck.get("step"), int):
            out["step"] = ck["step"]
        out["kind"] = ck.get("kind") if ck.get("kind") in KINDS else None
        out["elapsed_s"] = ck.get("elapsed_s")
        out["final_metrics"] = bool(ck.get("metrics"))
    return out


def _zero_checkpoint(zdir: Path, tag: str, notes: list[str]) -> dict[str, Any]:
    """A DeepSpeed ZeRO checkpoint (transformer): 'latest' names the tag step_XXXXXXXX, a folder of shards whose rank-0
    model-states file holds the trainer's client state (tessera.cluster.engine.DeepSpeedEngine.save_checkpoint)."""
    folder = zdir / tag
    files = [f for f in folder.iterdir() if f.is_file()] if folder.is_dir() else []
    out: dict[str, Any] = {
        "path": str(folder),
        "step": _step_of_name(folder),
        "time": max((_mtime(f) or 0 for f in files), default=None) or _mtime(zdir / "latest"),
        "kind": "transformer",
    }
    states = next(
        (folder / n for n in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt") if (folder / n).is_file()), None
    )
    ck = _load_mmap(states, notes) if states is not None else None
    if isinstance(ck, dict):
        if isinstance(ck.get("step"), int):
            out["step"] = ck["step"]
        out["elapsed_s"] = (ck.get("client") or {}).get("elapsed_s")
    return out


def _load_mmap(path: Path, notes: list[str]) -> Any:
    """torch.load memory-mapped (only the pickled header is read); None with a note when the file is unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated or foreign: the caller falls back on what the file names say
        notes.append(f"checkpoint '{path}' could not be read ({type(e).__name__})")
        return None


def _finished(p: Path, kind: str | None, ck: dict[str, Any], cfg: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """{finished, stop_reason, summary}: exact per trainer (see the module docstring)."""
    steps, budget = cfg.get("steps"), cfg.get("time_budget_s") or 0
    summary_path = p / "summary.json"
    out: dict[str, Any] = {"finished": False, "stop_reason": None, "summary": str(summary_path) if summary_path.is_file() else None}
    if kind == "dvae" and summary_path.is_file():
        summary = _read_json(summary_path)
        config_time = _mtime(p / "config.toml")
        if config_time is not None and config_time > (_mtime(summary_path) or 0):
            notes.append("summary.json is older than config.toml: a resumed run is in progress")
            return out
        done = summary.get("steps") if isinstance(summary, dict) else None
        out["finished"] = True
        out["stop_reason"] = "steps" if steps is None or (isinstance(done, int) and done >= steps) else "time_budget"
        return out
    step = ck.get("step")
    if kind == "transformer" and step is not None:
        if steps is not None and step >= steps:
            out.update(finished=True, stop_reason="steps")
        elif budget > 0 and _number(ck.get("elapsed_s")) and ck["elapsed_s"] >= budget:
            out.update(finished=True, stop_reason="time_budget")
    elif kind == "clip" and ck.get("final_metrics"):
        out.update(finished=True, stop_reason="steps" if steps is None or (step or 0) >= steps else "time_budget")
    return out


def _slurm_status(job: dict[str, Any], query: bool, notes: list[str]) -> dict[str, Any]:
    starts = job.get("starts", [])
    out = {
        "job_id": job["job_id"],
        "cluster": job.get("cluster"),
        "submitted": job.get("submitted"),
        "starts": len(starts),
        "restarts": max((int(s.get("restart", 0)) for s in starts), default=0),
        "last_start": starts[-1].get("time") if starts else None,
        "state": None,
        "state_source": None,
        "reason": None,
    }
    if query:
        try:
            info = slurm.job_info(str(job["job_id"]))
        except TesseraError as e:  # no SLURM client here: the record is still worth showing
            notes.append(str(e))
            info = slurm.JobInfo("UNKNOWN")
        out.update(state=info.state, state_source=info.source, reason=info.reason)
    return out


def _train_config(p: Path, kind: str | None) -> dict[str, Any]:
    """{steps, time_budget_s} of the run's trainer from config.toml (root sections; {} when missing)."""
    path = p / "config.toml"
    if kind is None or not path.is_file():
        return {}
    try:
        with open(path, "rb") as f:
            root = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        raise InputError(f"'{path}' is not a readable TOML config") from None
    sect = root.get(kind, {})
    train = sect.get("train", {}) if kind in ("dvae", "transformer") else sect
    return {k: train.get(k) for k in ("steps", "time_budget_s") if isinstance(train, dict)}


def _kind_from_metrics(rows: list[dict[str, Any]]) -> str | None:
    for r in reversed(rows):
        for kind, keys in KIND_KEYS.items():
            if any(k in r for k in keys):
                return kind
    return None


def _kind_from_command(job: dict[str, Any] | None) -> str | None:
    """`tessera train KIND ...` / `python -m tessera.cli train KIND ...` in the submitted command."""
    cmd = [str(a) for a in (job or {}).get("command", [])]
    for i, a in enumerate(cmd[:-1]):
        if a == "train" and cmd[i + 1] in KINDS:
            return cmd[i + 1]
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise InputError(f"'{path}' is not valid JSON") from None


def _mtime(path: Path) -> float | None:
    try:
        return round(path.stat().st_mtime, 3)
    except OSError:
        return None


def _step_of_name(path: Path) -> int | None:
    digits = path.stem[5:]
    return int(digits) if digits.isdigit() else None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --------------------------------------------------------------------------------------------
# Printing


def _when(t: float | None, now: float) -> str:
    if t is None:
        return "-"
    ago = max(now - t, 0)
    rel = f"{ago:.0f} s" if ago < 120 else f"{ago / 60:.0f} min" if ago < 7200 else f"{ago / 3600:.1f} h"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t))} ({rel} ago)"


def _fmt_num(v: Any) -> str:
    return "-" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)


def _finished_text(s: dict[str, Any]) -> str:
    if s["finished"]:
        why = {"steps": "the configured steps reached", "time_budget": "stopped on its time budget"}.get(s["stop_reason"], "")
        return "yes" + (f" ({why})" if why else "")
    job = s.get("slurm") or {}
    return "no" + (f" (job {job['state']})" if job.get("state") in slurm.TERMINAL_STATES else "")


def _job_text(job: dict[str, Any] | None) -> str:
    if not job:
        return "-"
    state = job["state"] or "not queried"
    src = f" (from {job['state_source']})" if job.get("state_source") else ""
    why = f", reason {job['reason']}" if job.get("reason") else ""
    starts = f"; {job['starts']} start(s), {job['restarts']} requeue(s)" if job["starts"] else "; not started yet"
    return f"{job['job_id']}: {state}{src}{why}{starts}"


def _run_rows(s: dict[str, Any], now: float) -> list[tuple[str, str]]:
    step = _fmt_num(s["step"]) + (f" / {s['target_steps']}" if s.get("target_steps") is not None else "")
    loss = _fmt_num(s["loss"]) + (f" (step {s['loss_step']})" if s["loss"] is not None else "")
    thr = f"{s['throughput']:,.1f} {s['throughput_unit']}" if s["throughput"] is not None else "-"
    ck = f"step {_fmt_num(s['checkpoint_step'])}, {_when(s['checkpoint_time'], now)}" if s["checkpoint"] else "none yet"
    rows = [
        ("run", f"{s['path']} ({s['kind'] or 'kind unknown yet'})"),
        ("step", step),
        ("loss", loss),
        ("throughput", thr),
        ("last checkpoint", ck),
        ("finished", _finished_text(s)),
    ]
    if s.get("slurm"):
        rows.append(("slurm job", _job_text(s["slurm"])))
    rows += [("note", n) for n in s.get("notes", [])]
    return rows


def format_status(s: dict[str, Any], now: float | None = None) -> str:
    """A readable table of `read_status`'s result."""
    now = time.time() if now is None else now
    if s.get("kind") != "demo":
        rows = _run_rows(s, now)
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
    head = f"demo {s['path']}: " + (
        "finished, report.json " + _when(s["report_time"], now) if s["finished"] else "not finished (no report.json)"
    )
    lines = [head]
    if s.get("report"):
        lines.append("  " + "  ".join(f"{k} {v}" for k, v in s["report"].items() if v is not None))
    table = [("run", "step", "loss", "throughput", "last checkpoint", "finished")]
    for name, r in s["runs"].items():
        table.append(
            (
                name,
                _fmt_num(r["step"]) + (f"/{r['target_steps']}" if r.get("target_steps") is not None else ""),
                _fmt_num(r["loss"]),
                f"{r['throughput']:,.1f} {r['throughput_unit']}" if r["throughput"] is not None else "-",
                _when(r["checkpoint_time"], now) if r["checkpoint"] else "none yet",
                _finished_text(r),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines.append("")
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    for name, r in s["runs"].items():
        if r.get("slurm"):
            lines.append(f"{name} slurm job {_job_text(r['slurm'])}")
        lines += [f"{name} note: {n}" for n in r.get("notes", [])]
    return "\n".join(lines)
