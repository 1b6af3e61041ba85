"""The capacity planner (tessera.cluster.plan*, `tessera plan`, `tessera plan crawl`) against what can be counted or measured."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from tessera.cli.plan import add_plan, add_plan_crawl, run_plan, run_plan_crawl
from tessera.cluster import plan as P
from tessera.cluster.plan_crawl import DEFAULT_RESULT, plan_crawl
from tessera.cluster.plan_model import attention_pairs, dvae_shape, transformer_shape
from tessera.core.errors import TesseraError
from tessera.core.root_config import load_root
from tessera.dataprep.config import CrawlConfig
from tessera.kernels import layouts
from tessera.trainer.config import DVAEModelConfig, TransformerModelConfig
from tessera.trainer.dvae import DVAE
from tessera.trainer.transformer import DALLE

REPO = Path(__file__).resolve().parents[2]
SMALL = ["transformer.model.text_vocab=256", "transformer.model.image_vocab=512"]


def _bench_plan():
    spec = importlib.util.spec_from_file_location("bench_plan", REPO / "bench" / "bench_plan.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tcfg(**kw) -> TransformerModelConfig:
    base = dict(text_len=8, text_vocab=100, image_grid=6, image_vocab=64, d_model=48, n_layers=5, n_heads=3, conv_kernel=3)
    return TransformerModelConfig(**{**base, **kw})


# -- parameter counts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [_tcfg(), _tcfg(attention="dense", mlp_ratio=2.5), _tcfg(n_layers=1, d_model=64, n_heads=4), load_root("demo").transformer.model],
)
def test_transformer_parameter_count_equals_the_model(cfg):
    assert transformer_shape(cfg).params == DALLE(cfg).num_parameters()


def test_12b_parameter_count_equals_the_model_built_on_the_meta_device():
    cfg = load_root("dalle-12b").transformer.model
    layouts._token_mask_cached.cache_clear()
    try:
        with torch.device("meta"):
            n = DALLE(cfg).num_parameters()
    finally:
        layouts._token_mask_cached.cache_clear()  # the cache now holds meta masks
    assert transformer_shape(cfg).params == n
    assert 12.0e9 < n < 12.5e9


@pytest.mark.parametrize(
    "cfg",
    [
        DVAEModelConfig(image_size=32, n_hid=16, n_groups=2, n_blk_per_group=1, vocab_size=64, n_init=16),
        DVAEModelConfig(image_size=64, n_hid=16, n_groups=3, n_blk_per_group=2, vocab_size=512, n_init=64),
        load_root("demo-quick").dvae.model,
    ],
)
def test_dvae_parameter_count_equals_the_model(cfg):
    assert dvae_shape(cfg).params == sum(p.numel() for p in DVAE(cfg).parameters())


def test_paper_dvae_parameter_count_equals_the_model():
    cfg = load_root("dalle-12b").dvae.model
    with torch.device("meta"):
        n = sum(p.numel() for p in DVAE(cfg).parameters())
    assert dvae_shape(cfg).params == n


# -- DeepSpeed's estimators ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ds():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    return stage_1_and_2, stage3


def test_largest_layer_equals_deepspeeds_count_of_the_live_model(ds):
    _, stage3 = ds
    for cfg in (_tcfg(), load_root("demo").transformer.model):
        total, largest = stage3.model_to_params(DALLE(cfg))
        shape = transformer_shape(cfg)
        assert (shape.params, shape.largest_layer) == (total, largest)
    cfg = load_root("demo").dvae.model
    assert stage3.model_to_params(DVAE(cfg)) == (dvae_shape(cfg).params, dvae_shape(cfg).largest_layer)


@pytest.mark.parametrize("preset", ["demo", "dalle-12b"])
@pytest.mark.parametrize("gpn,nodes", [(1, 1), (8, 1), (8, 4), (4, 16)])
def test_zero2_and_zero3_model_states_equal_deepspeeds_estimator(ds, preset, gpn, nodes):
    stage12, stage3 = ds
    shape = transformer_shape(load_root(preset).transformer.model)
    hw = P.Hardware(gpus=gpn * nodes, gpus_per_node=gpn)
    _, z2 = stage12.estimate_zero2_model_states_mem_needs(shape.params, gpn, nodes, cpu_offload=False)
    _, z3, _ = stage3.estimate_zero3_model_states_mem_needs(shape.params, shape.largest_layer, gpn, nodes, cpu_offload=False)
    for precision in ("bf16", "fp16"):
        assert P.model_states_total(shape, "zero2", precision, hw) == pytest.approx(z2, abs=1.0)
        assert P.model_states_total(shape, "zero3", precision, hw) == pytest.approx(z3, abs=1.0)


# -- peak memory and step time against a measured run ------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,batch",
    [
        (SMALL, 8),  # resblock activations dominate
        ([], 6),  # the 16,384 + 8,192 logits dominate
        (SMALL + ["transformer.model.d_model=96", "transformer.model.n_heads=3", "transformer.model.n_layers=6"], 6),
    ],
)
def test_predicted_peak_memory_is_within_20_percent_of_a_measured_cpu_run(overrides, batch):
    bench = _bench_plan()
    got = bench.measure("demo", overrides, batch, steps=2, threads=1)
    cfg = load_root("demo", overrides).transformer.model
    s = cfg.text_len + cfg.image_grid**2
    rate = bench.matmul_flops(batch * s, cfg.d_model, int(cfg.d_model * cfg.mlp_ratio), 1, repeats=3)
    want = bench.projection("demo", overrides, batch, rate)
    ratio = want["peak_bytes"] / got["peak_bytes"]
    print(
        f"\npeak planned {want['peak_bytes'] / 2**20:.1f} MiB, measured {got['peak_bytes'] / 2**20:.1f} MiB (ratio {ratio:.3f});"
        f" step projected {want['step_s']:.3f} s, measured {got['step_s']:.3f} s (ratio {want['step_s'] / got['step_s']:.3f})"
    )
    assert 0.8 <= ratio <= 1.2
    assert want["step_s"] > 0 and got["step_s"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_predicted_peak_memory_is_within_20_percent_on_a_gpu():
    cfg = load_root("demo", SMALL).transformer.model
    batch = 16
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = DALLE(cfg).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    text = torch.randint(0, cfg.text_vocab, (batch, cfg.text_len), device="cuda")
    image = torch.randint(0, cfg.image_vocab, (batch, cfg.image_grid**2), device="cuda")
    for _ in range(2):
        model.loss(text, image)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    measured = torch.cuda.max_memory_allocated() - base
    mem = P.memory(transformer_shape(cfg), "ddp", "fp32", P.Hardware(1, 1), batch, False)
    planned = mem["peak"] - mem["comm_buffers"]
    print(f"\nGPU peak planned {planned / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB")
    assert 0.8 <= planned / measured <= 1.2


# -- FLOPs ------------------------------------------------------------------------------------------------


def test_attention_flops_count_only_the_unmasked_pairs():
    cfg = _tcfg()
    want = sum(int(lay.mask().sum()) for lay in layouts.layer_layouts(cfg.n_layers, cfg.text_len, cfg.image_grid, cfg.conv_kernel))
    pairs, dense = attention_pairs(cfg)
    assert pairs == want < dense
    shape = transformer_shape(cfg)
    assert shape.attention_flops_fwd == 4 * cfg.d_model * want
    assert transformer_shape(_tcfg(attention="dense")).attention_flops_fwd == 4 * cfg.d_model * dense


def test_matmul_flops_equal_torchs_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    cfg = _tcfg()
    model = DALLE(cfg)
    text = torch.randint(0, cfg.text_vocab, (2, cfg.text_len))
    image = torch.randint(0, cfg.image_vocab, (2, cfg.image_grid**2))
    with FlopCounterMode(display=False) as fc:
        model(text, image)
    counted = sum(v for k, v in fc.get_flop_counts()["Global"].items() if "attention" not in str(k))
    shape = transformer_shape(cfg)
    assert 2 * (shape.flops_fwd - shape.attention_flops_fwd) == counted


# -- communication, micro-batch, the paper's statements ---------------------------------------------------------


def test_powersgd_shrinks_only_the_cross_node_traffic_of_the_layouts_that_use_it():
    shape = transformer_shape(load_root("dalle-12b").transformer.model)
    hw = P.hardware(64, 8, "A100-80GB")
    for layout in ("ddp", "paper"):
        v = P.comm_bytes(shape, layout, "bf16", hw, 896, 1)
        assert 0 < v["inter_node_powersgd"] < v["inter_node"]
    v = P.comm_bytes(shape, "zero2", "bf16", hw, 896, 1)
    assert v["inter_node_powersgd"] == v["inter_node"] > 0
    one = P.comm_bytes(shape, "ddp", "bf16", P.hardware(8, 8, "A100-80GB"), 896, 1)
    assert one["inter_node"] == 0 and one["intra_gpu"] > 0


def test_largest_micro_batch_fits_and_one_more_does_not():
    shape = transformer_shape(
        load_root(
            "dalle-12b", ["transformer.model.n_layers=16", "transformer.model.d_model=2048", "transformer.model.n_heads=32"]
        ).transformer.model
    )
    hw = P.hardware(8, 8, "H100-80GB")
    for layout, ckpt in (("zero2", False), ("zero3", True), ("paper", True)):
        mb = P.largest_micro_batch(shape, layout, "bf16", hw, ckpt)
        assert mb >= 1
        limit = (hw.memory_gb - hw.reserve_gb) * 1e9
        assert P.memory(shape, layout, "bf16", hw, mb, ckpt)["peak"] <= limit < P.memory(shape, layout, "bf16", hw, mb + 1, ckpt)["peak"]


def test_the_paper_configuration_and_its_statements():
    cfg = load_root("dalle-12b")
    m = cfg.transformer.model
    assert (m.n_layers, m.d_model, m.n_heads, m.text_len, m.image_grid**2) == (64, 3968, 62, 256, 1024)
    hw = P.hardware(1024, 8, "V100-16GB")
    assert (hw.nodes, hw.gpus_per_node, hw.memory_gb) == (128, 8, 16)
    plan = P.plan_training(cfg, hw)
    t = plan["transformer"]
    assert 23.5e9 < t["weights_16bit_bytes"] < 25e9  # "about 24 GB" in 16-bit precision
    assert t["weights_16bit_bytes"] > hw.memory_gb * 1e9  # does not fit one GPU unsharded
    unsharded = [r for r in t["memory_grid"] if r["layout"] in ("ddp", "zero1", "zero2") and r["precision"] == "fp16"]
    assert all(r["largest_micro_batch_checkpointed"] == 0 for r in unsharded)
    assert t["advice"] is not None and t["advice"]["layout"] in ("zero3", "paper", "paper16")
    assert t["powersgd"]["rank"] == 896


def test_advice_prefers_the_simplest_layout_when_times_tie():
    cfg = load_root("dalle-12b", ["transformer.model.n_layers=8", "transformer.model.d_model=1024", "transformer.model.n_heads=16"])
    plan = P.plan_training(cfg, P.hardware(8, 8, "H100-80GB"), precision="bf16")
    a = plan["transformer"]["advice"]
    fastest = min(r["step_s"] for r in plan["transformer"]["candidates"] if r["fits"])
    assert a["layout"] == "ddp" and a["step_s"] <= fastest * 1.02
    assert a["micro_batch"] * a["time"]["micro_steps"] == 1024 // 8


@pytest.mark.parametrize(
    "d,heads,rank,rate,billions", [(1920, 30, 512, 0.83, 2.8), (2688, 42, 640, 0.85, 5.6), (3968, 62, 896, 0.86, 12.0)]
)
def test_powersgd_compression_of_the_papers_three_models(d, heads, rank, rate, billions):
    # d_model of the 2.8B and 5.6B models derived from their sizes: 64 resblocks of 12 d^2 parameters each
    cfg = load_root("dalle-12b", [f"transformer.model.d_model={d}", f"transformer.model.n_heads={heads}"]).transformer.model
    shape = transformer_shape(cfg)
    assert abs(shape.params / 1e9 - billions) / billions < 0.05
    assert round(P.paper_rate(rank, d), 2) == rate
    assert P.advised_rank(d) == rank
    # the formula is the MLP's d x 4d matrix with 16-bit factors against fp32 gradients
    assert P.matrix_rate(4 * d, d, rank, 2, 4) == pytest.approx(P.paper_rate(rank, d), abs=1e-12)
    # the whole model compresses less: its square attention matrices, and embeddings, gains and biases sent uncompressed
    whole = P.powersgd_rate(shape, rank, 2, 4)
    assert 0.6 < whole < P.paper_rate(rank, d)


# -- the command line ---------------------------------------------------------------------------------------


def _run(add, run, argv):
    ap = argparse.ArgumentParser()
    add(ap)
    return run(ap.parse_args(argv))


def test_plan_cli_json_and_table(capsys):
    assert _run(add_plan, run_plan, ["--config", "demo", "--gpus", "16", "--gpus-per-node", "8", "--gpu", "h100-80gb", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["hardware"]["nodes"] == 2 and plan["hardware"]["gpu"] == "H100-80GB"
    assert plan["transformer"]["params"] == DALLE(load_root("demo").transformer.model).num_parameters()
    assert {r["layout"] for r in plan["transformer"]["memory_grid"]} == set(P.LAYOUTS)
    argv = ["--config", "dalle-12b", "--gpus", "8", "--gpu-memory", "40", "--gpu-tflops", "100", "--intra-node-gbps", "2000"]
    assert _run(add_plan, run_plan, argv + ["--inter-node-gbps", "400", "--tokens", "1e9"]) == 0
    out = capsys.readouterr().out
    assert "advice:" in out and "assumptions:" in out and "12,293,824,256 parameters" in out
    assert "1e+09 tokens" in out


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--gpus", "8", "--gpu", "K80"], "unknown --gpu"),
        (["--gpus", "12", "--gpus-per-node", "8", "--gpu", "H200"], "not a multiple"),
        (["--gpus", "8"], "give --gpu"),
    ],
)
def test_plan_cli_bad_input_is_one_line(argv, msg):
    with pytest.raises(TesseraError, match=msg) as e:
        _run(add_plan, run_plan, ["--config", "demo"] + argv)
    assert "\n" not in str(e.value)


# -- the crawl plan -----------------------------------------------------------------------------------------


def test_committed_crawl_result_is_a_measurement():
    data = json.loads(DEFAULT_RESULT.read_text())
    for run in data["runs"]:
        assert run["images_per_s_per_core"] > 0 and run["output_bytes_per_sample"] > 0 and run["images"] > 0


def test_crawl_plan_projects_from_the_result_file(tmp_path):
    result = tmp_path / "crawl.json"
    run = dict(
        image_size=64, resize="center_crop", images_per_s_per_core=100.0, output_bytes_per_sample=5000, source_bytes_per_image=100_000
    )
    run.update(machine="test", date="now", images=10, output_format="jpg", quality=95)
    result.write_text(json.dumps({"runs": [run]}))
    crawl = CrawlConfig(image_size=64, shard_size=1000)
    # CPU-bound: 4 cores x 100 = 400 images/s per node; network 1 Gbit/s / 100 kB = 1250 images/s
    p = plan_crawl(crawl, rows=1_000_000, nodes=5, cores=4, bandwidth_gbps=1.0, result_path=result)
    assert p["bound"] == "cpu" and p["seconds"] == pytest.approx(1_000_000 / (5 * 400))
    assert p["storage_bytes"] == pytest.approx(1_000_000 * 5000) and p["shards"] == 1000
    # network-bound at 0.1 Gbit/s: 125 images/s per node
    p = plan_crawl(crawl, rows=1_000_000, nodes=5, cores=4, bandwidth_gbps=0.1, result_path=result, success_rate=0.5)
    assert p["bound"] == "network" and p["seconds"] == pytest.approx(1_000_000 / (5 * 125))
    assert p["storage_bytes"] == pytest.approx(500_000 * 5000)
    # another image size: the run's throughput, storage scaled with the pixel count, and said so
    p = plan_crawl(CrawlConfig(image_size=256), rows=10, nodes=1, cores=1, bandwidth_gbps=1.0, result_path=result)
    assert p["output_bytes_per_sample"] == pytest.approx(5000 * 16) and any("scaled" in a for a in p["assumptions"])


def test_plan_crawl_cli(capsys, tmp_path):
    assert _run(add_plan_crawl, run_plan_crawl, ["--rows", "2e6", "--nodes", "2", "--cores", "8", "--bandwidth-gbps", "1", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["rows"] == 2e6 and p["seconds"] > 0 and p["benchmark_run"]["images_per_s_per_core"] > 0
    with pytest.raises(TesseraError, match="does not exist"):
        _run(
            add_plan_crawl,
            run_plan_crawl,
            ["--rows", "1", "--nodes", "1", "--cores", "1", "--bandwidth-gbps", "1", "--result", str(tmp_path / "x")],
        )
    with pytest.raises(TesseraError, match="--nodes"):
        _run(add_plan_crawl, run_plan_crawl, ["--rows", "1", "--nodes", "0", "--cores", "1", "--bandwidth-gbps", "1"])
