"""Learning-rate, KL-weight and temperature schedules (pure functions of the step)."""

from __future__ import annotations

import math


def cosine(step: int, start: float, end: float, steps: int) -> float:
    """Cosine interpolation from `start` (step 0) to `end` (step >= steps)."""
    if steps <= 0 or step >= steps:
        return end
    t = max(step, 0) / steps
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def warmup_cosine(step: int, peak: float, final: float, warmup: int, total: int) -> float:
    """Linear warm-up 0 -> peak over `warmup` steps, then cosine peak -> final until `total`."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    return cosine(step - warmup, peak, final, max(total - warmup, 1))


class Plateau:
    """Multiply the rate by `factor` when the monitored loss has not improved for `patience` checks."""

    def __init__(self, lr: float, factor: float = 0.5, patience: int = 3, min_lr: float = 0.0):
        self.lr, self.factor, self.patience, self.min_lr = lr, factor, patience, min_lr
        self.best = math.inf
        self.bad = 0

    def step(self, loss: float) -> float:
        if loss < self.best:
            self.best, self.bad = loss, 0
        else:
            self.bad += 1
            if self.bad > self.patience:
                self.lr = max(self.lr * self.factor, self.min_lr)
                self.bad = 0
        return self.lr

    def state_dict(self) -> dict:
        return {"lr": self.lr, "best": self.best, "bad": self.bad}

    def load_state_dict(self, d: dict) -> None:
        self.lr, self.best, self.bad = d["lr"], d["best"], d["bad"]
