"""Overfitting: val loss rising above its best for several evaluations while train may fall."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from launcher.config.spec import EvalConfig


@dataclass
class OverfitDetector:
    """Fires once when val has been above its best by more than min_delta for `patience`
    evaluations in a row (while train may keep falling)."""

    patience: int
    min_delta: float
    best_val: float = math.inf
    best_step: int = -1
    rises: int = 0
    fired_at: int | None = None

    def update(self, step: int, val: float) -> bool:
        """Take one evaluation; True when this one makes the detector fire."""
        if val < self.best_val:
            self.best_val, self.best_step, self.rises = val, step, 0
        elif val > self.best_val + self.min_delta:
            self.rises += 1
        else:
            self.rises = 0
        if self.rises >= self.patience and self.fired_at is None:
            self.fired_at = step
            return True
        return False

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def resume(cls, config: EvalConfig, saved: dict) -> OverfitDetector:
        """A detector continuing a checkpoint's state; the spec's patience and delta win."""
        return cls(**{**saved, "patience": config.patience, "min_delta": config.min_delta})
