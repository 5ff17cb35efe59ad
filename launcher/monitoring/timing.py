"""Step timing without synchronising: CUDA events on GPUs (read once per log record after one
synchronise), wall-clock marks on CPUs."""

from __future__ import annotations

import time
from typing import Any

import torch


class StepTimer:
    """Marks in the step (start, forward done, backward+step done) without synchronising.

    On GPUs marks are CUDA events, read once per log line after one synchronise; on CPUs they
    are wall-clock times.
    """

    def __init__(self, device: torch.device, detailed: bool) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.detailed = detailed
        self.steps: list[list[tuple[Any, Any, Any]]] = []  # per step: (start, fwd, bwd) per micro

    def begin_step(self) -> None:
        """A new optimizer step starts: its micro-steps' marks follow."""
        self.steps.append([])

    def micro_step(self, start: Any, forward: Any, end: Any) -> None:
        """One micro-step's marks: start, forward done (None unless detailed), backward done."""
        self.steps[-1].append((start, forward, end))

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _seconds(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) / 1000.0 if self.cuda else b - a

    def collect(self) -> dict[str, float]:
        """Sums over the steps since the last call: step, forward and backward seconds."""
        if self.cuda:
            torch.cuda.synchronize()
        out = {"step": 0.0, "forward": 0.0, "backward": 0.0, "last_step": 0.0, "steps": 0}
        for micro in self.steps:
            step_time = self._seconds(micro[0][0], micro[-1][2])
            out["step"] += step_time
            out["last_step"] = step_time
            out["steps"] += 1
            for start, fwd, bwd in micro:
                if fwd is not None:
                    out["forward"] += self._seconds(start, fwd)
                    out["backward"] += self._seconds(fwd, bwd)
        self.steps = []
        return out
