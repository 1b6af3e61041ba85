"""tessera.trainer.config: the training-stage sections (dvae, transformer, clip, sample): paper defaults,
types, validate() ranges with the dotted key in the message, and documentation of every field."""

import dataclasses

import pytest

from tessera.core.errors import ConfigError
from tessera.core.root_config import load_root
from tessera.trainer.config import (
    ClipConfig,
    DVAEConfig,
    DVAEModelConfig,
    DVAETrainConfig,
    SampleConfig,
    TransformerConfig,
    TransformerModelConfig,
    TransformerTrainConfig,
)

CLASSES = (
    DVAEModelConfig,
    DVAETrainConfig,
    DVAEConfig,
    TransformerModelConfig,
    TransformerTrainConfig,
    TransformerConfig,
    ClipConfig,
    SampleConfig,
)


def load(*overrides):
    return load_root(None, list(overrides))


def error(*overrides) -> str:
    with pytest.raises(ConfigError) as e:
        load(*overrides)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("cls", CLASSES)
def test_every_field_is_documented(cls):
    assert (cls.__doc__ or "").strip()
    for f in dataclasses.fields(cls):
        assert f.metadata.get("doc", "").strip(), f"{cls.__name__}.{f.name}"


def test_defaults_are_the_papers():
    m = DVAEModelConfig()
    assert (m.image_size, m.n_groups, m.vocab_size, m.grid_size) == (256, 4, 8192, 32)  # App. A.1
    t = DVAETrainConfig()
    assert (t.kl_weight, t.kl_warmup_steps, t.temp_start, t.temp_end, t.temp_anneal_steps) == (6.6, 5000, 1.0, 1 / 16, 150_000)  # A.2
    assert (t.lr, t.lr_min, t.lr_decay_steps, t.diversity_weight) == (1e-4, 1.25e-6, 1_200_000, 0.0)
    x = TransformerModelConfig()
    assert (x.text_len, x.text_vocab, x.image_grid, x.image_vocab) == (256, 16384, 32, 8192)
    assert (x.d_model, x.n_layers, x.n_heads, x.conv_kernel, x.attention) == (3968, 64, 62, 11, "dalle")
    y = TransformerTrainConfig()
    assert (y.lr, y.warmup_steps, y.beta1, y.beta2, y.eps, y.weight_decay, y.grad_clip) == (
        4.5e-4,
        5000,
        0.9,
        0.96,
        1e-8,
        4.5e-2,
        4.0,
    )  # B.2
    assert (y.image_loss_weight, y.bpe_dropout) == (7.0, 0.1)  # B.1, B.2
    s = SampleConfig()
    assert (s.temperature, s.top_k, s.top_p, s.guidance_scale, s.candidates) == (1.0, 0, 1.0, 1.0, 1)  # all filters off


@pytest.mark.parametrize(
    "image_size, n_groups, grid",
    [(256, 4, 32), (64, 4, 8), (16, 3, 4), (64, 1, 64), (48, 2, 24)],
)
def test_dvae_grid_size(image_size, n_groups, grid):
    cfg = load(f"dvae.model.image_size={image_size}", f"dvae.model.n_groups={n_groups}").dvae.model
    assert cfg.grid_size == grid


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["dvae.model.image_size=60"], "config key 'dvae.model.image_size': expected a multiple of 8 for 4 groups, got 60"),
        (
            ["dvae.model.image_size=18", "dvae.model.n_groups=3"],
            "config key 'dvae.model.image_size': expected a multiple of 4 for 3 groups, got 18",
        ),
        (["dvae.model.n_hid=0"], "config key 'dvae.model.n_hid': expected >= 1, got 0"),
        (["dvae.model.n_groups=0"], "config key 'dvae.model.n_groups': expected >= 1, got 0"),
        (["dvae.model.n_blk_per_group=0"], "config key 'dvae.model.n_blk_per_group': expected >= 1, got 0"),
        (["dvae.model.vocab_size=-1"], "config key 'dvae.model.vocab_size': expected >= 1, got -1"),
        (["dvae.model.n_init=0"], "config key 'dvae.model.n_init': expected >= 1, got 0"),
        (["dvae.model.n_hid=18"], "config key 'dvae.model.n_hid': expected a multiple of 4 (bottleneck width is out/4), got 18"),
        (
            ["transformer.model.d_model=100", "transformer.model.n_heads=3"],
            "config key 'transformer.model.d_model': expected a multiple of n_heads=3, got 100",
        ),
        (["transformer.model.conv_kernel=4"], "config key 'transformer.model.conv_kernel': expected odd, got 4"),
        (["clip.d_model=30", "clip.n_heads=4"], "config key 'clip.d_model': expected a multiple of n_heads=4, got 30"),
        (["clip.image_size=12"], "config key 'clip.image_size': expected a power of two >= 8, got 12"),
        (["clip.image_size=4"], "config key 'clip.image_size': expected a power of two >= 8, got 4"),
        (["clip.n_layers=0"], "config key 'clip.n_layers': expected >= 1, got 0"),
        (["clip.embed_dim=0"], "config key 'clip.embed_dim': expected >= 1, got 0"),
        (["clip.text_len=0"], "config key 'clip.text_len': expected >= 1, got 0"),
        (["clip.steps=0"], "config key 'clip.steps': expected >= 1, got 0"),
        (["clip.batch_size=0"], "config key 'clip.batch_size': expected >= 1, got 0"),
        (["clip.bpe_dropout=1.0"], "config key 'clip.bpe_dropout': expected in [0, 1), got 1.0"),
        (["sample.temperature=0"], "config key 'sample.temperature': expected > 0, got 0.0"),
        (["sample.temperature=-1"], "config key 'sample.temperature': expected > 0, got -1.0"),
        (["sample.top_p=0"], "config key 'sample.top_p': expected in (0, 1], got 0.0"),
        (["sample.top_p=1.5"], "config key 'sample.top_p': expected in (0, 1], got 1.5"),
    ],
)
def test_validate_ranges(overrides, message):
    assert error(*overrides) == message


@pytest.mark.parametrize(
    "overrides",
    [
        ["dvae.model.image_size=8", "dvae.model.n_groups=4", "dvae.model.n_hid=4", "dvae.model.vocab_size=1", "dvae.model.n_init=1"],
        ["transformer.model.d_model=6", "transformer.model.n_heads=3", "transformer.model.conv_kernel=1"],
        ["clip.image_size=8", "clip.d_model=1", "clip.n_heads=1", "clip.bpe_dropout=0.0"],
        ["clip.image_size=512"],
        ["sample.temperature=0.01", "sample.top_p=1.0"],
        ["sample.top_p=0.001"],
    ],
)
def test_validate_accepts_the_boundaries(overrides):
    load(*overrides)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "dvae.train.precision=fp8",
            "config key 'dvae.train.precision': expected one of 'auto', 'fast', 'fp32', 'bf16', 'fp16', got 'fp8'",
        ),
        ("clip.precision=half", "config key 'clip.precision': expected one of 'auto', 'fast', 'fp32', 'bf16', 'fp16', got 'half'"),
        ("transformer.train.decay=linear", "config key 'transformer.train.decay': expected one of 'cosine', 'plateau', got 'linear'"),
        ("transformer.model.attention=sparse", "config key 'transformer.model.attention': expected one of 'dalle', 'dense', got 'sparse'"),
        ("transformer.train.lr=fast", "config key 'transformer.train.lr': expected float, got str 'fast'"),
        ("transformer.model.n_layers=true", "config key 'transformer.model.n_layers': expected int, got bool True"),
        ("dvae.train.channels_last=0", "config key 'dvae.train.channels_last': expected bool, got int 0"),
        ("clip.checkpoint=5", "config key 'clip.checkpoint': expected str or none, got int 5"),
        ("sample.use_kv_cache=on", "config key 'sample.use_kv_cache': expected bool, got str 'on'"),
        ("dvae.model=4", "config key 'dvae.model': expected table [DVAEModelConfig], got int 4"),
    ],
)
def test_wrong_types_name_the_key_and_the_expected_type(override, message):
    assert error(override) == message


def test_types_that_are_accepted_and_converted():
    cfg = load("transformer.train.precision=fp16", "dvae.train.lr=1", "clip.checkpoint=ck.pt", "transformer.model.mlp_ratio=2")
    assert cfg.transformer.train.precision == "fp16"  # the transformer alone allows fp16 (paper App. D)
    assert cfg.dvae.train.lr == 1.0 and isinstance(cfg.dvae.train.lr, float)
    assert cfg.transformer.model.mlp_ratio == 2.0 and isinstance(cfg.transformer.model.mlp_ratio, float)
    assert cfg.clip.checkpoint == "ck.pt"


@pytest.mark.parametrize(
    "override, section, cls",
    [
        ("dvae.model.width=3", "dvae.model", DVAEModelConfig),
        ("dvae.train.epochs=3", "dvae.train", DVAETrainConfig),
        ("transformer.model.layers=3", "transformer.model", TransformerModelConfig),
        ("transformer.layers=3", "transformer", TransformerConfig),
        ("clip.width=3", "clip", ClipConfig),
        ("sample.top=3", "sample", SampleConfig),
    ],
)
def test_unknown_keys_list_the_known_ones(override, section, cls):
    msg = error(override)
    assert msg.startswith(f"unknown config key '{override.split('=')[0]}'")
    assert msg.endswith(f"known keys under '{section}': " + ", ".join(sorted(f.name for f in dataclasses.fields(cls))))


# ---------------------------------------------------------------- bugs found while writing these tests


def test_transformer_zero_heads_is_a_config_error():
    assert "transformer.model.n_heads" in error("transformer.model.n_heads=0")


def test_clip_zero_heads_is_a_config_error():
    assert "clip.n_heads" in error("clip.n_heads=0")


@pytest.mark.parametrize("size", [0, -64])
def test_dvae_non_positive_image_size_is_a_config_error(size):
    assert "dvae.model.image_size" in error(f"dvae.model.image_size={size}")


def test_the_loop_keys_are_declared_once_and_each_stage_has_its_defaults():
    from tessera.trainer.config import LoopConfig

    loop = {f.name: f for f in dataclasses.fields(LoopConfig)}
    assert {"steps", "lr", "grad_clip", "ema_decay", "precision", "log_every", "ckpt_every", "time_budget_s", "threads"} <= set(loop)
    stages = {"dvae.train": DVAETrainConfig(), "transformer.train": TransformerTrainConfig(), "clip": ClipConfig()}
    for prefix, cfg in stages.items():
        assert isinstance(cfg, LoopConfig) and type(cfg).KEY_PREFIX == prefix
        fields = {f.name: f for f in dataclasses.fields(cfg)}
        assert list(fields)[: len(loop)] == list(loop)  # the same keys, first, in the same order
        assert all(fields[k].metadata["doc"] == loop[k].metadata["doc"] and fields[k].type == loop[k].type for k in loop)
    assert [c.steps for c in stages.values()] == [3_000_000, 430_000, 2000]  # per-stage defaults
    assert (ClipConfig().grad_clip, ClipConfig().eps, DVAETrainConfig().ema_decay, TransformerTrainConfig().grad_clip) == (
        1.0,
        1e-6,
        0.999,
        4.0,
    )
    # the keys resolve under each stage's own prefix, and a range error names it
    cfg = load("dvae.train.threads=2", "transformer.train.eval_every=7", "clip.grad_clip=0.5", "clip.ema_decay=0.9")
    assert (cfg.dvae.train.threads, cfg.transformer.train.eval_every, cfg.clip.grad_clip, cfg.clip.ema_decay) == (2, 7, 0.5, 0.9)
    assert error("clip.log_every=0") == "config key 'clip.log_every': expected >= 1, got 0"
    assert error("transformer.train.ema_decay=1.5") == "config key 'transformer.train.ema_decay': expected in [0, 1), got 1.5"
