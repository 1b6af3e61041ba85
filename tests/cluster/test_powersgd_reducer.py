"""PowerSGD reducer in a real 2-process gloo group (one OS process per rank, like torchrun).

(Named test_powersgd_reducer.py, not test_powersgd.py: tests/kernels/test_powersgd.py has that
basename and the test tree has no __init__.py files, so pytest would refuse to collect both.)
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tessera.cluster.dist import free_port
from tessera.cluster.powersgd import PowerSGDReducer, compression_floor

WORKER = textwrap.dedent(
    """
    import os, sys
    mode, out_dir = sys.argv[1], sys.argv[2]
    if mode == "triton":
        os.environ["TRITON_INTERPRET"] = "1"  # CPU: run the Triton kernels in the interpreter
    import torch
    from tessera.cluster.dist import discover, init, shutdown
    from tessera.cluster.powersgd import PowerSGDReducer, ddp_comm_hook

    s = init(discover(), backend="gloo")
    torch.set_num_threads(1)
    result = {}

    def rank_grads():
        g = torch.Generator().manual_seed(100 + s.rank)  # different gradients on each rank
        return [torch.randn(40, 24, generator=g), torch.randn(6, 4, 3, 3, generator=g), torch.randn(48, generator=g)]

    if mode == "converge":
        base = rank_grads()
        true_mean = [b.clone() for b in base]
        for t in true_mean:
            torch.distributed.all_reduce(t)
            t /= s.world_size
        red = PowerSGDReducer(rank=2, backend="torch")
        sums = [torch.zeros_like(b) for b in base]
        history = []
        for step in range(1, 101):
            grads = [b.clone() for b in base]
            red.reduce(grads)
            for acc, g in zip(sums, grads):
                acc += g
            if step in (1, 5, 20, 100):
                history.append((step, [a / step for a in sums]))
            if step == 1:
                result["first"] = [g.clone() for g in grads]
        no_ef = PowerSGDReducer(rank=2, backend="torch", use_error_feedback=False)
        no_ef_sums = [torch.zeros_like(b) for b in base]
        for step in range(100):
            grads = [b.clone() for b in base]
            no_ef.reduce(grads)
            for acc, g in zip(no_ef_sums, grads):
                acc += g
        result["no_ef_avg"] = [a / 100 for a in no_ef_sums]
        result.update(true_mean=true_mean, history=history, ratio=red.compression_ratio,
                      n_groups=len(red._states[0].groups), n_uncompressed=len(red._states[0].uncompressed))

    elif mode == "triton":
        base = rank_grads()
        outs = {}
        for backend in ("torch", "triton"):
            red = PowerSGDReducer(rank=2, backend=backend, seed=3)
            steps = []
            for _ in range(3):
                grads = [b.clone() for b in base]
                red.reduce(grads)
                steps.append(grads)
            outs[backend] = steps
        result.update(outs)

    elif mode == "train":
        from torch.nn.parallel import DistributedDataParallel as DDP
        torch.manual_seed(0)  # same initial model on both ranks
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        ddp = DDP(model)
        red = PowerSGDReducer(rank=2, start_iter=3, backend="torch")
        ddp.register_comm_hook(red, ddp_comm_hook)
        g = torch.Generator().manual_seed(7)
        w_true = torch.randn(16, 1, generator=g)
        gr = torch.Generator().manual_seed(50 + s.rank)  # each rank its own data
        x = torch.randn(256, 16, generator=gr)
        y = torch.tanh(x @ w_true / 4)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.3, momentum=0.9)
        losses = []
        for step in range(80):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(ddp(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        result.update(losses=losses, state={k: v.clone() for k, v in model.state_dict().items()},
                      ratio=red.compression_ratio, steps=red.step)

    elif mode == "cross":  # the sharded layout's CrossGroupReducer on one hand-made FSDP unit (two groups of one rank)
        from tessera.cluster.sharded_powersgd import CrossGroupReducer, Slot
        slots = [Slot("a.weight", 0, (6, 10), 64), Slot("b.weight", 64, (12, 5), 60), Slot("c.bias", 124, (7,), 8)]
        scale = lambda fqn: 4.0 if fqn.startswith("a.") else 1.0
        for name, warm, start in (("fixed", False, 0), ("warm", True, 0), ("start2", False, 2)):
            red = CrossGroupReducer(2, None, 2, scale=scale, seed=3, backend="torch", warm_start=warm, start_iter=start)
            unit = red.plan("u", slots, {"c.bias"})
            qs = lambda: {sl.fqn: b.q[j].clone() for b in unit.batches for j, sl in enumerate(b.slots)}
            q0 = qs()
            g = torch.Generator().manual_seed(200 + s.rank)  # each group its own gradients
            ins, outs = [], []
            for step in range(4):
                flat = torch.randn(132, generator=g)
                ins.append(flat.clone())
                red.reduce(flat, unit)
                outs.append(flat.clone())
            result[name] = dict(q0=q0, q_end=qs(), ins=ins, outs=outs,
                                errors={k: v.clone() for k, v in red.error_state().items()})

    torch.save(result, os.path.join(out_dir, f"rank{s.rank}.pt"))
    shutdown(s)
    """
)


def _run_two_ranks(tmp_path, mode: str) -> list[dict]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        env.pop("TRITON_INTERPRET", None)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), mode, str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_error_feedback_converges_to_mean_gradient(tmp_path):
    r0, r1 = _run_two_ranks(tmp_path, "converge")
    mean = r0["true_mean"]
    # both ranks apply the same update
    for a, b in zip(r0["first"], r1["first"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # the two matrices are compressed (two shape groups), the bias is all-reduced exactly
    assert r0["n_groups"] == 2 and r0["n_uncompressed"] == 1
    torch.testing.assert_close(r0["first"][2], mean[2], atol=1e-6, rtol=1e-6)
    # one rank-2 step of a random 40x24 matrix misses most of it ...
    first_err = _rel(r0["first"][0], mean[0])
    assert first_err > 0.5
    # ... but with error feedback what was left out is sent later: the running average of the
    # updates approaches the mean gradient (avg_T = mean - mean_w(error_T) / T)
    errs = {step: [_rel(avg[i], mean[i]) for i in range(2)] for step, avg in r0["history"]}
    for i in range(2):
        assert errs[100][i] < errs[20][i] < errs[5][i], errs
        assert errs[100][i] < 0.1, errs
        # without error feedback the average stays a rank-2 approximation of the mean
        assert _rel(r0["no_ef_avg"][i], mean[i]) > 0.3
    # and it sent fewer numbers than a plain all-reduce
    assert r0["ratio"] > 3.0


def test_triton_kernels_match_torch_path_in_group(tmp_path):
    """The reducer's Triton path (interpreter on CPU) gives the torch path's updates, step by step."""
    r0, r1 = _run_two_ranks(tmp_path, "triton")
    for res in (r0, r1):
        for step_t, step_r in zip(res["triton"], res["torch"]):
            for a, b in zip(step_t, step_r):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for a, b in zip(r0["triton"][-1], r1["triton"][-1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_tiny_model_trains_with_ddp_hook(tmp_path):
    r0, r1 = _run_two_ranks(tmp_path, "train")
    for res in (r0, r1):
        losses = res["losses"]
        assert losses[-1] < 0.05 * losses[0], losses[::10]
        assert res["steps"] == 80 and res["ratio"] > 1.5
    # replicas stay identical: every rank applied the same decompressed gradient
    for k in r0["state"]:
        torch.testing.assert_close(r0["state"][k], r1["state"][k], atol=1e-6, rtol=1e-6)


def test_single_process_is_identity_on_uncompressed_and_plans_shapes():
    red = PowerSGDReducer(rank=4)
    grads = [torch.randn(3, 5), torch.randn(100, 80), torch.randn(100, 80), torch.randn(7)]
    before = [g.clone() for g in grads]
    red.reduce(grads)
    state = red._states[0]
    assert state.uncompressed == [0, 3]  # 3x5 at rank 4 would not compress (15 < 2 * 8 * 3)
    assert [g.indices for g in state.groups] == [[1, 2]]  # equal shapes batched together
    torch.testing.assert_close(grads[0], before[0])
    torch.testing.assert_close(grads[3], before[3])
    # one process: out + error == grad, exactly what error feedback relies on
    err = state.groups[0].error
    torch.testing.assert_close(grads[1] + err[0], before[1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="rank"):
        PowerSGDReducer(rank=0)
    f = compression_floor(4096, 1024, 4)
    assert f["sent_elements"] == (4096 + 1024) * 4 and f["flops"] > 6 * 4096 * 1024 * 4


def test_bytes_are_counted_per_step_across_lists():
    """A step is one backward pass: lists reduced with last=False add up until the last one (DDP's buckets)."""
    red = PowerSGDReducer(rank=2, start_iter=1)
    bucket_a = [torch.randn(64, 32), torch.randn(32)]
    bucket_b = [torch.randn(16, 16, 3), torch.randn(5, 2)]  # 16 x 48 compresses; 5 x 2 does not
    dense = 4 * sum(g.numel() for g in bucket_a + bucket_b)
    red.reduce([g.clone() for g in bucket_a], key=0, last=False)
    assert red.step == 0 and red.bytes_sent_last_step == 0
    red.reduce([g.clone() for g in bucket_b], key=1, last=True)
    assert red.step == 1 and red.bytes_sent_last_step == red.bytes_dense_last_step == dense  # before start_iter: uncompressed
    red.reduce([g.clone() for g in bucket_a], key=0, last=False)
    red.reduce([g.clone() for g in bucket_b], key=1, last=True)
    compressed = 4 * ((64 + 32) * 2 + 32 + (16 + 48) * 2 + 10)
    assert red.step == 2 and red.bytes_sent_last_step == compressed and red.bytes_dense_last_step == dense


def test_non_finite_step_resets_the_compressed_state():
    """An overflowed gradient (fp16 loss scaling) must not poison the error buffers of the following steps."""
    red = PowerSGDReducer(rank=2)
    good = [torch.randn(40, 24), torch.randn(8)]
    red.reduce([g.clone() for g in good])
    bad = [g.clone() for g in good]
    bad[0][3, 5] = float("inf")
    red.reduce(bad)
    assert not torch.isfinite(bad[0]).all()  # the step itself is non-finite (a loss scaler skips it)
    assert red.skipped_nonfinite == 1
    assert all(gs.error is None and gs.q is None for gs in red._states[0].groups)
    after = [g.clone() for g in good]
    red.reduce(after)
    assert torch.isfinite(after[0]).all() and red.skipped_nonfinite == 1
    # a fresh start: the same update as a new reducer's first step
    fresh = [g.clone() for g in good]
    PowerSGDReducer(rank=2).reduce(fresh)
    torch.testing.assert_close(after[0], fresh[0])


def test_named_error_and_q_follow_the_parameters_across_a_bucket_rebuild_and_a_resume():
    """With names (the DDP engine's) a list planned anew in another order (DDP's bucket rebuild after step 1) keeps each
    parameter's error and Q, and a new reducer given error_state()/q_state() goes on as the first; without names the
    rebuilt list starts fresh, which changes the updates (so the comparison is not vacuous)."""
    g = torch.Generator().manual_seed(11)
    names = ["a.weight", "b.weight", "c.weight", "c.bias"]
    steps = [
        [torch.randn(40, 24, generator=g), torch.randn(40, 24, generator=g), torch.randn(16, 48, generator=g), torch.randn(8, generator=g)]
        for _ in range(4)
    ]
    order = [2, 3, 1, 0]  # the rebuilt bucket

    def run(reducer, first: int, last: int, rebuilt_from: int, named: bool = True) -> list[dict[str, torch.Tensor]]:
        outs = []
        for t in range(first, last):
            idx = order if t >= rebuilt_from else range(4)
            grads = [steps[t][i].clone() for i in idx]
            reducer.reduce(grads, key=0, names=[names[i] for i in idx] if named else None)
            outs.append({names[i]: gr for i, gr in zip(idx, grads)})
        return outs

    ref = run(PowerSGDReducer(rank=2, backend="torch"), 0, 4, rebuilt_from=4)  # never rebuilt
    rebuilt = run(PowerSGDReducer(rank=2, backend="torch"), 0, 4, rebuilt_from=1)
    first = PowerSGDReducer(rank=2, backend="torch")
    head = run(first, 0, 2, rebuilt_from=1)
    errors, qs = first.error_state(), first.q_state()
    assert sorted(errors) == sorted(qs) == ["a.weight", "b.weight", "c.weight"] and all(float(e.abs().max()) > 0 for e in errors.values())
    resumed = PowerSGDReducer(rank=2, backend="torch")
    resumed.load_state({k: v.clone() for k, v in errors.items()}, {k: v.clone() for k, v in qs.items()})
    tail = run(resumed, 2, 4, rebuilt_from=3)  # a fresh DDP: its first step in the initial order, then rebuilt
    unnamed = run(PowerSGDReducer(rank=2, backend="torch"), 0, 4, rebuilt_from=1, named=False)
    for t in range(4):
        for k in names:
            torch.testing.assert_close(rebuilt[t][k], ref[t][k], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close((head + tail)[t][k], ref[t][k], atol=1e-6, rtol=1e-5)
    assert _rel(unnamed[3]["a.weight"], ref[3]["a.weight"]) > 1e-2


CROSS_SCALE = {"a.weight": 4.0, "b.weight": 1.0}
CROSS_MATS = {"a.weight": ((6, 10), 0), "b.weight": ((12, 5), 64)}  # b is taller than wide: compressed transposed


def _orth(a: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt in float64 (equals Householder QR with diag(R) > 0 for a full-rank input)."""
    cols = []
    for j in range(a.shape[1]):
        v = a[:, j].clone()
        for c in cols:
            v -= (c @ v) * c
        cols.append(v / v.norm())
    return torch.stack(cols, dim=1)


def _two_group_reference(ins: list[list[torch.Tensor]], q0: dict, warm: bool, start: int, r: int = 2):
    """One process, two simulated groups: PowerSGD with error feedback as the issue states it, in float64."""
    steps = len(ins[0])
    err = {k: [None, None] for k in CROSS_MATS}
    q = {k: v.double() for k, v in q0.items()}
    outs = [[x.double().clone() for x in ins[0]], [x.double().clone() for x in ins[1]]]
    for t in range(steps):
        bias = (ins[0][t][124:131] + ins[1][t][124:131]).double() / 2
        for o in (outs[0][t], outs[1][t]):
            o[124:131] = bias
        for name, ((rows, cols), off) in CROSS_MATS.items():
            sc, tr = CROSS_SCALE[name], rows > cols
            grads = [ins[g][t][off : off + rows * cols].double().view(rows, cols) for g in range(2)]
            if t < start:  # uncompressed steps: the mean, and nothing for the error
                approx_out = (grads[0] + grads[1]) / 2
            else:
                ms = [(gr.t() if tr else gr) / sc for gr in grads]
                ms = [m + err[name][g] if err[name][g] is not None else m for g, m in enumerate(ms)]
                p = _orth(sum(m @ q[name] for m in ms) + 1e-6 * torch.eye(ms[0].shape[0], r, dtype=torch.float64))
                qn = sum(m.t() @ p for m in ms) / 2
                approx = p @ qn.t()
                err[name] = [m - approx for m in ms]
                if warm:
                    q[name] = qn
                approx_out = (approx.t() if tr else approx) * sc
            for o in (outs[0][t], outs[1][t]):
                o[off : off + rows * cols] = approx_out.reshape(-1)
    return outs, err, q


def test_cross_group_reducer_matches_a_two_group_reference(tmp_path):
    """Value level: the sharded layout's reducer (2 real gloo groups) against a one-process float64 reference of
    PowerSGD with error feedback; error = M - P Q'^T with M = gradient / scale + previous error, per group;
    the mean over groups divides once; Q fixed (default), warm-started, or after uncompressed steps."""
    r0, r1 = _run_two_ranks(tmp_path, "cross")
    for name, warm, start in (("fixed", False, 0), ("warm", True, 0), ("start2", False, 2)):
        a, b = r0[name], r1[name]
        for k in a["q0"]:
            torch.testing.assert_close(a["q0"][k], b["q0"][k], atol=0, rtol=0)  # the same Q on every group
        assert {k: tuple(v.shape) for k, v in a["q0"].items()} == {"a.weight": (10, 2), "b.weight": (12, 2)}
        outs, err, q = _two_group_reference([a["ins"], b["ins"]], a["q0"], warm, start)
        for t in range(4):
            for g, res in enumerate((a, b)):
                torch.testing.assert_close(res["outs"][t].double(), outs[g][t], atol=2e-5, rtol=2e-5)
            for res in (a, b):
                torch.testing.assert_close(res["outs"][t][60:64], res["ins"][t][60:64], atol=0, rtol=0)  # padding untouched
                torch.testing.assert_close(res["outs"][t][131:], res["ins"][t][131:], atol=0, rtol=0)
        for g, res in enumerate((a, b)):
            for k in CROSS_MATS:
                torch.testing.assert_close(res["errors"][k].double(), err[k][g], atol=2e-5, rtol=2e-5)
                same_q = torch.equal(res["q_end"][k], res["q0"][k])
                assert same_q != warm  # fixed unless warm-started
        # error feedback telescopes: what was applied plus the mean error left is the mean gradient, summed over steps
        for k, ((rows, cols), off) in CROSS_MATS.items():
            sc, tr = CROSS_SCALE[k], rows > cols
            applied = sum(a["outs"][t][off : off + rows * cols].view(rows, cols) for t in range(4)) / sc
            mean_in = sum((a["ins"][t] + b["ins"][t])[off : off + rows * cols].view(rows, cols) for t in range(4)) / (2 * sc)
            left = (a["errors"][k] + b["errors"][k]) / 2
            torch.testing.assert_close(applied + (left.t() if tr else left), mean_in, atol=1e-4, rtol=1e-4)
