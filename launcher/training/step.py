"""One optimizer step, and the batches it reads: global sample indices -> tokens on the device,
the same data for any number of ranks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from data_pipeline.gpt_dataset import BlendedSamples
from launcher.monitoring.metrics import StepLoss
from launcher.monitoring.timing import StepTimer
from launcher.training.schedule import rank_sample_indices


@dataclass
class Batches:
    """One rank's batches of one dataset."""

    samples: BlendedSamples
    micro_batch_size: int
    grad_accum_steps: int
    dp_size: int
    dp_rank: int
    device: torch.device
    sequence_size: int = 1
    """Sequence-parallel ranks: each reads its slice of every sequence."""
    sequence_rank: int = 0

    def train(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = rank_sample_indices(
            step,
            micro_step,
            self.micro_batch_size,
            self.grad_accum_steps,
            self.dp_size,
            self.dp_rank,
        )
        return self._load(idx)

    def val(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        # The same val samples at every evaluation, so the curve compares like with like.
        idx = rank_sample_indices(batch, 0, self.micro_batch_size, 1, self.dp_size, self.dp_rank)
        return self._load(idx)

    def _load(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        window = torch.from_numpy(self.samples.batch(idx))
        x, y = window[:, :-1], window[:, 1:]
        if self.sequence_size > 1:  # this rank's contiguous slice of the positions
            width = x.size(1) // self.sequence_size
            start = self.sequence_rank * width
            x, y = x[:, start : start + width], y[:, start : start + width]
        x, y = x.contiguous(), y.contiguous()
        if self.device.type == "cuda":
            return (
                x.pin_memory().to(self.device, non_blocking=True),
                y.pin_memory().to(self.device, non_blocking=True),
            )
        return x, y


def train_step(
    engine: Any,
    batches: Any,
    step: int,
    accum: int,
    timer: StepTimer | None = None,
    backward_scale: float = 1.0,
) -> StepLoss:
    """One optimizer step of `accum` micro-batches; `batches` is anything with
    `.train(step, micro_step) -> (x, y)`. With a timer, each micro-step is marked (no sync).
    `backward_scale`: what each rank's loss is multiplied by for backward
    (`sequence_parallel.backward_scale`: DeepSpeed sums the gradients of a sequence's slices);
    the loss reported is unscaled."""
    losses = []
    for micro in range(accum):
        start = timer.mark() if timer else None
        x, y = batches.train(step, micro)
        _, loss = engine(x, y)
        forward = timer.mark() if timer and timer.detailed else None
        engine.backward(loss * backward_scale if backward_scale != 1.0 else loss)
        engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        if timer:
            timer.micro_step(start, forward, timer.mark())
        losses.append(loss.detach().float())
    return StepLoss(torch.stack(losses).mean(), losses[-1])
