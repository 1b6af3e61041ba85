"""The crawl plan of `tessera plan crawl`: time and storage of crawling N rows on K machines.

The crawler's throughput is not assumed: it is read from the JSON result file that
bench/bench_crawl.py writes (bench/results/crawl.json: images/s per core and output bytes per
sample, measured at one or more output image sizes). A machine crawls at the smaller of its CPU
rate (cores x measured images/s per core) and its network rate (bandwidth / mean source image size).
"""

from __future__ import annotations

import json
from pathlib import Path

from tessera.core.errors import InputError
from tessera.dataprep.config import CrawlConfig

DEFAULT_RESULT = Path(__file__).resolve().parents[1] / "bench" / "results" / "crawl.json"


def load_crawl_result(path: str | Path, image_size: int) -> dict:
    """The benchmark run measured at `image_size`, else the one of the nearest size (the caller scales its storage)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        runs = [r for r in data["runs"] if r["images_per_s_per_core"] > 0]
    except FileNotFoundError:
        raise InputError(f"crawl benchmark result '{path}' does not exist (write it with bench/bench_crawl.py)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"crawl benchmark result '{path}' is unreadable or lacks runs ({type(e).__name__})") from None
    if not runs:
        raise InputError(f"crawl benchmark result '{path}' holds no run with a positive throughput")
    return min(runs, key=lambda r: (abs(r["image_size"] - image_size), r["image_size"]))


def plan_crawl(
    crawl: CrawlConfig,
    rows: float,
    nodes: int,
    cores: int,
    bandwidth_gbps: float,
    result_path: str | Path = DEFAULT_RESULT,
    success_rate: float | None = None,
    source_kb: float | None = None,
) -> dict:
    """Projected wall time, throughput and storage of a crawl (a JSON-able dict)."""
    for name, v in (("rows", rows), ("nodes", nodes), ("cores", cores), ("bandwidth-gbps", bandwidth_gbps)):
        if v <= 0:
            raise InputError(f"plan crawl: --{name} must be > 0, got {v}")
    success = 1.0 if success_rate is None else success_rate
    if not 0 < success <= 1:
        raise InputError(f"plan crawl: --success-rate must be in (0, 1], got {success_rate}")
    run = load_crawl_result(result_path, crawl.image_size)
    scale = (crawl.image_size / run["image_size"]) ** 2
    out_bytes = run["output_bytes_per_sample"] * (scale if run["image_size"] != crawl.image_size else 1.0)
    src = source_kb * 1e3 if source_kb is not None else run["source_bytes_per_image"]
    cpu_rate = cores * run["images_per_s_per_core"]
    net_rate = bandwidth_gbps * 1e9 / 8 / src
    node_rate = min(cpu_rate, net_rate)
    total_rate = nodes * node_rate
    seconds = rows / total_rate
    images = rows * success
    assumptions = [
        f"per-core throughput {run['images_per_s_per_core']:g} images/s measured by {run.get('benchmark', 'bench/bench_crawl.py')}"
        f" on {run['machine']} ({run['date']}, load {run.get('load_average_1m', '?')}) at {run['image_size']}px {run['resize']}",
        f"source images {src / 1e3:.0f} KB on average ({'given' if source_kb is not None else 'the benchmark'}'s);"
        " every row costs one download and one decode, failures included (conservative)",
        "CPU rate scales with cores; network rate = bandwidth / source size at the full link rate; a machine runs at the lower one",
    ]
    if run["image_size"] != crawl.image_size:
        assumptions.append(
            f"no run at {crawl.image_size}px in the result file: throughput of the {run['image_size']}px run, output bytes scaled by"
            f" ({crawl.image_size}/{run['image_size']})^2"
        )
    if crawl.output_format != run.get("output_format", "jpg") or crawl.quality != run.get("quality", 95):
        assumptions.append(
            f"the benchmark wrote {run.get('output_format', 'jpg')} q{run.get('quality', 95)}; this config asks for"
            f" {crawl.output_format} q{crawl.quality}: storage differs accordingly"
        )
    return {
        "rows": rows,
        "nodes": nodes,
        "cores": cores,
        "bandwidth_gbps": bandwidth_gbps,
        "image_size": crawl.image_size,
        "resize": crawl.resize,
        "output_format": crawl.output_format,
        "cpu_images_per_s_per_node": cpu_rate,
        "network_images_per_s_per_node": net_rate,
        "bound": "cpu" if cpu_rate <= net_rate else "network",
        "images_per_s": total_rate,
        "seconds": seconds,
        "hours": seconds / 3600,
        "images": images,
        "output_bytes_per_sample": out_bytes,
        "storage_bytes": images * out_bytes,
        "download_bytes": rows * src,
        "shards": int(-(-rows // crawl.shard_size)),
        "benchmark_run": run,
        "assumptions": assumptions,
    }


def format_crawl_plan(p: dict) -> str:
    lines = [
        f"tessera plan crawl: {p['rows']:,.0f} rows on {p['nodes']} machines x {p['cores']} cores, {p['bandwidth_gbps']:g} Gbit/s each;"
        f" {p['image_size']}px {p['resize']} {p['output_format']}",
        f"per machine: CPU {p['cpu_images_per_s_per_node']:,.0f} images/s, network {p['network_images_per_s_per_node']:,.0f} images/s"
        f" -> {p['bound']}-bound",
        f"all machines: {p['images_per_s']:,.0f} images/s; {p['hours']:,.1f} hours ({p['hours'] / 24:,.2f} days)",
        f"storage: {p['images']:,.0f} images x {p['output_bytes_per_sample'] / 1e3:,.1f} KB = {p['storage_bytes'] / 1e9:,.1f} GB"
        f" in {p['shards']:,} shards; downloaded {p['download_bytes'] / 1e12:,.2f} TB",
        "assumptions:",
    ] + [f"  - {a}" for a in p["assumptions"]]
    return "\n".join(lines) + "\n"


__all__ = ["DEFAULT_RESULT", "load_crawl_result", "plan_crawl", "format_crawl_plan"]
