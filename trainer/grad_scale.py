"""Per-resblock gradient scaling for fp16 training (Ramesh et al. 2021, section 2.4 and App. D).

One global loss scale must be small enough that the resblock with the largest gradients does not
overflow fp16, so the resblocks with small gradients (in a deep pre-LN transformer, the later ones)
flush many entries to zero. The paper gives every resblock its own scale instead:

    residual stream (fp32)   x ─────────────────────────────(+)──── y = x + f(x)
                             │                               │
                             └─ U_i ── f: ln, fp16 ops ── S_i ┘

`S_i` (`ScaleGrad`) sits at the END of the branch: identity in the forward pass (it casts the
branch output to fp32, so that the add is an fp32 add); in the backward pass it multiplies the
fp32 gradient dL/dy coming into the resblock by the block's scale s_i, then casts it to the
branch's dtype (fp16), so the cast no longer flushes small values. `U_i` (`UnscaleGrad`) sits at
the START of the branch: identity forward; backward it divides the gradient leaving the branch by
s_i, sets Inf and NaN entries to zero ("filter") and records that block i saw them. The identity
path x -> y never passes through S_i or U_i, so it only ever carries true (unscaled) fp32
gradients: dL/dx = dL/dy + U_i(J_f^T S_i(dL/dy)). The filter is what keeps one resblock's
overflow from reaching the blocks before it (App. D: "without this, a nonfinite event in the
current resblock would cause the gradient scales for all preceding resblocks to unnecessarily
drop").

In the DALL-E transformer a resblock (`transformer.Block`, one of `transformer.model.n_layers`)
holds two branches, x + attn(ln_1(x)) and x + mlp(ln_2(x)); both carry the block's one scale.
`wrap_resblocks` installs U_i as a forward pre-hook on each branch's first module (ln_1, ln_2) and
S_i as a forward hook on its last (attn, mlp), so the model file stays unaware of training, and
`PerBlockScaler.remove()` takes the hooks off again.

Parameter gradients inside block i come out multiplied by s_i; `PerBlockScaler.unscale_()`
divides them per block and checks them. Parameters outside the resblocks (embeddings, the final
norm, the logits heads) get their gradients from the fp32 path and are never scaled: they are
only checked for finiteness. The logits heads are run in fp32 (`keep_fp32`); embeddings and layer
norms already are under autocast; gains, biases and every other parameter are stored in fp32
(autocast keeps fp32 master weights and gives fp32 gradients).

The rules (`PerBlockScaler.update`), with M the number of data-parallel replicas:
  * every scale starts at M * 2^13 and is clamped to [M * 2^7, M * 2^24];
  * block i is non-finite when any of its parameter gradients, or the activation gradient leaving
    it, holds an Inf or NaN, on any rank (one all_reduce(MAX) of the flags per step, so every rank
    decides the same);
  * if any block (or any parameter outside the blocks) is non-finite, the whole update is skipped
    on every rank and the skipped count grows; each non-finite block's scale is divided by sqrt(2)
    unless that scale was already divided within the last 125 steps. The finite blocks' scales are
    left as they are: the paper grows a scale "at every parameter update", and a skipped step is
    not one (this is also what makes an overflow move only its own block's scale);
  * otherwise the update is applied and every scale is multiplied by 2^(1/1000).
The 125-step cooldown counts steps (calls of `update`), skipped ones included: counted in applied
updates, a block that keeps overflowing while its cooldown runs would skip every step and the
cooldown would never end.

Use with the training loop (see `PerBlockScaler`); it works with the plain and DDP engines
(autocast fp16 over fp32 weights) and with the sharded layout (tessera.cluster.sharded: FSDP2 within
groups, PowerSGD across them). There FSDP2 replaces the parameters by DTensors after the blocks were
wrapped, so a scaler made by `wrap_resblocks` finds each block's parameters again from its modules at
every `unscale_()` and checks and unscales the local shards of their gradients; the flags are combined
over the whole world, so every rank of every group skips the same updates. `scale_of(fqn)` gives the
engine the scale of the parameter's block, so that its PowerSGD error buffers hold gradient / scale.
DeepSpeed's fp16 mode has its own loss scaler and is not combined with this one.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from tessera.core.errors import CheckpointError, InputError

GROWTH = 2.0 ** (1.0 / 1000.0)
BACKOFF = 2.0**-0.5
COOLDOWN = 125
INIT_LOG2, MIN_LOG2, MAX_LOG2 = 13, 7, 24


class ScaleGrad(torch.autograd.Function):
    """Identity (cast to fp32) forward; backward multiplies the gradient by `scale` and casts it to the input's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.scale, ctx.in_dtype = scale, x.dtype
        return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return (grad.float() * ctx.scale).to(ctx.in_dtype), None


class UnscaleGrad(torch.autograd.Function):
    """Identity forward; backward divides the gradient by `scale`, zeroes Inf/NaN entries and raises found[index] if any."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, found: torch.Tensor, index: int) -> torch.Tensor:
        ctx.scale, ctx.found, ctx.index = scale, found, index
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        finite = torch.isfinite(grad)
        bad = (~finite).any().to(ctx.found.dtype)
        slot = ctx.found[ctx.index : ctx.index + 1]
        torch.maximum(slot, bad.view(1), out=slot)  # no host sync
        out = torch.where(finite, grad.float() / ctx.scale, torch.zeros((), dtype=torch.float32, device=grad.device))
        return out.to(grad.dtype), None, None, None


def _fp32_forward(orig: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    t = next((a for a in args if isinstance(a, torch.Tensor)), None)
    device_type = t.device.type if t is not None else "cpu"
    args = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    with torch.autocast(device_type=device_type, enabled=False):
        return orig(*args, **kwargs)


def keep_fp32(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """Run these modules in fp32 even inside autocast (their forward replaced on the instance); returns those changed.

    A module whose instance already has its own forward is left alone. `PerBlockScaler.remove()`
    restores the modules that `wrap_resblocks` changed."""
    out = []
    for m in modules:
        if "forward" not in m.__dict__:
            m.forward = functools.partial(_fp32_forward, m.forward)
            out.append(m)
    return out


def prenorm_branches(block: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """The (first, last) module of each residual branch of a pre-LN block: (ln_1, attn) and (ln_2, mlp), those it has."""
    pairs = [(getattr(block, a, None), getattr(block, b, None)) for a, b in (("ln_1", "attn"), ("ln_2", "mlp"))]
    pairs = [(a, b) for a, b in pairs if isinstance(a, nn.Module) and isinstance(b, nn.Module)]
    if not pairs:
        raise InputError(f"per-resblock scaling: {type(block).__name__} has no (ln_1, attn) or (ln_2, mlp) branch; pass branches=")
    return pairs


def _dtensor_type() -> type | None:
    """DTensor's class once something imported it (the sharded layout does); before that no DTensor can exist, and not
    importing it saves every other process ~1 s (machine A)."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def _flag_groups(params: Sequence[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]:
    """The gradients of `params` by (device, dtype); of a DTensor (FSDP2's sharded parameters) its local shard, in place."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    DTensor = _dtensor_type()
    for p in params:
        if p.grad is not None:
            if p.grad.is_sparse:
                raise InputError("per-resblock scaling: sparse gradients are not supported")
            g = p.grad.to_local() if DTensor is not None and isinstance(p.grad, DTensor) else p.grad  # a view of this rank's shard
            groups.setdefault((g.device, g.dtype), []).append(g)
    return groups


def _split_params(model: nn.Module, blocks: Sequence[nn.Module]) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """The trainable parameters of each block (each once) and those of `model` outside every block."""
    block_params: list[list[torch.Tensor]] = []
    seen: set[int] = set()
    for b in blocks:
        ps = [p for p in b.parameters() if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in ps)
        block_params.append(ps)
    return block_params, [p for p in model.parameters() if p.requires_grad and id(p) not in seen]


def _check_and_unscale(grads: list[torch.Tensor], found: torch.Tensor, inv: torch.Tensor) -> None:
    """Multiply `grads` by inv[0] in place and raise found[0] to 1 if any holds Inf/NaN (found and inv: 1-element views)."""
    dev = grads[0].device
    if found.device == dev:
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv)
        return
    f = torch.zeros(1, device=dev)
    torch._amp_foreach_non_finite_check_and_unscale_(grads, f, inv.to(dev))
    torch.maximum(found, f.to(found.device), out=found)


def _world(group: Any) -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(group)
    return 1


class PerBlockScaler:
    """One fp16 gradient scale per resblock, with the paper's update rules (module docstring).

    Built by `wrap_resblocks` (which also installs the boundary hooks), or directly from the
    parameters of each block (then the caller applies `ScaleGrad`/`UnscaleGrad` itself). Per step:

        loss.backward()          # or engine.backward(loss); several times for gradient accumulation
        scaler.unscale_()        # block grads divided by their scales; finiteness combined over ranks
        if scaler.update():      # the rules; True when the optimizer may step (the same on every rank)
            engine.step()
        else:
            engine.zero_grad()   # the skipped update

    `scales` (float32 [n_blocks], on the model's device) is what the hooks read; the exact values
    are kept in float64 on the CPU.
    """

    __slots__ = (
        "block_params",
        "rest_params",
        "replicas",
        "device",
        "group",
        "scales",
        "found",
        "steps",
        "skipped",
        "_scales64",
        "_last_divided",
        "_finite",
        "_handles",
        "_fp32_modules",
        "_modules",
        "_block_of",
        "_host_scales",
    )

    def __init__(
        self,
        block_params: Sequence[Sequence[torch.Tensor]],
        rest_params: Sequence[torch.Tensor] = (),
        *,
        replicas: int | None = None,
        device: torch.device | str | None = None,
        group: Any = None,
    ):
        if not block_params:
            raise InputError("per-resblock scaling: no resblocks given")
        self.block_params = [list(ps) for ps in block_params]
        self.rest_params = list(rest_params)
        self.group = group
        self.replicas = int(replicas) if replicas is not None else _world(group)
        if self.replicas < 1:
            raise InputError(f"per-resblock scaling: replicas must be >= 1, got {self.replicas}")
        first = next((p for ps in self.block_params for p in ps), None)
        self.device = torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
        n = len(self.block_params)
        self._scales64 = torch.full((n,), self.replicas * 2.0**INIT_LOG2, dtype=torch.float64)
        self._last_divided = torch.full((n,), -COOLDOWN, dtype=torch.int64)
        self.steps, self.skipped = 0, 0
        self._finite: torch.Tensor | None = None
        self._handles: list[Any] = []
        self._fp32_modules: list[nn.Module] = []
        self._modules: tuple[nn.Module, list[nn.Module]] | None = None  # (model, blocks) when made by wrap_resblocks
        self._block_of: dict[str, int] = {}  # parameter name -> block index (wrap_resblocks)
        self._publish()

    @property
    def n_blocks(self) -> int:
        return len(self.block_params)

    @property
    def bounds(self) -> tuple[float, float]:
        """The clamp range [M * 2^7, M * 2^24]."""
        return self.replicas * 2.0**MIN_LOG2, self.replicas * 2.0**MAX_LOG2

    def _publish(self) -> None:
        """New device tensors for the next backward (new objects, so the previous step's views stay as they were)."""
        self._host_scales = self._scales64.to(torch.float32)
        self.scales = self._host_scales.to(self.device)
        self.found = torch.zeros(self.n_blocks + 1, dtype=torch.float32, device=self.device)

    def scale_of(self, fqn: str) -> float:
        """The current scale (the float32 value the hooks multiply by) of the block holding parameter `fqn`; 1 outside the blocks.

        For the sharded engine's PowerSGD error buffers (`grad_scale=`), which hold gradient / scale.
        Names are those of `model.named_parameters()` when `wrap_resblocks` was called (FSDP2 keeps them)."""
        i = self._block_of.get(fqn)
        return 1.0 if i is None else float(self._host_scales[i])

    def unscale_(self) -> torch.Tensor:
        """After backward: divide block i's parameter gradients by its scale; returns finite flags, bool[n_blocks + 1] (CPU).

        Flag i is False when block i's parameter gradients, or the activation gradient leaving it,
        held an Inf or NaN on any rank; the last flag is the parameters outside the blocks. The
        flags are combined across the ranks of `group` (all_reduce MAX) when torch.distributed is
        initialised, so every rank returns the same.
        """
        if self._finite is not None:
            raise RuntimeError("PerBlockScaler.unscale_() called twice before update()")
        if self._modules is not None:  # the modules' parameters now (FSDP2 replaces them by sharded DTensors after wrapping)
            self.block_params, self.rest_params = _split_params(*self._modules)
        inv = self.scales.double().reciprocal().float()
        one = torch.ones(1, dtype=torch.float32, device=self.device)
        for i, params in enumerate(self.block_params):
            for grads in _flag_groups(params).values():
                _check_and_unscale(grads, self.found[i : i + 1], inv[i : i + 1])
        for grads in _flag_groups(self.rest_params).values():
            _check_and_unscale(grads, self.found[-1:], one)
        if _world(self.group) > 1:
            torch.distributed.all_reduce(self.found, op=torch.distributed.ReduceOp.MAX, group=self.group)
        self._finite = (self.found == 0).cpu()
        return self._finite.clone()

    def update(self, finite: Sequence[bool] | torch.Tensor | None = None) -> bool:
        """Apply the rules to this step's finite flags (default: those of `unscale_`); True when the update may be applied.

        `finite` has one flag per block, optionally followed by the flag of the parameters outside
        the blocks. Every call is one step of the 125-step division cooldown.
        """
        if finite is None:
            if self._finite is None:
                raise RuntimeError("PerBlockScaler.update() without finite flags needs unscale_() first")
            finite = self._finite
        flags = torch.as_tensor(finite, dtype=torch.bool).flatten().cpu()
        n = self.n_blocks
        if flags.numel() not in (n, n + 1):
            raise InputError(f"per-resblock scaling: expected {n} or {n + 1} finite flags, got {flags.numel()}")
        bad = ~flags[:n]
        skip = bool(bad.any()) or (flags.numel() == n + 1 and not bool(flags[n]))
        s = self._scales64
        if skip:
            divide = bad & (self.steps - self._last_divided >= COOLDOWN)
            s = torch.where(divide, s * BACKOFF, s)
            self._last_divided = torch.where(divide, torch.full_like(self._last_divided, self.steps), self._last_divided)
            self.skipped += 1
        else:
            s = s * GROWTH
        lo, hi = self.bounds
        self._scales64 = s.clamp(lo, hi)
        self.steps += 1
        self._finite = None
        self._publish()
        return not skip

    # -- state ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers and lists (loadable with weights_only=True)."""
        return {
            "scales": [float(v) for v in self._scales64],
            "last_divided": [int(v) for v in self._last_divided],
            "steps": int(self.steps),
            "skipped": int(self.skipped),
            "replicas": int(self.replicas),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; scales saved with M' replicas are multiplied by M / M' (and clamped) when resuming on M."""
        try:
            scales = torch.tensor([float(v) for v in state["scales"]], dtype=torch.float64)
            last = torch.tensor([int(v) for v in state["last_divided"]], dtype=torch.int64)
            steps, skipped, saved_m = int(state["steps"]), int(state["skipped"]), int(state.get("replicas", self.replicas))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"per-resblock grad-scale state is malformed ({type(e).__name__}: {e})") from None
        if scales.numel() != self.n_blocks or last.numel() != self.n_blocks:
            raise CheckpointError(f"per-resblock grad-scale state has {scales.numel()} scales, the model has {self.n_blocks} resblocks")
        if not bool(torch.isfinite(scales).all()) or bool((scales <= 0).any()) or saved_m < 1:
            raise CheckpointError("per-resblock grad-scale state holds a non-positive or non-finite scale")
        lo, hi = self.bounds
        self._scales64 = (scales * (self.replicas / saved_m)).clamp(lo, hi)
        self._last_divided, self.steps, self.skipped = last, steps, skipped
        self._finite = None
        self._publish()

    def metrics(self) -> dict[str, float | int]:
        """For metrics.jsonl and TensorBoard: grad_scale/min, /max, /block_XX (one per block) and /skipped."""
        width = max(2, len(str(self.n_blocks - 1)))
        out: dict[str, float | int] = {"grad_scale/min": float(self._scales64.min()), "grad_scale/max": float(self._scales64.max())}
        out.update({f"grad_scale/block_{i:0{width}d}": float(v) for i, v in enumerate(self._scales64)})
        out["grad_scale/skipped"] = int(self.skipped)
        return out

    def remove(self) -> None:
        """Take off the hooks of `wrap_resblocks` and give back the fp32-kept modules' own forward."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for m in self._fp32_modules:
            m.__dict__.pop("forward", None)
        self._fp32_modules.clear()


def _install(scaler: PerBlockScaler, index: int, first: nn.Module, last: nn.Module) -> None:
    def unscale_in(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not torch.is_grad_enabled() or not args or not isinstance(args[0], torch.Tensor):
            return None
        return (UnscaleGrad.apply(args[0], scaler.scales[index], scaler.found, index), *args[1:])

    def scale_out(module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
        if not torch.is_grad_enabled() or not isinstance(out, torch.Tensor):
            return None
        return ScaleGrad.apply(out, scaler.scales[index])

    scaler._handles.append(first.register_forward_pre_hook(unscale_in))
    scaler._handles.append(last.register_forward_hook(scale_out))


def wrap_resblocks(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    *,
    branches: Callable[[nn.Module], list[tuple[nn.Module, nn.Module]]] = prenorm_branches,
    fp32_modules: Iterable[nn.Module] = (),
    replicas: int | None = None,
    group: Any = None,
) -> PerBlockScaler:
    """Give each of `blocks` (resblocks of `model`, e.g. `model.blocks`) its own gradient scale; returns the scaler.

    `branches(block)` names each residual branch by its first and last module (default: the
    pre-LN (ln_1, attn), (ln_2, mlp)); the gradient is scaled at the last module's output and
    unscaled and filtered at the first module's input. `fp32_modules` (e.g. the logits heads) run
    in fp32 inside autocast. `replicas` is M of the rules (default: the world size of `group`).
    Parameters of `model` outside the blocks are checked for finiteness but not scaled.
    """
    blocks = list(blocks)
    block_params, rest = _split_params(model, blocks)
    first = next(model.parameters(), None)
    scaler = PerBlockScaler(block_params, rest, replicas=replicas, device=first.device if first is not None else None, group=group)
    scaler._modules = (model, blocks)
    index = {id(p): i for i, ps in enumerate(block_params) for p in ps}
    scaler._block_of = {n: index[id(p)] for n, p in model.named_parameters() if id(p) in index}
    for i, b in enumerate(blocks):
        for entry, exit_ in branches(b):
            _install(scaler, i, entry, exit_)
    scaler._fp32_modules.extend(keep_fp32(fp32_modules))
    return scaler


__all__ = [
    "PerBlockScaler",
    "ScaleGrad",
    "UnscaleGrad",
    "wrap_resblocks",
    "prenorm_branches",
    "keep_fp32",
    "GROWTH",
    "BACKOFF",
    "COOLDOWN",
]
