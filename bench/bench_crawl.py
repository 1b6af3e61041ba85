"""Crawler throughput: Tessera vs img2dataset on the same local url list, served by nginx on loopback.

    .venv/bin/python bench/bench_crawl.py [--n 4000] [--processes 2] [--threads 32] [--image-size 64] [--skip-i2d] [--json PATH]

1. Generates N noisy 512x384 JPEGs once (cached in .bench-cache/crawl-images/).
2. Starts nginx with a generated config on a free high port, serving that folder from a temp dir.
3. Crawls the same parquet url list into 64px center-crop webdataset shards with img2dataset
   (its own venv, .bench-cache/i2d-venv; created with `pip install img2dataset` when missing)
   and with `tessera prep crawl`, same processes, threads and shard size; each from a cold start
   (process start-up included, as a user sees it).
4. Prints wall time, successes and images/s of both, and the ratio.
5. Writes Tessera's best run to a JSON result file (default bench/results/crawl.json; one entry per
   image size, others kept): images/s, images/s per core, output bytes per sample, the settings.
   `tessera plan crawl` reads it (tessera.cluster.plan_crawl).
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tessera.core.machine import describe

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".bench-cache"
I2D_VENV = CACHE / "i2d-venv"


def make_images(n: int, folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    have = len(list(folder.glob("*.jpg")))
    if have >= n:
        return
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:384, 0:512].astype(np.float32)
    for i in range(have, n):
        c = rng.uniform(0, 255, 3)
        fx, fy = rng.uniform(0.2, 1.0, 2)
        img = np.stack([c[k] * 0.5 + 60 * np.sin(xx * fx / 40 + k) + 60 * np.cos(yy * fy / 30 - k) for k in range(3)], -1)
        img += rng.normal(0, 20, img.shape)
        buf = io.BytesIO()
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        tmp = folder / f".{i:06d}.jpg.tmp"
        tmp.write_bytes(buf.getvalue())
        tmp.replace(folder / f"{i:06d}.jpg")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nginx(root: Path, workdir: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(
        f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    keepalive_timeout 60;
    types {{ image/jpeg jpg; }}
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""
    )
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.1):
                return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"nginx did not start: {proc.stderr.read().decode()[:500]}")


def ensure_i2d() -> Path | None:
    exe = I2D_VENV / "bin" / "img2dataset"
    if exe.exists():
        return exe
    print("installing img2dataset into", I2D_VENV, file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(I2D_VENV)], check=True)
    r = subprocess.run([str(I2D_VENV / "bin" / "pip"), "install", "-q", "img2dataset"])
    return exe if r.returncode == 0 and exe.exists() else None


def run_i2d(exe: Path, url_list: Path, out: Path, processes: int, threads: int, shard: int, size: int = 64) -> dict:
    cmd = [
        str(exe),
        "--url_list",
        str(url_list),
        "--input_format",
        "parquet",
        "--url_col",
        "url",
        "--caption_col",
        "caption",
        "--output_format",
        "webdataset",
        "--output_folder",
        str(out),
        "--processes_count",
        str(processes),
        "--thread_count",
        str(threads),
        "--image_size",
        str(size),
        "--resize_mode",
        "center_crop",
        "--number_sample_per_shard",
        str(shard),
        "--enable_wandb",
        "False",
        "--retries",
        "0",
        "--timeout",
        "10",
    ]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"img2dataset failed: {r.stderr[-2000:]}")
    ok = sum(json.load(open(p))["successes"] for p in glob.glob(str(out / "*_stats.json")))
    return {"wall_s": wall, "successes": ok}


def run_tessera(url_list: Path, out: Path, processes: int, threads: int, shard: int, size: int = 64) -> dict:
    cmd = [
        str(REPO / ".venv" / "bin" / "python"),
        "-m",
        "tessera.cli",
        "prep",
        "crawl",
        "--input",
        str(url_list),
        "--output",
        str(out),
        "--image-size",
        str(size),
        "--resize",
        "center_crop",
        "--processes",
        str(processes),
        "--threads",
        str(threads),
        "--shard-size",
        str(shard),
        "--retries",
        "0",
        "--timeout",
        "10",
        "--no-progress",
    ]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"tessera crawl failed: {r.stderr[-2000:]}")
    ok = sum(json.load(open(p))["successes"] for p in glob.glob(str(out / "*_stats.json")))
    return {"wall_s": wall, "successes": ok, "output_bytes": sum(os.path.getsize(p) for p in glob.glob(str(out / "*.tar")))}


def write_result(path: Path, args: argparse.Namespace, runs: list[dict], source_bytes: float) -> None:
    """Tessera's best run as one entry of the JSON result file (entries of other image sizes are kept)."""
    best = max(runs, key=lambda r: r["successes"] / r["wall_s"])
    cores = min(args.processes, os.cpu_count() or 1)
    entry = {
        "tool": "tessera prep crawl",
        "date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
        "machine": f"{os.cpu_count()} cores of {describe()['cpu']}",
        "load_average_1m": round(os.getloadavg()[0], 2),
        "cores_used": cores,
        "processes": args.processes,
        "threads": args.threads,
        "image_size": args.image_size,
        "resize": "center_crop",
        "output_format": "jpg",
        "quality": 95,
        "shard_size": args.shard_size,
        "source": "noisy 512x384 JPEGs over loopback HTTP (nginx)",
        "source_bytes_per_image": round(source_bytes),
        "images": best["successes"],
        "wall_s": round(best["wall_s"], 3),
        "images_per_s": round(best["successes"] / best["wall_s"], 2),
        "images_per_s_per_core": round(best["successes"] / best["wall_s"] / cores, 2),
        "output_bytes_per_sample": round(best["output_bytes"] / max(best["successes"], 1)),
        "note": "wall time from a cold start (process start-up included); a loaded machine lowers the rate",
    }
    old = json.loads(path.read_text()) if path.exists() else {"runs": []}
    kept = [r for r in old.get("runs", []) if r.get("image_size") != args.image_size]
    data = {"benchmark": "bench/bench_crawl.py", "runs": sorted(kept + [entry], key=lambda r: r["image_size"])}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path} (image_size {args.image_size}: {entry['images_per_s_per_core']} images/s per core)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--skip-i2d", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each tool (alternating); the best is reported too")
    ap.add_argument("--image-size", type=int, default=64, help="output side in pixels (center crop)")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "crawl.json", help="result file of Tessera's best run")
    args = ap.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq

    images = CACHE / "crawl-images"
    make_images(args.n, images)
    work = Path(tempfile.mkdtemp(prefix="bench-crawl-"))
    nginx, port = start_nginx(images, work)
    try:
        names = sorted(p.name for p in images.glob("*.jpg"))[: args.n]
        url_list = work / "urls.parquet"
        pq.write_table(
            pa.table({"url": [f"http://127.0.0.1:{port}/{n}" for n in names], "caption": [f"noisy image {n[:-4]}" for n in names]}),
            url_list,
        )
        sizes = [os.path.getsize(images / n) for n in names]
        print(
            f"{len(names)} JPEGs 512x384, mean {np.mean(sizes) / 1024:.0f} KiB, nginx on 127.0.0.1:{port}; "
            f"{args.processes} processes x {args.threads} threads, {args.image_size}px center crop, shards of {args.shard_size}; {os.cpu_count()} cores"
        )
        exe = None if args.skip_i2d else ensure_i2d()
        results: dict[str, list[dict]] = {"img2dataset": [], "tessera": []}
        for rep in range(args.repeat):
            if exe is not None:
                out = work / f"i2d-{rep}"
                results["img2dataset"].append(run_i2d(exe, url_list, out, args.processes, args.threads, args.shard_size, args.image_size))
                shutil.rmtree(out, ignore_errors=True)
            out = work / f"tessera-{rep}"
            results["tessera"].append(run_tessera(url_list, out, args.processes, args.threads, args.shard_size, args.image_size))
            shutil.rmtree(out, ignore_errors=True)
        summary = {}
        for tool, runs in results.items():
            for i, r in enumerate(runs):
                print(
                    f"{tool:12s} run {i}: {r['wall_s']:6.2f} s wall, {r['successes']} successes, {r['successes'] / r['wall_s']:7.1f} images/s"
                )
            if runs:
                best = max(r["successes"] / r["wall_s"] for r in runs)
                summary[tool] = best
        if len(summary) == 2:
            print(f"ratio tessera/img2dataset (best runs): {summary['tessera'] / summary['img2dataset']:.2f}x")
        if results["tessera"]:
            write_result(args.json, args, results["tessera"], float(np.mean(sizes)))
    finally:
        nginx.terminate()
        nginx.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
