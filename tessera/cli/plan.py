"""`tessera plan` (a training job's memory, FLOPs, communication and time) and `tessera plan crawl`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tessera.cluster.plan import GPUS, hardware, plan_training
from tessera.cluster.plan_crawl import DEFAULT_RESULT, format_crawl_plan, plan_crawl
from tessera.cluster.plan_report import format_plan
from tessera.core.errors import InputError
from tessera.core.root_config import load_root


def add_plan(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="dalle-12b", help="a preset name from configs/ or a TOML file (default: dalle-12b)")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in all")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--gpu", help=f"GPU preset: {', '.join(GPUS)} (sets memory, TFLOPS and bandwidths)")
    parser.add_argument("--gpu-memory", type=float, help="GB per GPU (overrides the preset)")
    parser.add_argument("--gpu-tflops", type=float, help="peak dense TFLOPS in the training precision (overrides the preset)")
    parser.add_argument("--intra-node-gbps", type=float, help="Gbit/s from a GPU to the rest of its node (NVLink), each way")
    parser.add_argument("--inter-node-gbps", type=float, help="Gbit/s out of one node over the network, all NICs together")
    parser.add_argument("--efficiency", type=float, help="achieved fraction of peak FLOPS (default 0.5)")
    parser.add_argument("--reserve-gb", type=float, help="GB kept free on every GPU (default 1)")
    parser.add_argument("--tokens", type=float, help="transformer tokens to train (default: steps x batch x sequence length)")
    parser.add_argument("--powersgd-rank", type=int, help="PowerSGD rank (default: cluster.powersgd_rank, else the advised rank)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="training precision (default: the config's)")
    parser.add_argument("--dvae-gpus", type=int, help="GPUs of the dVAE job (default: whole nodes, at least one image each)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. transformer.model.n_layers=32")


def run_plan(args: argparse.Namespace) -> int:
    cfg = load_root(args.config, args.overrides)
    if args.tokens is not None and args.tokens <= 0:
        raise InputError(f"plan: --tokens must be > 0, got {args.tokens}")
    if args.powersgd_rank is not None and args.powersgd_rank < 0:
        raise InputError(f"plan: --powersgd-rank must be >= 0, got {args.powersgd_rank}")
    hw = hardware(
        args.gpus,
        args.gpus_per_node,
        args.gpu,
        memory_gb=args.gpu_memory,
        tflops_override=args.gpu_tflops,
        intra_gbps=args.intra_node_gbps,
        inter_gbps=args.inter_node_gbps,
        efficiency=args.efficiency,
        reserve_gb=args.reserve_gb,
    )
    plan = plan_training(cfg, hw, tokens=args.tokens, rank=args.powersgd_rank, dvae_gpus=args.dvae_gpus, precision=args.precision)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan), end="\n" if args.json else "")
    return 0


def add_plan_crawl(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=float, required=True, help="(url, caption) rows to crawl")
    parser.add_argument("--nodes", type=int, required=True, help="crawl machines")
    parser.add_argument("--cores", type=int, required=True, help="CPU cores per machine given to the crawl")
    parser.add_argument("--bandwidth-gbps", type=float, required=True, help="download bandwidth per machine, Gbit/s")
    parser.add_argument("--config", default=None, help="a preset or TOML file whose [crawl] image settings apply (default: defaults)")
    parser.add_argument("--success-rate", type=float, default=None, help="fraction of rows that yield an image (default 1.0)")
    parser.add_argument("--source-kb", type=float, default=None, help="mean downloaded image size, KB (default: the benchmark's)")
    parser.add_argument("--result", type=Path, default=DEFAULT_RESULT, help="the crawl benchmark's JSON result file")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. crawl.image_size=256")


def run_plan_crawl(args: argparse.Namespace) -> int:
    cfg = load_root(args.config, args.overrides)
    plan = plan_crawl(
        cfg.crawl,
        rows=args.rows,
        nodes=args.nodes,
        cores=args.cores,
        bandwidth_gbps=args.bandwidth_gbps,
        result_path=args.result,
        success_rate=args.success_rate,
        source_kb=args.source_kb,
    )
    print(json.dumps(plan, indent=2) if args.json else format_crawl_plan(plan), end="\n" if args.json else "")
    return 0


__all__ = ["add_plan", "run_plan", "add_plan_crawl", "run_plan_crawl"]
