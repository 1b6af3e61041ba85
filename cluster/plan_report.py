"""The text tables of `tessera plan` (the same figures as its --json output)."""

from __future__ import annotations


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f}" if x < 1e12 else f"{x / 1e9:.3g}"


def _n(x: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return [fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


def format_hardware(plan: dict) -> list[str]:
    hw = plan["hardware"]
    tf = " / ".join(f"{p} {v:g}" if v else f"{p} -" for p, v in hw["peak_tflops"].items())
    return [
        f"tessera plan: config '{plan['config']}' on {hw['gpus']} x {hw['gpu']} ({hw['nodes']} nodes of {hw['gpus_per_node']}),"
        f" {hw['memory_gb']:g} GB each ({hw['reserve_gb']:g} GB kept free)",
        f"  peak TFLOPS {tf}; efficiency {hw['efficiency']:g}; NVLink {hw['intra_node_gbps']:g} Gbit/s per GPU,"
        f" network {hw['inter_node_gbps']:g} Gbit/s per node",
    ]


def format_summary(m: dict, hw: dict) -> list[str]:
    f = m["flops_per_token"]
    ps = m["powersgd"]
    w16 = m["weights_16bit_bytes"]
    fit = "fit" if w16 <= hw["memory_gb"] * 1e9 else "do not fit"
    lines = [
        f"== {m['model']} on {m['gpus']} GPUs ({m['gpus'] // m['gpus_per_node']} nodes of {m['gpus_per_node']}):"
        f" {m['params']:,} parameters ({'; '.join(m['notes'])}); largest layer {m['largest_layer_params']:,}",
        f"16-bit weights: {w16 / 1e9:.1f} GB, which {fit} one {hw['memory_gb']:g} GB GPU without sharding",
        f"FLOPs per token: forward {_n(f['forward'])}, training {_n(f['train'])} ({_n(f['train_checkpointed'])} with activation"
        f" checkpointing)",
    ]
    if f["dense_attention_forward"]:
        lines.append(
            f"  attention {_n(f['attention_forward'])} forward FLOPs per token over the unmasked pairs of the layer pattern"
            f" ({_n(f['dense_attention_forward'])} if every layer were dense causal)"
        )
    lines.append(
        f"batch {m['batch']}, {m['steps']:,.0f} steps, {m['tokens']:.3g} tokens ({m['tokens_per_sample']} per sample); precision {m['precision']}"
    )
    if ps["rank"]:
        pr = f"paper formula 1 - 5r/(8 d_model) = {ps['paper_rate']:.1%}; " if ps["paper_rate"] is not None else ""
        lines.append(
            f"PowerSGD rank {ps['rank']}: {pr}this model's compressed share {ps['rate_whole_matrices']:.1%} (16-bit factors, whole"
            f" matrices), {ps['rate_row_sharded']:.1%} if each shard's row slice is compressed alone; DDP fp32 factors"
            f" {ps['rate_ddp_fp32']:.1%}"
        )
    return lines


def format_memory(m: dict) -> list[str]:
    head = [
        "layout",
        "prec",
        "weights",
        "grads",
        "optim",
        "act/sample",
        "act/sample ckpt",
        "comm buf",
        "peak mb=1",
        "ckpt",
        "max mb",
        "ckpt",
    ]
    rows = [
        [
            r["layout"],
            r["precision"],
            _gb(r["weights"]),
            _gb(r["gradients"]),
            _gb(r["optimizer"]),
            _gb(r["activations_per_sample"]),
            _gb(r["activations_per_sample_checkpointed"]),
            _gb(r["comm_buffers"] + r["module_buffers"]),
            _gb(r["peak_mb1"]),
            _gb(r["peak_mb1_checkpointed"]),
            r["largest_micro_batch"],
            r["largest_micro_batch_checkpointed"],
        ]
        for r in m["memory_grid"]
    ]
    return [
        "memory per GPU, GB (comm buf includes module buffers such as attention masks; max mb = largest micro-batch that fits):"
    ] + _table(head, rows)


def format_time(m: dict) -> list[str]:
    head = ["layout", "ckpt", "mb", "accum", "fits", "compute s", "intra GB", "inter GB", "PowerSGD GB", "comm s", "PowerSGD s"]
    head += ["step s", "overlap s", "days"]
    rows = []
    for r in m["candidates"]:
        t = r["time"]
        if not t.get("supported"):
            rows.append([r["layout"], r["checkpoint"], r["micro_batch"], "-", "-", "precision unsupported"] + [""] * 8)
            continue
        v = t["volume"]
        rows.append(
            [
                r["layout"],
                "yes" if r["checkpoint"] else "no",
                r["micro_batch"],
                t["micro_steps"],
                "yes" if r["fits"] else "NO",
                f"{t['compute_s']:.3g}",
                _gb(v["intra_gpu"]),
                _gb(v["inter_node"]),
                _gb(v["inter_node_powersgd"]),
                f"{t['comm_s']:.3g}",
                f"{t['comm_powersgd_s']:.3g}",
                f"{t['step_s']:.3g}",
                f"{t['step_overlap_s']:.3g}",
                f"{r['days']:.1f}",
            ]
        )
    note = (
        f"step time in {m['precision']} (intra GB: per GPU inside its node; inter GB: per node over the network;"
        " PowerSGD applies to ddp and paper layouts; days use the faster of the two with overlap):"
    )
    return [note] + _table(head, rows)


def format_advice(m: dict) -> list[str]:
    a = m["advice"]
    if a is None:
        return ["advice: no layout fits this GPU's memory at micro-batch 1, even with activation checkpointing"]
    rank = m["powersgd"]["rank"]
    uses_psgd = a.get("powersgd", False)
    if rank > 0 and not uses_psgd:
        rank = "none (it would not shorten the step)" if a["layout"] in ("ddp", "paper", "paper16") else "none (not used by this layout)"
    why = [
        f"advice: layout {a['layout']}, precision {a['precision']}, micro-batch {a['micro_batch']}"
        f" ({a['time']['micro_steps']} accumulation steps), activation checkpointing {'on' if a['checkpoint'] else 'off'},"
        f" PowerSGD rank {rank if rank else 'none'}: {a['step_s']:.3g} s per step, {a['days']:.1f} days",
        f"  why: the simplest layout within 2% of the fastest that fits; its peak {_gb(a['memory_bytes']['peak'])} GB"
        f" at micro-batch {a['micro_batch']} (largest that fits: {a['largest_micro_batch']})",
    ]
    faster = [r for r in m["candidates"] if r.get("step_s", 1e30) < a["step_s"] and not r["fits"]]
    for r in faster[:3]:
        why.append(
            f"  faster but does not fit: {r['layout']} (ckpt {'on' if r['checkpoint'] else 'off'}) {r.get('step_s', 0):.3g} s,"
            f" needs {_gb(r['memory_bytes']['peak'])} GB"
        )
    return why


def format_plan(plan: dict) -> str:
    lines = format_hardware(plan)
    for key in ("transformer", "dvae"):
        m = plan[key]
        lines += [""] + format_summary(m, plan["hardware"]) + [""] + format_memory(m) + [""] + format_time(m) + [""] + format_advice(m)
    lines += ["", "assumptions:"] + [f"  - {a}" for a in plan["assumptions"]]
    return "\n".join(lines) + "\n"


__all__ = ["format_plan"]
