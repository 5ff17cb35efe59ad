"""Divergence: a loss or gradient norm that is not finite stops the run before it is saved.

Every step's loss (and DeepSpeed's global gradient norm, where it computes one) is checked on
the device: the first step whose value is NaN or infinite is kept in a device tensor, with no
host sync, and travels to every rank with the stop check's lagged all-reduce, so every rank
stops at the same boundary, one step later. Before every save a synchronous check adds the
parameters themselves: a non-finite state is never written as a tag, and `best`, `latest` and
rotation only ever see finite ones.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

STEP_LIMIT = 2**24
"""Steps are carried as STEP_LIMIT - step in float32 (exact below 2**24), so that the all-reduce's
maximum is the earliest step any rank saw."""


class Diverged(Exception):
    """Training produced a non-finite loss, gradient norm or parameter: nothing more is saved."""

    def __init__(self, step: int, what: str) -> None:
        super().__init__(f"{what} at step {step}")
        self.step, self.what = step, what


class DivergenceWatch:
    """The first step whose loss or gradient norm was not finite, on the device."""

    def __init__(self, device: torch.device, watch_grad_norm: bool) -> None:
        """`watch_grad_norm`: False under fp16 loss scaling, where an overflowing gradient
        norm is routine (DeepSpeed skips that step and lowers the scale)."""
        self.device, self.watch_grad_norm = device, watch_grad_norm
        self.encoded = torch.zeros((), device=device)

    def observe(self, step: int, loss: torch.Tensor, grad_norm: Any = None) -> None:
        """Note step `step`'s loss (a device tensor) and DeepSpeed's gradient norm (a float,
        a tensor or None); never waits for the device."""
        bad = ~torch.isfinite(loss.detach().float())
        if self.watch_grad_norm and grad_norm is not None:
            if isinstance(grad_norm, torch.Tensor):
                bad = bad | ~torch.isfinite(grad_norm.detach().float().to(self.device))
            elif not math.isfinite(float(grad_norm)):
                bad = torch.ones_like(bad)
        mark = torch.full_like(self.encoded, float(STEP_LIMIT - min(step, STEP_LIMIT - 1)))
        self.encoded = torch.where(bad & (self.encoded == 0), mark, self.encoded)

    def check_now(self, module: torch.nn.Module, step: int) -> None:
        """Before a save: raise Diverged on every rank if any rank has seen a non-finite loss or
        gradient norm, or holds a non-finite parameter (one all-reduce, a sync)."""
        params = nonfinite_parameters(module, self.device).float()
        flags = torch.stack([self.encoded, params])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        seen, params = flags.tolist()
        if seen:
            raise Diverged(decode(seen), "the loss or gradient norm is not finite")
        if params:
            raise Diverged(step, "a parameter is not finite")


def decode(value: float) -> int:
    """The step an all-reduced flag of DivergenceWatch names (0: none)."""
    return STEP_LIMIT - int(value) if value else 0


def nonfinite_parameters(module: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """Whether any parameter this rank holds is NaN or infinite (a device bool; under ZeRO-3
    each rank checks its own partition)."""
    held = [getattr(p, "ds_tensor", p) for p in module.parameters()]
    held = [t for t in held if t.numel()]
    if not held:
        return torch.zeros((), dtype=torch.bool, device=device)
    return torch.stack([(~torch.isfinite(t).all()).to(device) for t in held]).any()


def advice(
    error: Diverged, last_finite: tuple[int, float] | None, good_tag: str | None, grad_clip: float
) -> str:
    """The message every rank agrees on: what happened, the last finite loss, what to try."""
    last = (
        f"the last finite train loss was {last_finite[1]:.4f} at step {last_finite[0]}"
        if last_finite
        else "no finite train loss was logged in this launch"
    )
    clip = (
        f"train.grad_clip={grad_clip:g} (lower it)"
        if grad_clip
        else "train.grad_clip=1.0 (clipping is off)"
    )
    resume = (
        f"resume from {good_tag} (the newest good checkpoint: the same command resumes from it)"
        if good_tag
        else "start again (no checkpoint was saved)"
    )
    return (
        f"training diverged: {error}; {last}. No checkpoint of this state was saved. Try a lower "
        f"train.lr, more train.warmup_steps or {clip}, and {resume}"
    )
