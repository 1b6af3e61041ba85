"""Parameter EMA (exponential moving average), used for evaluation and export."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Keeps `shadow = decay * shadow + (1 - decay) * param` for floating-point parameters and buffers."""

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

    def copy_to(self, model: nn.Module) -> None:
        """Load the EMA weights into `model` (other entries, e.g. integer buffers, untouched)."""
        sd = model.state_dict()
        for k, v in self.shadow.items():
            sd[k].copy_(v.to(sd[k].dtype))
