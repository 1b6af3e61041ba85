"""PowerSGD gradient all-reduce: a standalone reducer over a list of gradients, and a DDP comm hook.

PowerSGD (Vogels, Karimireddy and Jaggi 2019, "PowerSGD: Practical Low-Rank Gradient Compression
for Distributed Optimization", Algorithm 1) replaces the all-reduce of each gradient matrix
M [m, n] by all-reduces of two thin factors P [m, r] and Q [n, r], found by one step of power
iteration warm-started from the previous step's Q. Each step, for every worker:

  1. Split the gradients: tensors with 2+ dims are viewed as matrices [shape[0], rest] and
     compressed when m*n / ((m + n) * r) >= min_compression_rate; the rest (biases, norms, tiny
     matrices) are flattened into one buffer and all-reduced uncompressed (mean).
  2. Error feedback: M <- grad + error, where error is what this worker's previous compressed
     updates failed to transmit (Vogels et al. Sec. 3, "error feedback"; Karimireddy et al. 2019).
  3. P <- M Q, with Q from the previous step (warm start, Sec. 3) or, the first time, drawn from a
     seeded normal distribution so every worker starts from the same Q.
  4. All-reduce P (sum). Linearity makes this (sum_w M_w) Q.
  5. Orthogonalize P. The paper uses Gram-Schmidt; the DALL-E authors (Ramesh et al. 2021,
     App. D) found it unstable and used Householder orthogonalization of P plus a small multiple
     of the identity; that is what `tessera.kernels.powersgd.orthogonalize` does (eps = 1e-6).
  6. Q <- M^T P.
  7. All-reduce Q and divide by the world size: Q = mean_w(M_w)^T P.
  8. Decompress and update the error in one pass: out = P Q^T (the estimate of the mean
     gradient, identical on every worker), error = M - out (this worker's local M).
  9. Write `out` into the gradients; wait for the uncompressed all-reduce and write it back.

Steps 3, 5, 6 and 8 are batched over matrices of equal shape, and use the Triton kernels of
`kernels/powersgd.py` on CUDA (backend "auto") or their torch references (the CPU path).

Further DALL-E App. D details (fp16 error buffers with their own format, compression applied per
parameter shard inside ZeRO) are not reproduced here: the error is kept in fp32, and the reducer
works on whatever gradient list it is given.

Until `start_iter` steps have passed, gradients are all-reduced uncompressed (as torch's
powerSGD_hook does: early gradients change fast and the error feedback has nothing to build on).

A step is one call of `reduce` with `last=True` (the DDP hook passes `bucket.is_last()`, so a
step is one backward pass however many buckets DDP has). The reducer counts what it hands to
all-reduce: `bytes_sent_last_step` (P, Q and the uncompressed tensors) against
`bytes_dense_last_step` (what a plain all-reduce of the same gradients would hand over), per rank.
A step whose all-reduced P is not finite (an fp16 overflow on any rank) resets the error buffers
and Qs, so one bad step does not poison the following ones; its gradients come out non-finite
and a loss scaler skips it.

With parameter names (`param_names`, which the DDP engine gives: id(parameter) -> name; the hook passes each
bucket's names) the error buffers and Qs belong to the parameters, not to the buckets: a list planned anew
(DDP rebuilds its buckets after the first step, in the order the gradients became ready) takes over each
parameter's error and Q, and `error_state()` / `q_state()` / `load_state()` give them by name for checkpoints
(tessera.cluster.engine saves the error buffers as the paper does: summed over the ranks, and each rank resumes
from the mean; the Qs are the same on every rank). Without names a new list starts from a fresh error and Q.
"""

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from tessera.kernels import powersgd as K


@dataclass
class _GroupState:
    """Matrices of one shape, batched: their indices in the gradient list, error and Q."""

    indices: list[int]
    m: int
    n: int
    rank: int
    names: list[str] | None = None  # the parameters' names, when the reducer knows them
    error: torch.Tensor | None = None  # fp32 [N, m, n]
    q: torch.Tensor | None = None  # fp32 [N, n, r]


@dataclass
class _ListState:
    signature: tuple
    groups: list[_GroupState] = field(default_factory=list)
    uncompressed: list[int] = field(default_factory=list)


class PowerSGDReducer:
    """Averages a list of gradients across a process group with rank-`rank` PowerSGD compression.

    `reduce(grads, key)` modifies `grads` in place; `key` names the list (a DDP bucket index), so
    that error buffers and warm-started Qs persist per list between steps.
    """

    def __init__(
        self,
        rank: int = 4,
        min_compression_rate: float = 2.0,
        start_iter: int = 0,
        use_error_feedback: bool = True,
        warm_start: bool = True,
        eps: float = K.EPS,
        seed: int = 0,
        backend: str = "auto",
        process_group=None,
        param_names: dict[int, str] | None = None,
    ):
        if rank < 1 or rank > K.MAX_RANK:
            raise ValueError(f"rank must be in 1..{K.MAX_RANK}, got {rank}")
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
        self.rank = rank
        self.min_compression_rate = min_compression_rate
        self.start_iter = start_iter
        self.use_error_feedback = use_error_feedback
        self.warm_start = warm_start
        self.eps = eps
        self.seed = seed
        self.backend = backend
        self.process_group = process_group
        self.step = 0
        self.elements_uncompressed = 0  # what a plain all-reduce would have sent, cumulative
        self.elements_sent = 0  # what was sent
        self.bytes_sent_last_step = 0  # handed to all-reduce in the last complete step (this rank)
        self.bytes_dense_last_step = 0  # what an uncompressed all-reduce of the same gradients hands over
        self.skipped_nonfinite = 0  # steps whose compressed state was reset after a non-finite P
        self._step_sent = 0
        self._step_dense = 0
        self._states: dict[object, _ListState] = {}
        self.param_names = dict(param_names or {})  # id(parameter) -> name (ddp_comm_hook passes each bucket's names)
        self._restored: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}  # load_state's, until a step uses them
        self._retired: list[_ListState] = []  # named lists planned anew in this step (their rows may move to a later list)
        self._fresh: set = set()  # keys reduced with compression in this step

    # -- helpers -------------------------------------------------------------------------------
    def _world(self) -> int:
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(self.process_group)
        return 1

    def _all_reduce(self, t: torch.Tensor, async_op: bool = False):
        if self._world() > 1:
            return dist.all_reduce(t, group=self.process_group, async_op=async_op)
        return None

    def _ops(self, device: torch.device):
        use_triton = self.backend == "triton" or (self.backend == "auto" and K.HAS_TRITON and device.type == "cuda")
        if use_triton:
            return K.project, K.orthogonalize, K.decompress_with_error
        return K.project_reference, K.orthogonalize_reference, K.decompress_with_error_reference

    @property
    def compression_ratio(self) -> float:
        return self.elements_uncompressed / max(self.elements_sent, 1)

    def _plan(self, grads: list[torch.Tensor], key, names: list[str] | None = None) -> _ListState:
        signature = tuple((tuple(g.shape), g.dtype, g.device) for g in grads) + (tuple(names) if names else ())
        old = self._states.get(key)
        if old is not None and old.signature == signature:
            return old
        # new (or rebuilt, e.g. DDP's bucket rebuild after step 1) list: fresh error and Q, or, with names, each parameter's own
        if old is not None and names:
            self._retired.append(old)
        state = _ListState(signature=signature)
        by_shape: dict[tuple, list[int]] = {}
        for i, g in enumerate(grads):
            if g.dim() >= 2:
                m = g.shape[0]
                n = g.numel() // max(m, 1)
                r = min(self.rank, m, n)
                if m * n >= self.min_compression_rate * (m + n) * r:
                    by_shape.setdefault((m, n, r), []).append(i)
                    continue
            state.uncompressed.append(i)
        for (m, n, r), idx in sorted(by_shape.items()):
            state.groups.append(_GroupState(indices=idx, m=m, n=n, rank=r, names=[names[i] for i in idx] if names else None))
        if names:
            # a parameter not yet reduced in this step has its row in a list not reduced in this step, in a list planned anew
            # in this step, or in load_state's
            rows = self._rows([*self._retired, *(st for k, st in self._states.items() if k not in self._fresh)])
            rows = {**self._restored, **rows}
            for gs in state.groups:
                self._adopt(gs, rows, grads[gs.indices[0]].device)
        self._states[key] = state
        return state

    @staticmethod
    def _rows(states) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
        """name -> (error [m, n] or None, Q [n, r] or None): views into the named groups of `states`."""
        out = {}
        for st in states:
            for gs in st.groups:
                for j, name in enumerate(gs.names or ()):
                    out[name] = (None if gs.error is None else gs.error[j], None if gs.q is None else gs.q[j])
        return out

    def _fresh_q(self, gs: _GroupState, device: torch.device) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + gs.m * 7919 + gs.n)
        return torch.randn(len(gs.indices), gs.n, gs.rank, generator=gen).to(device)

    def _adopt(self, gs: _GroupState, rows: dict, device: torch.device) -> None:
        """The group's error and Q stacked from its parameters' rows (copies); a missing error is zero, a missing Q fresh."""
        errs = [rows.get(name, (None, None))[0] for name in gs.names]
        errs = [e if e is not None and tuple(e.shape) == (gs.m, gs.n) else None for e in errs]
        if any(e is not None for e in errs):
            zero = torch.zeros(gs.m, gs.n, device=device)
            gs.error = torch.stack([zero if e is None else e.detach().to(device, torch.float32) for e in errs])
        qs = [rows.get(name, (None, None))[1] for name in gs.names]
        qs = [q if q is not None and tuple(q.shape) == (gs.n, gs.rank) else None for q in qs]
        if any(q is not None for q in qs):
            gs.q = self._fresh_q(gs, device)
            for j, q in enumerate(qs):
                if q is not None:
                    gs.q[j].copy_(q)

    def error_state(self) -> dict[str, torch.Tensor]:
        """This rank's error buffers by parameter name (views, [m, n]); named lists only. After a step: one row per parameter."""
        return {name: e for name, (e, _) in self._rows(self._states.values()).items() if e is not None}

    def q_state(self) -> dict[str, torch.Tensor]:
        """The warm-start Qs by parameter name (views, [n, r]; the same on every rank: all-reduced); named lists only."""
        return {name: q for name, (_, q) in self._rows(self._states.values()).items() if q is not None}

    def load_state(self, errors: dict[str, torch.Tensor], qs: dict[str, torch.Tensor]) -> None:
        """Resume: the next step plans its lists anew and takes these rows by parameter name (the rest start fresh)."""
        self._states.clear()
        self._restored = {name: (errors.get(name), qs.get(name)) for name in {*errors, *qs}}

    # -- the algorithm (numbered as in the module docstring) --------------------------------------
    def _count(self, t: torch.Tensor) -> None:
        self.elements_sent += t.numel()
        self._step_sent += t.numel() * t.element_size()

    def _end_step(self) -> None:
        self.bytes_sent_last_step, self.bytes_dense_last_step = self._step_sent, self._step_dense
        self._step_sent = self._step_dense = 0
        self.step += 1
        if self._fresh:  # a compressed step: named lists it did not reduce are gone (fewer buckets after a rebuild)
            stale = [k for k, st in self._states.items() if k not in self._fresh and any(gs.names for gs in st.groups)]
            for k in stale:
                del self._states[k]
            self._restored = {}
        self._retired.clear()
        self._fresh.clear()

    @torch.no_grad()
    def reduce(self, grads: list[torch.Tensor], key=0, last: bool = True, names: list[str] | None = None) -> None:
        """Average `grads` in place; `last` ends the step (False for all but the last DDP bucket of a backward pass);
        `names`: the gradients' parameter names (their error buffers and Qs follow them)."""
        grads = [g for g in grads]
        if grads:
            self.elements_uncompressed += sum(g.numel() for g in grads)
            self._step_dense += sum(g.numel() * g.element_size() for g in grads)
            if self.step < self.start_iter:
                flat = torch.cat([g.reshape(-1) for g in grads])
                self._all_reduce(flat)
                flat /= self._world()
                _scatter(flat, grads)
                self._count(flat)
            else:
                self._reduce_compressed(grads, key, names)
        if last:
            self._end_step()

    def _reduce_compressed(self, grads: list[torch.Tensor], key, names: list[str] | None) -> None:
        world = self._world()

        # 1. split
        state = self._plan(grads, key, names)
        self._fresh.add(key)
        device = grads[0].device
        project, orthogonalize, decompress = self._ops(device)
        work = None
        if state.uncompressed:
            flat = torch.cat([grads[i].reshape(-1) for i in state.uncompressed])
            work = self._all_reduce(flat, async_op=True)  # overlaps with steps 2-3
            self._count(flat)

        # 2. M = grad + error
        mats = []
        for gs in state.groups:
            M = torch.stack([grads[i].reshape(gs.m, gs.n).float() for i in gs.indices])
            if self.use_error_feedback and gs.error is not None:
                M += gs.error
            mats.append(M)
            if gs.q is None or not self.warm_start:
                gs.q = self._fresh_q(gs, device)

        if state.groups:
            # 3. P = M Q, 4. all-reduce P
            ps = [project(M, gs.q) for M, gs in zip(mats, state.groups)]
            p_flat = torch.cat([p.reshape(-1) for p in ps])
            self._all_reduce(p_flat)
            finite = bool(torch.isfinite(p_flat).all())  # the same on every rank: P is all-reduced
            _scatter(p_flat, ps)
            # 5. orthogonalize P, 6. Q = M^T P, 7. all-reduce Q (mean)
            qs = []
            for M, p, gs in zip(mats, ps, state.groups):
                orthogonalize(p, self.eps)
                qs.append(project(M, p, transpose=True, out=gs.q))
            q_flat = torch.cat([q.reshape(-1) for q in qs])
            self._all_reduce(q_flat)
            q_flat /= world
            _scatter(q_flat, qs)
            self._count(p_flat)
            self._count(q_flat)
            # 8. out = P Q^T, error = M - out (one pass), 9. write back
            for M, p, gs in zip(mats, ps, state.groups):
                if self.use_error_feedback:
                    if gs.error is None:
                        gs.error = torch.empty_like(M)
                    decompress(M, p, gs.q, out=M, error=gs.error)
                else:
                    decompress(M, p, gs.q, out=M)
                for j, i in enumerate(gs.indices):
                    grads[i].copy_(M[j].reshape(grads[i].shape))
            if not finite:
                self.skipped_nonfinite += 1
                for gs in state.groups:
                    gs.error, gs.q = None, None

        if work is not None:
            work.wait()
        if state.uncompressed:
            flat /= world
            _scatter(flat, [grads[i] for i in state.uncompressed])


def _scatter(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view(t.shape))
        offset += n


def ddp_comm_hook(reducer: PowerSGDReducer, bucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: `ddp_model.register_comm_hook(reducer, ddp_comm_hook)`.

    The bucket's per-parameter gradients are views into its flat buffer, so reducing them in place
    reduces the buffer, which is what DDP expects back. Collectives run synchronously here (the
    uncompressed part overlaps with the compressed part's local compute).
    """
    names = [reducer.param_names[id(p)] for p in bucket.parameters()] if reducer.param_names else None
    reducer.reduce(bucket.gradients(), key=bucket.index(), last=bucket.is_last(), names=names)
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def compression_floor(m: int, n: int, rank: int, bytes_per_element: int = 4) -> dict:
    """What one matrix needs per step, the floor a measured time is compared against.

    FLOPs: the two projections and the decompression are 2*m*n*r each; orthogonalization is
    O(m*r^2). Bytes: M is read by each projection and by the decompression, which also writes the
    output and the error: 5 passes over m*n elements (P and Q are negligible for small r).
    """
    return {
        "flops": 3 * 2 * m * n * rank + 4 * m * rank * rank,
        "bytes": 5 * bytes_per_element * m * n,
        "sent_elements": (m + n) * rank,
        "dense_elements": m * n,
    }
