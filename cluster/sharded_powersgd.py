"""PowerSGD across groups of ranks, on FSDP2's reduce-scattered gradient shards (DALL-E paper section 2.5, App. E).

Within a group (a node) FSDP2 shards the parameters and reduce-scatters the gradients (the mean over
the group); `CrossGroupReducer.reduce` is then called, through `FSDPModule.set_all_reduce_hook`, with
the group's flat reduce-scatter output of one FSDP unit (a resblock, or the root). It averages that
output across the groups, over a process group of the ranks with the same local ordinal, in place:

- Shards of gradient matrices (parameters with 2+ dims; FSDP shards dim 0, so the local shard of an
  [m, n] weight is [ceil(m/k) or fewer, n]) are compressed with rank-r PowerSGD, batched over shards
  of one shape, oriented so that the rows are the smaller side (then r = rows is full rank):
    M = shard gradient / scale(fqn) + error     (fp32; scale: the resblock's gradient scale, default 1)
    P = M Q                                     (Q: a fixed Gaussian [n, r], drawn once from seed and fqn,
                                                 the same on every same-ordinal rank; no warm start)
    all-reduce P (sum); P <- Householder QR of P + 1e-6 I (kernels.powersgd.orthogonalize)
    Q' = M^T P; all-reduce Q' (sum) / groups
    out = P Q'^T (fp32), error = M - out       (kernels.powersgd.decompress_with_error, one pass)
    error <- 0 where it is not finite           (the only time it is zeroed: an overflowed step)
    shard gradient <- out * scale(fqn)         (back in the caller's units)
- Embeddings, gains and biases (1-D parameters, parameters of nn.Embedding modules, names matching
  the engine's pattern) are all-reduced uncompressed in fp32, as is everything when rank is 0.

Two options that are not the issue's default (both off): `warm_start` (Q <- the previous step's all-reduced
Q', the PowerSGD paper's default) and `start_iter` (a unit's first `start_iter` reductions are fp32
all-reduces, as torch's powerSGD_hook does). At rank 4 of d_model 128 neither closes the gap to the
uncompressed loss; the rank does (bench/results/powersgd_quality.md).

The error buffers live in unscaled units, so they stay valid when the loss scales change. Checkpoints keep them as the
paper does: `error_sums` (the sum over the same-ordinal ranks) and, on resume, `load_error_sums` (the sum divided by the
number of groups, broadcast); the DDP engine's PowerSGD reducer (tessera.cluster.engine) checkpoints its buffers with both. The
torch references of kernels/powersgd.py run on CPU, the Triton kernels on CUDA (backend "auto").

Bytes: `StepBytes` counts what each rank hands to the cross-group collectives (payload, fp32), and
what an uncompressed fp32 all-reduce of the same shards would have handed; a ring all-reduce puts
2 (G-1)/G times the payload on the wire per rank.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from tessera.kernels import powersgd as K

ELEMENT_BYTES = 4  # everything sent across groups is fp32


def paper_compression_rate(rank: int, d_model: int) -> float:
    """The paper's compression rate of the cross-node traffic, 1 - 5 r / (8 d_model)."""
    return 1.0 - 5.0 * rank / (8.0 * d_model)


@dataclass
class Slot:
    """One parameter's local shard inside an FSDP unit's flat reduce-scatter output."""

    fqn: str
    offset: int  # elements from the start of the flat output
    shape: tuple[int, ...]  # the local shard (its real rows; padding rows follow it up to padded_numel)
    padded_numel: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def matrix(self, flat: torch.Tensor) -> torch.Tensor:
        rows = self.shape[0]
        return flat[self.offset : self.offset + self.numel].view(rows, self.numel // max(rows, 1))


@dataclass
class Batch:
    """Compressed shards of one oriented shape [m, n] (m <= n), with their fixed Q and error buffers."""

    slots: list[Slot]
    m: int
    n: int
    r: int
    transpose: bool  # the shard is [n, m]: compress its transpose
    q: torch.Tensor  # fp32 [N, n, r], fixed
    error: torch.Tensor  # fp32 [N, m, n]


@dataclass
class UnitPlan:
    """What one FSDP unit's hook does: its flat size, its compressed batches and its dense slots."""

    name: str
    numel: int
    batches: list[Batch] = field(default_factory=list)
    dense: list[Slot] = field(default_factory=list)
    reductions: int = 0  # calls of `reduce` so far (start_iter counts these)


@dataclass
class StepBytes:
    compressed: int = 0  # P and Q' payload bytes
    uncompressed: int = 0  # dense fp32 payload bytes
    dense_equivalent: int = 0  # an fp32 all-reduce of every shard
    compressed_dense_equivalent: int = 0  # an fp32 all-reduce of the compressed shards only

    def add(self, other: "StepBytes") -> None:
        for k in ("compressed", "uncompressed", "dense_equivalent", "compressed_dense_equivalent"):
            setattr(self, k, getattr(self, k) + getattr(other, k))


class CrossGroupReducer:
    """Averages FSDP units' reduce-scatter outputs across `n_groups` groups over `group` (same-ordinal ranks)."""

    def __init__(
        self,
        rank: int,
        group: dist.ProcessGroup | None,
        n_groups: int,
        *,
        scale: Callable[[str], float] | None = None,
        seed: int = 0,
        eps: float = K.EPS,
        backend: str = "auto",
        device: torch.device | None = None,
        warm_start: bool = False,
        start_iter: int = 0,
    ):
        if rank < 0 or rank > K.MAX_RANK:
            raise ValueError(f"PowerSGD rank must be in 0..{K.MAX_RANK}, got {rank}")
        if start_iter < 0:
            raise ValueError(f"PowerSGD start_iter must be >= 0, got {start_iter}")
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
        self.rank = rank
        self.group = group
        self.n_groups = n_groups
        self.scale = scale
        self.seed = seed
        self.eps = eps
        self.backend = backend
        self.device = device or torch.device("cpu")
        self.warm_start = warm_start  # not the issue's default: Q <- the previous step's all-reduced Q' (Vogels et al.)
        self.start_iter = start_iter  # not the default: a unit's first start_iter reductions are uncompressed
        self.plans: dict[str, UnitPlan] = {}
        self.bytes = StepBytes()  # since the last `take_bytes`

    # -- planning (once, at wrap time) -----------------------------------------------------------
    def plan(self, name: str, slots: list[Slot], dense_fqns: set[str]) -> UnitPlan:
        numel = sum(s.padded_numel for s in slots)
        unit = UnitPlan(name=name, numel=numel)
        by_shape: dict[tuple[int, int, bool], list[Slot]] = {}
        for s in slots:
            if s.numel == 0:
                continue  # this ordinal holds no rows of it (dim 0 smaller than the group)
            if self.rank == 0 or len(s.shape) < 2 or s.fqn in dense_fqns:
                unit.dense.append(s)
                continue
            rows, cols = s.shape[0], s.numel // s.shape[0]
            key = (min(rows, cols), max(rows, cols), rows > cols)
            by_shape.setdefault(key, []).append(s)
        for (m, n, transpose), group in sorted(by_shape.items()):
            r = min(self.rank, m)
            qs = [_fixed_q(self.seed, s.fqn, n, r) for s in group]
            unit.batches.append(
                Batch(
                    slots=group,
                    m=m,
                    n=n,
                    r=r,
                    transpose=transpose,
                    q=torch.stack(qs).to(self.device),
                    error=torch.zeros(len(group), m, n, device=self.device),
                )
            )
        self.plans[name] = unit
        return unit

    def hook(self, name: str) -> Callable[[torch.Tensor], None]:
        return lambda flat: self.reduce(flat, self.plans[name])

    # -- the reduction --------------------------------------------------------------------------------
    def _ops(self):
        use_triton = self.backend == "triton" or (self.backend == "auto" and K.HAS_TRITON and self.device.type == "cuda")
        if use_triton:
            return K.project, K.orthogonalize, K.decompress_with_error
        return K.project_reference, K.orthogonalize_reference, K.decompress_with_error_reference

    def _all_reduce(self, t: torch.Tensor, async_op: bool = False):
        return dist.all_reduce(t, group=self.group, async_op=async_op)

    @torch.no_grad()
    def reduce(self, flat: torch.Tensor, unit: UnitPlan) -> None:
        if self.n_groups <= 1:
            return
        if flat.numel() != unit.numel:
            raise RuntimeError(
                f"FSDP unit '{unit.name}': reduce-scatter output has {flat.numel()} elements, expected {unit.numel} "
                "(a parameter without a gradient this step? the cross-group hook needs every parameter to get one)"
            )
        warming = unit.reductions < self.start_iter
        unit.reductions += 1
        dense = unit.dense + [s for b in unit.batches for s in b.slots] if warming else unit.dense
        work, buf = None, None
        if dense:
            buf = torch.cat([s.matrix(flat).reshape(-1).float() for s in dense])
            work = self._all_reduce(buf, async_op=True)  # overlaps with the projections
            self.bytes.uncompressed += buf.numel() * ELEMENT_BYTES
            self.bytes.dense_equivalent += buf.numel() * ELEMENT_BYTES
        if unit.batches and not warming:
            self._compressed(flat, unit.batches)
        if work is not None:
            work.wait()
            buf /= self.n_groups
            offset = 0
            for s in dense:
                s.matrix(flat).view(-1).copy_(buf[offset : offset + s.numel])
                offset += s.numel

    def _compressed(self, flat: torch.Tensor, batches: list[Batch]) -> None:
        project, orthogonalize, decompress = self._ops()
        mats, scales = [], []
        for b in batches:
            sc = torch.tensor([float(self.scale(s.fqn)) if self.scale else 1.0 for s in b.slots], device=self.device).view(-1, 1, 1)
            views = [s.matrix(flat) for s in b.slots]
            M = torch.stack([v.t() if b.transpose else v for v in views]).float() / sc
            M += b.error
            mats.append(M)
            scales.append(sc)
        ps = [project(M, b.q) for M, b in zip(mats, batches)]
        p_flat = torch.cat([p.reshape(-1) for p in ps])
        self._all_reduce(p_flat)
        _unflatten(p_flat, ps)
        qs = []
        for M, p in zip(mats, ps):
            orthogonalize(p, self.eps)
            qs.append(project(M, p, transpose=True))
        q_flat = torch.cat([q.reshape(-1) for q in qs])
        self._all_reduce(q_flat)
        q_flat /= self.n_groups
        _unflatten(q_flat, qs)
        if self.warm_start:  # the next step starts its power iteration from this one's Q' (identical on every group)
            finite = bool(torch.isfinite(q_flat).all())
            for b, q in zip(batches, qs):
                b.q.copy_(q if finite else torch.stack([_fixed_q(self.seed, s.fqn, b.n, b.r) for s in b.slots]))
        self.bytes.compressed += (p_flat.numel() + q_flat.numel()) * ELEMENT_BYTES
        for M, p, q, b, sc in zip(mats, ps, qs, batches, scales):
            dense = M.numel() * ELEMENT_BYTES
            self.bytes.dense_equivalent += dense
            self.bytes.compressed_dense_equivalent += dense
            decompress(M, p, q, out=M, error=b.error)  # fp32
            bad = ~torch.isfinite(b.error).flatten(1).all(dim=1)
            if bool(bad.any()):
                b.error[bad] = 0.0
            M *= sc
            for j, s in enumerate(b.slots):
                v = s.matrix(flat)
                v.copy_(M[j].t() if b.transpose else M[j])

    # -- bytes and state --------------------------------------------------------------------------------
    def take_bytes(self) -> StepBytes:
        out, self.bytes = self.bytes, StepBytes()
        return out

    def expected_bytes(self) -> StepBytes:
        """What one full backward pass sends across groups, from the plans (the formula `reduce` must meet)."""
        out = StepBytes()
        if self.n_groups <= 1:
            return out
        for unit in self.plans.values():
            dense = sum(s.numel for s in unit.dense)
            out.uncompressed += dense * ELEMENT_BYTES
            out.dense_equivalent += dense * ELEMENT_BYTES
            for b in unit.batches:
                out.compressed += len(b.slots) * (b.m + b.n) * b.r * ELEMENT_BYTES
                out.dense_equivalent += len(b.slots) * b.m * b.n * ELEMENT_BYTES
                out.compressed_dense_equivalent += len(b.slots) * b.m * b.n * ELEMENT_BYTES
        return out

    def error_state(self) -> dict[str, torch.Tensor]:
        """This rank's error buffers by parameter name (views, oriented [m, n])."""
        return {s.fqn: b.error[j] for unit in self.plans.values() for b in unit.batches for j, s in enumerate(b.slots)}


def error_sums(errors: dict[str, torch.Tensor], group: dist.ProcessGroup | None) -> dict[str, torch.Tensor]:
    """The checkpoint entry of PowerSGD error buffers, as the paper keeps them: each buffer summed over the ranks of `group`
    (the same-ordinal ranks of the groups in the sharded layout; every rank under DDP). A collective: every rank of `group`
    calls it with the same names. Copies; the buffers are untouched."""
    out = {k: errors[k].detach().clone() for k in sorted(errors)}
    if _group_size(group) > 1:
        for t in out.values():
            dist.all_reduce(t, group=group)
    return out


@torch.no_grad()
def load_error_sums(
    errors: dict[str, torch.Tensor], sums: dict[str, torch.Tensor], group: dist.ProcessGroup | None, n_summed: int, src: int
) -> None:
    """Resume from `error_sums`: every buffer of `errors` <- its sum / `n_summed` (the number of ranks that summed it), computed on
    global rank `src` and broadcast over `group`. The mean keeps the sum over the ranks, on which alone the compressed updates
    depend, so they go on as before (exactly in real arithmetic). A collective: every rank of `group` calls it with the same names."""
    for k in sorted(errors):
        e = errors[k]
        if _group_size(group) == 1 or dist.get_rank() == src:
            e.copy_(sums[k] / n_summed)
        if _group_size(group) > 1:
            dist.broadcast(e, src=src, group=group)


def _group_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _fixed_q(seed: int, fqn: str, n: int, r: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(fqn.encode()))
    return torch.randn(n, r, generator=gen)


def _unflatten(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()
