"""tessera.trainer.grad_scale: per-resblock fp16 gradient scaling (paper section 2.4 and App. D).

The rules are checked on the scaler alone (flags in, scales out); the boundary hooks on a tiny DALLE
(an overflow injected into one resblock's backward); the rank agreement on two real gloo processes
(this file run as a script); the fp16 curve against fp32 on a tiny DALLE under CPU autocast; the
flush-to-zero comparison with bench/bench_grad_scale.py's measurement.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tessera.core.errors import CheckpointError, InputError
from tessera.trainer.config import TransformerModelConfig
from tessera.trainer.grad_scale import BACKOFF, COOLDOWN, GROWTH, PerBlockScaler, prenorm_branches, wrap_resblocks
from tessera.trainer.transformer import DALLE

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "trainer"))
from rank_workers import run_rank_workers  # noqa: E402


def tiny_cfg(n_layers: int = 3) -> TransformerModelConfig:
    return TransformerModelConfig(
        text_len=8, text_vocab=64, image_grid=4, image_vocab=32, d_model=32, n_layers=n_layers, n_heads=2, conv_kernel=3
    )


def tiny_dalle(n_layers: int = 3, seed: int = 0) -> DALLE:
    torch.manual_seed(seed)
    return DALLE(tiny_cfg(n_layers))


def data(step: int, b: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable toy: the image codes are a function of the first text token."""
    g = torch.Generator().manual_seed(step)
    text = torch.randint(0, 64, (b, 8), generator=g)
    image = (text[:, :1] * 5 + torch.arange(16)) % 32
    return text, image


def rules_scaler(n: int = 3, replicas: int = 1) -> PerBlockScaler:
    return PerBlockScaler([[torch.nn.Parameter(torch.zeros(2))] for _ in range(n)], replicas=replicas)


def inject_overflow(module: torch.nn.Module):
    """A forward hook making the gradient of `module`'s output non-finite in one entry (an overflow in that resblock)."""

    def hook(_m, _args, out):
        def poison(g):
            g = g.clone()
            g.view(-1)[0] = float("inf")
            return g

        out.register_hook(poison)

    return module.register_forward_hook(hook)


# -- the rules ------------------------------------------------------------------------------------


def test_scales_start_at_m_times_2_13_and_grow_by_2_to_the_1_over_1000():
    s = rules_scaler(3, replicas=4)
    assert s.scales.tolist() == [4 * 2.0**13] * 3
    for _ in range(500):
        assert s.update([True, True, True]) is True
    assert s.state_dict()["scales"] == pytest.approx([4 * 2.0**13.5] * 3, rel=1e-12)
    assert s.skipped == 0 and s.steps == 500


def test_an_overflow_divides_only_its_block_and_skips():
    s = rules_scaler(3)
    assert s.update([True, False, True]) is False
    assert s.state_dict()["scales"] == pytest.approx([2.0**13, 2.0**13 * BACKOFF, 2.0**13], rel=1e-12)
    assert s.skipped == 1
    # the parameters outside the resblocks: skip, but no scale moves
    assert s.update([True, True, True, False]) is False
    assert s.state_dict()["scales"] == pytest.approx([2.0**13, 2.0**13 * BACKOFF, 2.0**13], rel=1e-12)
    assert s.skipped == 2


def test_a_second_overflow_within_125_updates_does_not_divide_again():
    s = rules_scaler(2)
    s.update([False, True])  # step 0: divided
    once = 2.0**13 * BACKOFF
    for _ in range(COOLDOWN - 1):  # steps 1..124: overflowing again and again, never divided again
        assert s.update([False, True]) is False
    assert s.state_dict()["scales"] == pytest.approx([once, 2.0**13], rel=1e-12)
    assert s.skipped == COOLDOWN
    s.update([False, True])  # step 125: 125 steps after the first division
    assert s.state_dict()["scales"][0] == pytest.approx(once * BACKOFF, rel=1e-12)
    # the other block may be divided at once: the cooldown is per scale
    s.update([True, False])
    assert s.state_dict()["scales"] == pytest.approx([once * BACKOFF, 2.0**13 * BACKOFF], rel=1e-12)


def test_both_clamps_hold():
    m = 2
    s = rules_scaler(2, replicas=m)
    assert s.bounds == (m * 2.0**7, m * 2.0**24)
    # up: 11500 clean updates would take M 2^13 to M 2^24.5; the ceiling stops it at M 2^24
    for _ in range(11_500):
        s.update([True, True])
    assert s.state_dict()["scales"] == [m * 2.0**24] * 2
    # down: 40 divisions (one per cooldown) would reach M 2^(24 - 20); the floor stops them at M 2^7
    for _ in range(40 * COOLDOWN):
        s.update([False, True])
    sd = s.state_dict()["scales"]
    assert sd[0] == m * 2.0**7 and sd[1] == m * 2.0**24
    assert float(s.scales.min()) == m * 2.0**7


def test_state_dict_round_trip_and_bad_states():
    s = rules_scaler(3, replicas=2)
    s.update([True, False, True])
    for _ in range(7):
        s.update([True, True, True])
    t = rules_scaler(3, replicas=2)
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))  # plain numbers: survives JSON and weights_only
    assert t.state_dict() == s.state_dict()
    # resumed on another number of replicas: the scales follow M
    u = rules_scaler(3, replicas=4)
    u.load_state_dict(s.state_dict())
    assert u.state_dict()["scales"] == pytest.approx([2 * v for v in s.state_dict()["scales"]], rel=1e-12)
    with pytest.raises(CheckpointError, match="2 scales, the model has 3"):
        t.load_state_dict({**s.state_dict(), "scales": [1.0, 2.0], "last_divided": [0, 0]})
    with pytest.raises(CheckpointError, match="malformed"):
        t.load_state_dict({"scales": [1.0] * 3})
    with pytest.raises(CheckpointError, match="non-positive"):
        t.load_state_dict({**s.state_dict(), "scales": [1.0, -1.0, 1.0]})
    with pytest.raises(InputError, match="expected 3 or 4 finite flags"):
        t.update([True])


def test_metrics_name_every_block_and_the_skipped_count():
    s = rules_scaler(3)
    s.update([False, True, True])
    m = s.metrics()
    assert m["grad_scale/skipped"] == 1
    assert m["grad_scale/block_01"] == pytest.approx(2.0**13) and m["grad_scale/block_00"] == pytest.approx(2.0**13 * BACKOFF)
    assert m["grad_scale/min"] == pytest.approx(2.0**13 * BACKOFF) and m["grad_scale/max"] == pytest.approx(2.0**13)
    assert set(m) == {"grad_scale/min", "grad_scale/max", "grad_scale/skipped"} | {f"grad_scale/block_0{i}" for i in range(3)}


# -- the boundary hooks on the DALLE transformer --------------------------------------------------------


def test_wrapping_changes_no_gradient_in_fp32():
    """The scales are powers of two at the start, so in fp32 the unscaled gradients are bit-identical."""
    model = tiny_dalle()
    text, image = data(0)
    model.loss(text, image)["loss"].backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    scaler = wrap_resblocks(model, model.blocks, fp32_modules=[model.text_head, model.image_head])
    model.loss(text, image)["loss"].backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert scaler.unscale_().all()
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, ref[n]), n
        # inside a resblock the gradients came out times the block's scale; outside, untouched
        assert torch.equal(raw[n], ref[n] * 2.0**13 if n.startswith("blocks.") else ref[n]), n
    with pytest.raises(RuntimeError, match="twice"):
        scaler.unscale_()


def test_an_overflow_injected_into_one_resblock_moves_only_its_scale_and_the_update_is_skipped():
    model = tiny_dalle(4)
    scaler = wrap_resblocks(model, model.blocks, fp32_modules=[model.text_head, model.image_head])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = inject_overflow(model.blocks[2].mlp.fc)
    text, image = data(1)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model.loss(text, image)["loss"]
    loss.backward()
    handle.remove()
    finite = scaler.unscale_()
    assert finite.tolist() == [True, True, False, True, True]
    # the filter at block 2's boundary kept its Inf out of blocks 0-1 and the embeddings
    for n, p in model.named_parameters():
        if not n.startswith("blocks.2."):
            assert torch.isfinite(p.grad).all(), n
    assert scaler.update() is False
    opt.zero_grad(set_to_none=True)  # the skipped update
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert scaler.state_dict()["scales"] == pytest.approx([2.0**13, 2.0**13, 2.0**13 * BACKOFF, 2.0**13], rel=1e-12)
    assert scaler.metrics()["grad_scale/skipped"] == 1
    # a clean step then updates the weights and grows every scale
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model.loss(text, image)["loss"]
    loss.backward()
    assert scaler.unscale_().all()
    assert scaler.update() is True
    opt.step()
    assert not torch.equal(model.state_dict()["blocks.0.mlp.fc.weight"], before["blocks.0.mlp.fc.weight"])
    assert scaler.state_dict()["scales"] == pytest.approx(
        [2.0**13 * GROWTH] * 2 + [2.0**13 * BACKOFF * GROWTH, 2.0**13 * GROWTH], rel=1e-12
    )


def test_precision_logits_gains_biases_embeddings_stay_fp32_and_remove_undoes_it():
    model = tiny_dalle()
    scaler = wrap_resblocks(model, model.blocks, fp32_modules=[model.text_head, model.image_head])
    text, image = data(2)
    with torch.autocast("cpu", dtype=torch.float16):
        text_logits, image_logits = model(text, image)
        emb = model.embed_text(text)
        loss = model.loss(text, image)["loss"]
    assert text_logits.dtype == image_logits.dtype == emb.dtype == torch.float32
    loss.backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    scaler.remove()
    with torch.autocast("cpu", dtype=torch.float16):
        assert model(text, image)[0].dtype == torch.float16  # the heads are plain autocast again
    model.zero_grad(set_to_none=True)
    model.loss(text, image)["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.loss(text, image)["loss"].backward()  # no hook left: no scale in the raw gradients
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    assert model.blocks[0].mlp.fc.weight.grad.abs().max() < 10


def test_prenorm_branches_refuses_a_block_without_branches():
    assert [tuple(type(m).__name__ for m in pair) for pair in prenorm_branches(tiny_dalle(1).blocks[0])] == [
        ("LayerNorm", "CausalSelfAttention"),
        ("LayerNorm", "MLP"),
    ]
    with pytest.raises(InputError, match="Linear has no"):
        wrap_resblocks(torch.nn.Sequential(torch.nn.Linear(2, 2)), [torch.nn.Linear(2, 2)])


def test_resume_restores_the_scales(tmp_path):
    from tessera.cluster.engine import build_engine

    def make():
        model = tiny_dalle(3)
        scaler = wrap_resblocks(model, model.blocks, fp32_modules=[model.text_head, model.image_head])
        return model, scaler, build_engine(model, torch.optim.AdamW(model.parameters(), lr=1e-3), None, checkpoint_kind="transformer")

    model, scaler, eng = make()
    for step in range(4):
        handle = inject_overflow(model.blocks[1].mlp.fc) if step == 1 else None
        text, image = data(step)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model.loss(text, image)["loss"]
        eng.backward(loss)
        if handle is not None:
            handle.remove()
        scaler.unscale_()
        eng.step() if scaler.update() else eng.zero_grad()
    eng.save_checkpoint(tmp_path / "ckpt", 4, {"grad_scale": scaler.state_dict()})
    saved = scaler.state_dict()
    assert saved["skipped"] == 1 and saved["last_divided"] == [-COOLDOWN, 1, -COOLDOWN]

    model2, scaler2, eng2 = make()
    assert scaler2.state_dict() != saved
    step, client = eng2.load_checkpoint(tmp_path / "ckpt")
    scaler2.load_state_dict(client["grad_scale"])
    assert step == 4 and scaler2.state_dict() == saved
    assert torch.equal(scaler2.scales, scaler.scales)
    # the cooldown survives too: block 1 was divided at step 1, so an overflow at step 4 is not divided
    for s in (scaler, scaler2):
        s.update([True, False, True, True])
    assert scaler2.state_dict() == scaler.state_dict()
    assert scaler2.state_dict()["scales"][1] == pytest.approx(saved["scales"][1], rel=1e-12)


# -- fp16 training against fp32 -------------------------------------------------------------------------


def train_curve(fp16: bool, steps: int = 30) -> tuple[list[float], list[float], PerBlockScaler | None]:
    model = tiny_dalle(3, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    scaler = wrap_resblocks(model, model.blocks, fp32_modules=[model.text_head, model.image_head]) if fp16 else None
    losses, norms = [], []
    for step in range(steps):
        text, image = data(100 + step, b=16)
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            loss = model.loss(text, image)["loss"]
        loss.backward()
        if scaler is not None:
            scaler.unscale_()
            if not scaler.update():
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
                continue
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, norms, scaler


def test_a_short_fp16_run_with_per_resblock_scales_follows_the_fp32_curve():
    ref, ref_norms, _ = train_curve(False)
    got, got_norms, scaler = train_curve(True)
    assert ref[-1] < ref[0] - 1.0  # the toy is learnt (about 3.6 -> 1.7), so the curves have a shape to follow
    assert scaler.skipped == 0
    # Tolerance: fp16 rounds the matrix products to an 11-bit mantissa (relative error ~5e-4 per
    # value, ~1e-4 on a mean loss of ~3), and over 30 updates the runs' weights drift apart by about
    # that much per step: measured max 1e-4, mean 3e-5 on this machine. 3e-3 / 1e-3 leave ~30x room.
    diffs = [abs(a - b) for a, b in zip(ref, got)]
    assert max(diffs) < 3e-3, diffs
    assert sum(diffs) / len(diffs) < 1e-3, diffs
    # AdamW and clipping hide a constant factor in the gradients, so the unscaled gradient norm is
    # compared too: a block left scaled (x8192) or unscaled twice would be off by orders of magnitude
    assert all(abs(a - b) <= 0.02 * a for a, b in zip(ref_norms, got_norms)), (ref_norms, got_norms)


# -- flush to zero: per-resblock against one global scale ------------------------------------------------


def test_per_resblock_scaling_flushes_fewer_gradient_entries_than_one_global_scale():
    spec = importlib.util.spec_from_file_location("bench_grad_scale", REPO / "bench" / "bench_grad_scale.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.measure(depth=24, width=16, batch=256, batches=1, gain_span=40.0, gain_top=8.0)
    # one global scale: the later blocks' small gradients fall under fp16's smallest subnormal
    assert r["flushed_global"] > 0.05, r
    assert r["flushed_per_block"] < 0.5 * r["flushed_global"], r
    # the global scale is pinned by the first blocks; the per-block scales of the later ones are far above it
    first, _, last = r["log2_block_scale_first_mid_last"]
    assert last > r["log2_global_scale"][0] + 4 and first <= r["log2_global_scale"][0] + 1, r


# -- two ranks --------------------------------------------------------------------------------------------


def worker(out: Path) -> None:
    from tessera.cluster.config import DistConfig
    from tessera.cluster.dist import discover, init, shutdown
    from tessera.cluster.engine import build_engine

    dist = init(discover(), backend="gloo")
    model = tiny_dalle(3)
    scaler = wrap_resblocks(model, model.blocks, fp32_modules=[model.text_head, model.image_head])
    eng = build_engine(model, torch.optim.AdamW(model.parameters(), lr=1e-2), dist, DistConfig(zero_stage=0))
    rows = []
    for step in range(3):
        # step 1: only rank 1 overflows, in block 0's backward
        handle = inject_overflow(model.blocks[0].mlp.fc) if (step == 1 and dist.rank == 1) else None
        text, image = data(10 * step + dist.rank)
        with torch.autocast("cpu", dtype=torch.float16):
            text_logits, image_logits = eng(text, image)  # through DDP
            text_ce = F.cross_entropy(text_logits.float().reshape(-1, text_logits.shape[-1]), text[:, 1:].reshape(-1))
            loss = (text_ce + 7 * F.cross_entropy(image_logits.float().reshape(-1, 32), image.reshape(-1))) / 8
        before = model.blocks[2].mlp.fc.weight.detach().clone()
        eng.backward(loss)
        if handle is not None:
            handle.remove()
        finite = scaler.unscale_()
        applied = scaler.update()
        eng.step() if applied else eng.zero_grad()
        moved = not torch.equal(before, model.blocks[2].mlp.fc.weight)
        rows.append({"finite": finite.tolist(), "applied": applied, "moved": moved, "scales": scaler.state_dict()["scales"]})
    torch.save(eng.full_state_dict(), out / f"rank{dist.rank}.pt")
    # without DDP the gradients are not averaged, so only the flags' all_reduce can tell rank 0 of rank 1's overflow
    local = tiny_dalle(3, seed=dist.rank)
    local_scaler = wrap_resblocks(local, local.blocks)
    opt = torch.optim.AdamW(local.parameters(), lr=1e-2)
    local_rows = []
    for step in range(2):
        handle = inject_overflow(local.blocks[1].mlp.fc) if (step == 0 and dist.rank == 1) else None
        text, image = data(10 * step + dist.rank)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = local.loss(text, image)["loss"]
        loss.backward()
        if handle is not None:
            handle.remove()
        local_rows.append({"finite": local_scaler.unscale_().tolist(), "applied": local_scaler.update()})
        opt.step() if local_rows[-1]["applied"] else None
        opt.zero_grad(set_to_none=True)
    result = {"rows": rows, "local_rows": local_rows, "local_scales": local_scaler.state_dict()["scales"], "replicas": scaler.replicas}
    (out / f"rank{dist.rank}.json").write_text(json.dumps(result))
    shutdown(dist)


def test_two_ranks_combine_the_flags_and_skip_the_same_updates(tmp_path):
    run_rank_workers(__file__, [str(tmp_path)], 2, "grad-scale", timeout=180)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["replicas"] == r1["replicas"] == 2  # M from the process group
    assert r0["rows"] == r1["rows"]  # the same flags, decisions and scales on both ranks
    rows = r0["rows"]
    assert [r["applied"] for r in rows] == [True, False, True]
    assert [r["moved"] for r in rows] == [True, False, True]
    assert rows[1]["finite"] == [False, True, True, True]  # rank 1's overflow, seen by rank 0 too
    m = 2 * 2.0**13
    assert rows[1]["scales"] == pytest.approx([m * GROWTH * BACKOFF, m * GROWTH, m * GROWTH], rel=1e-6)
    assert rows[2]["scales"] == pytest.approx([m * GROWTH**2 * BACKOFF] + [m * GROWTH**2] * 2, rel=1e-6)
    assert (
        r0["local_rows"]
        == r1["local_rows"]
        == [
            {"finite": [True, False, True, True], "applied": False},
            {"finite": [True, True, True, True], "applied": True},
        ]
    )
    assert r0["local_scales"] == r1["local_scales"] == pytest.approx([m * GROWTH, m * BACKOFF * GROWTH, m * GROWTH], rel=1e-12)
    w0, w1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert math.isfinite(float(sum(v.float().sum() for v in w0.values())))


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
