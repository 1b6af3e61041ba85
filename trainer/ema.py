"""Parameter EMA (exponential moving average), used for evaluation and export."""

from __future__ import annotations

import sys

import torch
from torch import nn


class EMA:
    """Keeps `shadow = decay * shadow + (1 - decay) * param` for floating-point parameters and buffers.

    On the sharded layout (FSDP2) the parameters are DTensors, and so are their shadows: each rank keeps the EMA of its own
    shards (the engine checkpoints them with the parameters' shards); `full_state_dict` gathers them for evaluation."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.dtype.is_floating_point}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.decay
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for k, v in sd.items():
            self.shadow[k] = v.detach().clone().float()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The shadows whole: DTensor shards all-gathered (a collective: every rank calls it), plain tensors as they are."""
        DTensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)  # as grad_scale._dtensor_type
        if DTensor is None:  # not imported: no DTensor can exist (the sharded layout imports it)
            return dict(self.shadow)
        return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in self.shadow.items()}

    def copy_to(self, model: nn.Module, shadow: dict[str, torch.Tensor] | None = None) -> None:
        """Load the EMA weights (`shadow`, default this EMA's own) into `model` (other entries, e.g. integer buffers, untouched)."""
        sd = model.state_dict()
        for k, v in (self.shadow if shadow is None else shadow).items():
            sd[k].copy_(v.to(sd[k].dtype))
