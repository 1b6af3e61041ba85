"""The capacity planner of `tessera plan`: memory, FLOPs, communication and time of a training job.

`plan_training(cfg, hw)` sizes the transformer and the dVAE of a root config on a cluster
described by `Hardware` (GPU presets by name, or memory and TFLOPS given), for every layout:

  ddp      torch DDP: every rank holds everything; gradients all-reduced over all ranks
           (the configured PowerSGD rank compresses that all-reduce, as tessera.cluster.powersgd);
  zero1-3  DeepSpeed ZeRO: optimizer state, + gradients, + parameters sharded over all ranks;
  paper    the DALL-E layout (Ramesh et al. 2021, App. D): parameters, gradients and optimizer state
           sharded over the GPUs of a node (each resblock's parameters all-gathered for the forward
           and again for the backward pass, gradients reduce-scattered within the node); across nodes
           the ranks of equal local ordinal all-reduce PowerSGD factors of their shard's matrices
           (embeddings, gains and biases uncompressed, fp32), with fp32 master weights and Adam moments
           and fp32 error feedback (tessera.cluster.powersgd);
  paper16  the same layout with the paper's storage (its section 2.4: "most parameters, Adam moments,
           and activations are stored in 16-bit precision"): no fp32 master, 16-bit moments, and
           16-bit PowerSGD error buffers (App. D) that hold the gradient of the compressed matrices in
           place (M = gradient + error), with P and Q formed one resblock at a time.

and every precision: fp32; bf16 (autocast with fp32 weights under DDP, 16-bit weights with fp32 master
and moments under ZeRO and the paper layout); fp16 (as bf16, with one gradient scale per resblock).

Bytes per parameter (the same accounting as DeepSpeed's estimators, `estimate_zero2/3_model_states_mem_needs`):
mixed precision keeps 16-bit weights (2) and gradients (2), an fp32 master copy (4), Adam's two moments
(8), and under ZeRO an fp32 gradient partition (4): ZeRO-2 = 2 + 18 / N, ZeRO-3 = 18 / N + 4 x the
largest layer. Every assumption the figures rest on is listed in the plan's "assumptions".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from tessera.cluster.plan_model import ModelShape, dvae_shape, transformer_shape
from tessera.core.errors import ConfigError
from tessera.core.root_config import TesseraConfig

GiB = 2**30
LAYOUTS = ("ddp", "zero1", "zero2", "zero3", "paper", "paper16")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class GPUSpec:
    memory_gb: float  # GB = 1e9 bytes, as vendors quote
    tflops: dict  # dense peak by precision (fp32 without TF32); None where the GPU lacks the format
    intra_gbps: float  # per-GPU bandwidth to the other GPUs of its node, Gbit/s each way
    inter_gbps: float  # network bandwidth out of one node, all NICs together, Gbit/s


GPUS = {
    # V100 SXM2 in an 8-GPU NVLink node (the paper's); 100 Gbit/s InfiniBand per node (EDR, that era's nodes)
    "V100-16GB": GPUSpec(16, {"fp32": 15.7, "fp16": 125.0, "bf16": None}, 1200, 100),
    "A100-80GB": GPUSpec(80, {"fp32": 19.5, "fp16": 312.0, "bf16": 312.0}, 2400, 1600),
    "H100-80GB": GPUSpec(80, {"fp32": 67.0, "fp16": 989.0, "bf16": 989.0}, 3600, 3200),
    "H200": GPUSpec(141, {"fp32": 67.0, "fp16": 989.0, "bf16": 989.0}, 3600, 3200),
}


@dataclass(frozen=True)
class Hardware:
    gpus: int
    gpus_per_node: int
    name: str = "custom"
    memory_gb: float = 16.0
    tflops: dict | None = None  # by precision; `tflops_override` replaces every entry
    tflops_override: float | None = None
    intra_gbps: float = 1200.0
    inter_gbps: float = 100.0
    efficiency: float = 0.5  # achieved fraction of peak FLOPS in the model's matmuls
    reserve_gb: float = 1.0  # CUDA context, allocator slack and workspace kept free on every GPU

    @property
    def nodes(self) -> int:
        return self.gpus // self.gpus_per_node

    def peak_tflops(self, precision: str) -> float | None:
        if self.tflops_override is not None:
            return self.tflops_override
        return (self.tflops or {}).get(precision)

    def validate(self) -> None:
        if self.gpus < 1 or self.gpus_per_node < 1:
            raise ConfigError(f"plan: --gpus and --gpus-per-node must be >= 1, got {self.gpus} and {self.gpus_per_node}")
        if self.gpus % self.gpus_per_node:
            raise ConfigError(f"plan: --gpus {self.gpus} is not a multiple of --gpus-per-node {self.gpus_per_node}")
        for key in ("memory_gb", "intra_gbps", "inter_gbps", "efficiency"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"plan: {key.replace('_', '-')} must be > 0, got {getattr(self, key)}")


def hardware(gpus: int, gpus_per_node: int, gpu: str | None = None, **given) -> Hardware:
    """A Hardware from a preset name (its figures filled in), with any figure given explicitly taking precedence."""
    given = {k: v for k, v in given.items() if v is not None}
    if gpu is None:
        if "memory_gb" not in given or "tflops_override" not in given:
            raise ConfigError(f"plan: give --gpu NAME ({', '.join(GPUS)}) or both --gpu-memory and --gpu-tflops")
        hw = Hardware(gpus, gpus_per_node, **given)
    else:
        key = next((k for k in GPUS if k.lower() == gpu.lower()), None)
        if key is None:
            raise ConfigError(f"plan: unknown --gpu {gpu!r}; choose one of {', '.join(GPUS)} or give --gpu-memory and --gpu-tflops")
        spec = GPUS[key]
        base = dict(name=key, memory_gb=spec.memory_gb, tflops=dict(spec.tflops), intra_gbps=spec.intra_gbps, inter_gbps=spec.inter_gbps)
        hw = Hardware(gpus, gpus_per_node, **{**base, **given})
    hw.validate()
    return hw


# ------------------------------------------------------------------------------------------------
# Memory


def _state_bytes_per_param(layout: str, precision: str) -> dict[str, float]:
    """Bytes per parameter of weights, gradients, fp32 master, Adam moments and fp32 gradient partition, before sharding."""
    if precision == "fp32":
        return {"weights": 4, "gradients": 4, "master": 0, "moments": 8, "grad_fp32": 0, "cast_cache": 0}
    if layout == "ddp":  # torch autocast: fp32 weights, gradients and moments; 16-bit copies of the weights while they are used
        return {"weights": 4, "gradients": 4, "master": 0, "moments": 8, "grad_fp32": 0, "cast_cache": 2}
    if layout == "paper16":
        return {"weights": 2, "gradients": 2, "master": 0, "moments": 4, "grad_fp32": 0, "cast_cache": 0}
    grad32 = 4 if layout.startswith("zero") else 0
    if layout == "zero3":  # gradients reduce-scattered straight into the fp32 partition (18 bytes / N, as DeepSpeed counts)
        return {"weights": 2, "gradients": 0, "master": 4, "moments": 8, "grad_fp32": 4, "cast_cache": 0}
    return {"weights": 2, "gradients": 2, "master": 4, "moments": 8, "grad_fp32": grad32, "cast_cache": 0}


def _shards(layout: str, hw: Hardware) -> dict[str, int]:
    """Over how many ranks each state is sharded."""
    n, g = hw.gpus, hw.gpus_per_node
    one = {"weights": 1, "gradients": 1, "master": 1, "moments": 1, "grad_fp32": 1, "cast_cache": 1}
    if layout == "zero1":
        return {**one, "master": n, "moments": n, "grad_fp32": n}
    if layout == "zero2":
        return {**one, "gradients": n, "master": n, "moments": n, "grad_fp32": n}
    if layout == "zero3":
        return {k: n for k in one}
    if layout.startswith("paper"):
        return {k: g for k in one}
    return one


def _folded(shape: ModelShape, layout: str, precision: str, rank: int) -> int:
    """Parameters whose gradient lives in the PowerSGD error buffer (paper16 only)."""
    if layout != "paper16" or precision == "fp32" or rank <= 0:
        return 0
    return sum(m * n * c for m, n, c in compressible(shape, rank))


def model_state_bytes(shape: ModelShape, layout: str, precision: str, hw: Hardware, rank: int = 0) -> dict[str, float]:
    """Per-GPU bytes of weights, gradients and optimizer state (master + moments + fp32 gradient partition)."""
    b = _state_bytes_per_param(layout, precision)
    s = _shards(layout, hw)
    p = shape.params
    part = {k: p * b[k] / s[k] for k in b}
    part["gradients"] -= _folded(shape, layout, precision, rank) * b["gradients"] / s["gradients"]
    return {
        "weights": part["weights"] + part["cast_cache"],
        "gradients": part["gradients"] + part["grad_fp32"],
        "optimizer": part["master"] + part["moments"],
    }


def model_states_total(shape: ModelShape, layout: str, precision: str, hw: Hardware) -> float:
    """Per-GPU model-state bytes as DeepSpeed's estimators count them (ZeRO-3: + 4 bytes x the largest layer, gathered)."""
    out = sum(model_state_bytes(shape, layout, precision, hw).values())
    return out + (4 * shape.largest_layer if layout == "zero3" else 0)


def comm_buffer_bytes(shape: ModelShape, layout: str, precision: str, hw: Hardware, rank: int, bucket_mb: float) -> float:
    """Per-GPU bytes of communication buffers (gradient buckets, gathered parameters, PowerSGD state)."""
    b = _state_bytes_per_param(layout, precision)
    if layout == "ddp":
        out = shape.params * b["gradients"]  # DDP's buckets hold a copy of every gradient
    elif layout in ("zero1", "zero2"):
        out = 2 * bucket_mb * 2**20  # reduce and all-gather buckets
    elif layout == "zero3":
        out = 4 * shape.largest_layer + 2 * bucket_mb * 2**20  # DeepSpeed's estimator: 4 bytes x the largest layer
    else:
        out = 2 * 2 * shape.block_params  # the gathered 16-bit resblock in use and the next one, prefetched
    if rank > 0 and layout in ("ddp", "paper", "paper16"):
        share = hw.gpus_per_node if layout.startswith("paper") else 1
        width = 2 if layout == "paper16" and precision != "fp32" else 4
        comp = compressible(shape, rank)
        out += width * sum(m * n * c for m, n, c in comp) / share  # error feedback of the compressed matrices
        factors = sum((m + n) * min(rank, m, n) * c for m, n, c in comp)
        out += width * (factors / shape.n_blocks if layout == "paper16" else factors) / share  # P and Q
    return out


def activation_bytes(shape: ModelShape, precision: str, micro_batch: int, checkpoint: bool) -> float:
    width = 4 if precision == "fp32" else 2
    elems, fp32 = (shape.ckpt_act_elems, shape.ckpt_act_fp32_elems) if checkpoint else (shape.act_elems, shape.act_fp32_elems)
    return micro_batch * (elems * width + fp32 * 4)


def memory(shape, layout, precision, hw, micro_batch, checkpoint, rank=0, bucket_mb=25.0) -> dict[str, float]:
    """Per-GPU bytes by item, and their total ("peak": every item held at once, an upper bound)."""
    out = dict(model_state_bytes(shape, layout, precision, hw, rank))
    out["activations"] = activation_bytes(shape, precision, micro_batch, checkpoint)
    out["comm_buffers"] = comm_buffer_bytes(shape, layout, precision, hw, rank, bucket_mb)
    out["module_buffers"] = float(shape.buffer_bytes)
    out["peak"] = sum(out.values())
    return out


def largest_micro_batch(shape, layout, precision, hw, checkpoint, rank=0, bucket_mb=25.0) -> int:
    """The largest per-GPU micro-batch whose peak fits the GPU's memory less the reserve (0: none fits)."""
    fixed = memory(shape, layout, precision, hw, 0, checkpoint, rank, bucket_mb)["peak"]
    per = activation_bytes(shape, precision, 1, checkpoint)
    free = (hw.memory_gb - hw.reserve_gb) * 1e9 - fixed
    return max(0, int(free // per)) if per > 0 else 0


# ------------------------------------------------------------------------------------------------
# Communication


def compressible(shape: ModelShape, rank: int, min_rate: float = 2.0) -> list[tuple[int, int, int]]:
    """Matrices PowerSGD compresses at `rank` (m n / ((m + n) r) >= min_rate, as tessera.cluster.powersgd)."""
    return [(m, n, c) for m, n, c in shape.matrices if rank > 0 and m * n / ((m + n) * rank) >= min_rate]


def powersgd_rate(shape: ModelShape, rank: int, factor_bytes: int, grad_bytes: int, row_shards: int = 1) -> float:
    """1 - (bytes sent with PowerSGD) / (bytes of the uncompressed gradient), over the whole model.

    Compressed matrices send r (m + n) factor entries instead of m n; the rest goes uncompressed at fp32.
    With `row_shards` > 1 each matrix is first split into that many row slices, each compressed alone.
    """
    if rank <= 0:
        return 0.0
    comp = compressible(shape, rank)
    sent = 0.0
    for m, n, c in comp:
        rows = max(1, m // row_shards)
        sent += c * row_shards * (rows + n) * min(rank, rows, n) * factor_bytes
    rest = shape.params - sum(m * n * c for m, n, c in comp)
    sent += rest * 4
    return 1.0 - sent / (shape.matrix_params * grad_bytes + (shape.params - shape.matrix_params) * 4)


def matrix_rate(m: int, n: int, rank: int, factor_bytes: int = 2, grad_bytes: int = 4) -> float:
    """Compression of one m x n gradient matrix: 1 - r (m + n) factor bytes / (m n gradient bytes)."""
    return 1.0 - rank * (m + n) * factor_bytes / (m * n * grad_bytes)


def paper_rate(rank: int, d_model: int) -> float:
    """The paper's compression rate 1 - 5 r / (8 d): a d x 4d matrix, 16-bit factors against fp32 gradients."""
    return 1.0 - 5.0 * rank / (8.0 * d_model)


def advised_rank(d_model: int) -> int:
    """PowerSGD rank for about 85% compression (the paper's finding, independent of size): the multiple of 128 nearest 0.24 d."""
    step = 128 if d_model >= 1024 else 8
    return max(step, int(round(0.24 * d_model / step)) * step)


def _ring(n: int, nbytes: float, factor: float = 2.0) -> float:
    """Bytes each member sends in a ring collective over n members (all-reduce: factor 2; gather or scatter: 1)."""
    return factor * (n - 1) / n * nbytes if n > 1 else 0.0


def comm_bytes(shape, layout, precision, hw, rank, micro_steps) -> dict[str, float]:
    """Per step: bytes each GPU moves inside its node, and bytes each node moves across the network, uncompressed and compressed."""
    half = precision != "fp32"
    w16 = shape.params * (2 if half else 4)
    g = shape.params * (4 if layout == "ddp" or not half else 2)
    n, gpn, nodes = hw.gpus, hw.gpus_per_node, hw.nodes
    out = {"intra_gpu": 0.0, "inter_node": 0.0, "inter_node_powersgd": 0.0}
    if layout == "ddp":
        flat = _ring(n, g)
        out["intra_gpu"] = flat if gpn > 1 else 0.0
        out["inter_node"] = flat if nodes > 1 else 0.0
        rate = powersgd_rate(shape, rank, 4, 4)
        out["inter_node_powersgd"] = out["inter_node"] * (1 - rate)
        out["intra_gpu_powersgd"] = out["intra_gpu"] * (1 - rate)
    elif layout.startswith("zero"):
        vol = _ring(n, g, 1) + _ring(n, w16, 1)  # reduce-scatter gradients, all-gather updated weights
        if layout == "zero3":
            vol = _ring(n, g, 1) + 2 * micro_steps * _ring(n, w16, 1)  # weights gathered for every forward and backward
        out["intra_gpu"] = vol if gpn > 1 else 0.0
        out["inter_node"] = vol if nodes > 1 else 0.0
        out["inter_node_powersgd"] = out["inter_node"]  # no gradient hook under DeepSpeed
    else:
        out["intra_gpu"] = 2 * micro_steps * _ring(gpn, w16, 1) + micro_steps * _ring(gpn, g, 1)
        shard = shape.params * 4 / gpn  # fp32 gradient shard of each local ordinal
        out["inter_node"] = gpn * _ring(nodes, shard)
        rate = powersgd_rate(shape, rank, 2, 4)
        out["inter_node_powersgd"] = out["inter_node"] * (1 - rate)
    out.setdefault("intra_gpu_powersgd", out["intra_gpu"])
    return out


# ------------------------------------------------------------------------------------------------
# Time


def step_time(shape, layout, precision, hw, batch, micro_batch, checkpoint, rank) -> dict[str, float]:
    """Seconds of one optimizer step of `batch` samples: compute, communication, with and without overlap."""
    peak = hw.peak_tflops(precision)
    if peak is None:
        return {"supported": False}
    per_gpu = batch / hw.gpus
    micro_steps = max(1, math.ceil(per_gpu / max(micro_batch, 1)))
    flops = per_gpu * (3 * shape.flops_fwd + (shape.recompute_flops_fwd if checkpoint else 0.0))
    psgd_flops = 0.0
    if rank > 0 and layout in ("ddp", "paper", "paper16"):
        share = hw.gpus_per_node if layout.startswith("paper") else 1
        psgd_flops = sum(c * 4.0 * m * n * min(rank, m, n) for m, n, c in compressible(shape, rank)) / share
    rate = peak * 1e12 * hw.efficiency
    compute = (flops + psgd_flops) / rate
    vol = comm_bytes(shape, layout, precision, hw, rank, micro_steps)
    intra_bps, inter_bps = hw.intra_gbps * 1e9 / 8, hw.inter_gbps * 1e9 / 8
    out = {"supported": True, "micro_steps": micro_steps, "compute_s": compute, "powersgd_compute_s": psgd_flops / rate, "volume": vol}
    for tag, inter_key, intra_key in (("", "inter_node", "intra_gpu"), ("_powersgd", "inter_node_powersgd", "intra_gpu_powersgd")):
        a, b = vol[intra_key] / intra_bps, vol[inter_key] / inter_bps
        comm = a + b if layout.startswith("paper") else max(a, b)  # paper: intra then inter phases; flat rings: the slowest link
        c = compute if tag else compute - psgd_flops / rate
        out["comm" + tag + "_s"] = comm
        out["step" + tag + "_s"] = c + comm
        out["step_overlap" + tag + "_s"] = max(c, comm)
    return out


# ------------------------------------------------------------------------------------------------
# The plan


def _precision_of(cfg: TesseraConfig, model: str, hw: Hardware, given: str | None = None) -> str:
    """`given`, else the precision the config asks for on a GPU (auto / fast: bf16, or fp16 where the GPU has no bf16)."""
    if given is not None:
        if given not in PRECISIONS:
            raise ConfigError(f"plan: --precision must be one of {', '.join(PRECISIONS)}, got {given!r}")
        return given
    want = cfg.transformer.train.precision if model == "transformer" else cfg.dvae.train.precision
    if want in ("auto", "fast"):
        want = "bf16"
    if hw.peak_tflops(want) is None and want == "bf16":
        return "fp16"
    return want


def evaluate(shape, layout, precision, hw, batch, micro_batch, checkpoint, rank, bucket_mb, steps) -> dict:
    """One candidate: memory at `micro_batch`, the largest micro-batch, step time and days for `steps` updates."""
    mem = memory(shape, layout, precision, hw, micro_batch, checkpoint, rank, bucket_mb)
    t = step_time(shape, layout, precision, hw, batch, micro_batch, checkpoint, rank)
    row = {
        "layout": layout,
        "precision": precision,
        "checkpoint": checkpoint,
        "micro_batch": micro_batch,
        "memory_bytes": mem,
        "fits": mem["peak"] <= (hw.memory_gb - hw.reserve_gb) * 1e9,
        "largest_micro_batch": largest_micro_batch(shape, layout, precision, hw, checkpoint, rank, bucket_mb),
        "time": t,
    }
    if t.get("supported"):
        psgd = rank > 0 and layout in ("ddp", "paper", "paper16") and t["step_overlap_powersgd_s"] < t["step_overlap_s"]
        best = t["step_overlap_powersgd_s"] if psgd else t["step_overlap_s"]
        row["powersgd"] = psgd  # compression pays off only where it shortens the step
        row["step_s"] = best
        row["days"] = best * steps / 86400
    return row


def _candidates(shape, hw, precision, batch, rank, bucket_mb, steps, layouts) -> list[dict]:
    per_gpu = max(1, batch // hw.gpus)
    rows = []
    for layout in layouts:
        for ckpt in (False, True):
            fit = largest_micro_batch(shape, layout, precision, hw, ckpt, rank, bucket_mb)
            accum = math.ceil(per_gpu / max(1, fit))
            mb = max(1, math.ceil(per_gpu / accum))  # equal micro-batches: 128 per GPU in 4 of 32, not 35 + 35 + 35 + 23
            rows.append(evaluate(shape, layout, precision, hw, batch, mb, ckpt, rank, bucket_mb, steps))
    return rows


def advise(rows: list[dict], tolerance: float = 0.02) -> dict | None:
    """The simplest candidate that fits and is within `tolerance` of the fastest that fits, or None.

    Simplest: the first in LAYOUTS order (less sharding, fewer moving parts), checkpointing off before on.
    Step times are with overlap, and with PowerSGD where the layout has it and it shortens the step.
    """
    ok = [r for r in rows if r["fits"] and r["time"].get("supported")]
    if not ok:
        return None
    fastest = min(r["step_s"] for r in ok)
    close = [r for r in ok if r["step_s"] <= fastest * (1 + tolerance)]
    return min(close, key=lambda r: (LAYOUTS.index(r["layout"]), r["checkpoint"]))


def _grid_row(shape, layout, precision, hw, rank, bucket_mb) -> dict:
    """Memory of one layout and precision at micro-batch 1, without and with activation checkpointing."""
    m = memory(shape, layout, precision, hw, 1, False, rank, bucket_mb)
    mc = memory(shape, layout, precision, hw, 1, True, rank, bucket_mb)
    return {
        "layout": layout,
        "precision": precision,
        "weights": m["weights"],
        "gradients": m["gradients"],
        "optimizer": m["optimizer"],
        "activations_per_sample": m["activations"],
        "activations_per_sample_checkpointed": mc["activations"],
        "comm_buffers": m["comm_buffers"],
        "module_buffers": m["module_buffers"],
        "peak_mb1": m["peak"],
        "peak_mb1_checkpointed": mc["peak"],
        "largest_micro_batch": largest_micro_batch(shape, layout, precision, hw, False, rank, bucket_mb),
        "largest_micro_batch_checkpointed": largest_micro_batch(shape, layout, precision, hw, True, rank, bucket_mb),
    }


def plan_model(
    cfg: TesseraConfig, hw: Hardware, model: str, tokens: float | None = None, rank: int | None = None, precision: str | None = None
) -> dict:
    """The plan of one model ("transformer" or "dvae") of `cfg` on `hw` (a JSON-able dict)."""
    if model == "transformer":
        shape, train, d = transformer_shape(cfg.transformer.model), cfg.transformer.train, cfg.transformer.model.d_model
    else:
        shape, train, d = dvae_shape(cfg.dvae.model), cfg.dvae.train, 0
    batch = train.batch_size
    steps = train.steps if tokens is None or model != "transformer" else tokens / (batch * shape.tokens_per_sample)
    if rank is None:
        rank = cfg.cluster.powersgd_rank or (advised_rank(d) if model == "transformer" else 0)
    precision = _precision_of(cfg, model, hw, precision)
    rows = _candidates(shape, hw, precision, batch, rank, cfg.cluster.bucket_mb, steps, LAYOUTS)
    grid = [_grid_row(shape, lay, p, hw, rank, cfg.cluster.bucket_mb) for lay in LAYOUTS for p in PRECISIONS]
    return {
        "model": model,
        "gpus": hw.gpus,
        "gpus_per_node": hw.gpus_per_node,
        "params": shape.params,
        "largest_layer_params": shape.largest_layer,
        "notes": list(shape.notes),
        "batch": batch,
        "steps": steps,
        "tokens": steps * batch * shape.tokens_per_sample,
        "tokens_per_sample": shape.tokens_per_sample,
        "precision": precision,
        "flops_per_token": {
            "forward": shape.flops_fwd / shape.tokens_per_sample,
            "train": 3 * shape.flops_fwd / shape.tokens_per_sample,
            "train_checkpointed": (3 * shape.flops_fwd + shape.recompute_flops_fwd) / shape.tokens_per_sample,
            "attention_forward": shape.attention_flops_fwd / shape.tokens_per_sample,
            "dense_attention_forward": shape.dense_attention_flops_fwd / shape.tokens_per_sample,
        },
        "weights_16bit_bytes": 2 * shape.params,
        "powersgd": {
            "rank": rank,
            "paper_rate": paper_rate(rank, d) if d and rank else None,
            "rate_whole_matrices": powersgd_rate(shape, rank, 2, 4),
            "rate_row_sharded": powersgd_rate(shape, rank, 2, 4, row_shards=hw.gpus_per_node),
            "rate_ddp_fp32": powersgd_rate(shape, rank, 4, 4),
        },
        "memory_grid": grid,
        "candidates": rows,
        "advice": advise(rows),
    }


def dvae_hardware(hw: Hardware, batch: int, gpus: int | None = None) -> Hardware:
    """The GPUs the dVAE runs on: `gpus`, else as many whole nodes as give every GPU at least one image of the batch."""
    if gpus is None:
        gpus = min(hw.gpus, batch)
        if gpus >= hw.gpus_per_node:
            gpus = gpus // hw.gpus_per_node * hw.gpus_per_node
    out = replace(hw, gpus=gpus, gpus_per_node=min(hw.gpus_per_node, gpus))
    out.validate()
    return out


def plan_training(
    cfg: TesseraConfig,
    hw: Hardware,
    tokens: float | None = None,
    rank: int | None = None,
    dvae_gpus: int | None = None,
    precision: str | None = None,
) -> dict:
    """The whole training plan: the hardware, the assumptions, and one plan per model (the dVAE on `dvae_hardware`)."""
    dhw = dvae_hardware(hw, cfg.dvae.train.batch_size, dvae_gpus)
    return {
        "hardware": {
            "gpus": hw.gpus,
            "gpus_per_node": hw.gpus_per_node,
            "nodes": hw.nodes,
            "gpu": hw.name,
            "memory_gb": hw.memory_gb,
            "peak_tflops": {p: hw.peak_tflops(p) for p in PRECISIONS},
            "efficiency": hw.efficiency,
            "intra_node_gbps": hw.intra_gbps,
            "inter_node_gbps": hw.inter_gbps,
            "reserve_gb": hw.reserve_gb,
        },
        "config": cfg.name,
        "assumptions": ASSUMPTIONS,
        "transformer": plan_model(cfg, hw, "transformer", tokens, rank, precision),
        "dvae": plan_model(cfg, dhw, "dvae", precision=precision),
    }


ASSUMPTIONS = [
    "peak memory = every item held at once (weights, gradients, optimizer state, saved activations, buffers): an upper bound",
    "a GPU keeps reserve_gb free for the CUDA context and allocator slack; GB = 1e9 bytes",
    "compute time = training FLOPs / (peak TFLOPS x efficiency); FLOPs = 3 x forward (4 x with activation checkpointing);"
    " the efficiency is the same at every micro-batch (small micro-batches reach less in practice)",
    "attention FLOPs count only the query-key pairs each layer's mask allows (block-sparse kernels skip empty 64x64 tiles)",
    "flat collectives (DDP, ZeRO) run as rings limited by the slower of the NVLink and the network link;"
    " the paper layout runs its within-node and across-node phases one after the other",
    "inter-node bandwidth is per node (all NICs together), intra-node per GPU, both Gbit/s at their full rate",
    "overlap = communication hidden behind compute (step = the larger of the two); no overlap = their sum",
    "PowerSGD: matrices with m n / ((m + n) r) >= 2 compressed, the rest (embeddings excepted) and all 1-D tensors uncompressed fp32;"
    " paper layout: 16-bit factors against fp32 gradients, each local ordinal compressing whole matrices;"
    " DDP: fp32 factors (tessera.cluster.powersgd); error feedback kept in fp32",
    "mixed precision: 16-bit weights and gradients, fp32 master and Adam moments (+ an fp32 gradient partition under ZeRO,"
    " as DeepSpeed); DDP with bf16/fp16 is torch autocast (fp32 weights, gradients and moments, 16-bit weight copies)",
    "fp16 in the paper layout uses one gradient scale per resblock (a few bytes; no extra memory)",
    "the advice is the simplest layout (ddp, zero1, zero2, zero3, paper, paper16 in that order; checkpointing off first)"
    " within 2% of the fastest candidate that fits; micro-batches are equal (the per-GPU batch split into accumulation steps)",
]


__all__ = [
    "GPUS",
    "GPUSpec",
    "Hardware",
    "LAYOUTS",
    "PRECISIONS",
    "hardware",
    "memory",
    "model_state_bytes",
    "model_states_total",
    "comm_buffer_bytes",
    "activation_bytes",
    "largest_micro_batch",
    "powersgd_rate",
    "paper_rate",
    "matrix_rate",
    "advised_rank",
    "comm_bytes",
    "step_time",
    "transformer_shape",
    "dvae_shape",
    "evaluate",
    "advise",
    "plan_model",
    "plan_training",
    "dvae_hardware",
    "ASSUMPTIONS",
]
