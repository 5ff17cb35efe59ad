"""Pure functions of the step: the learning rate, and which samples each rank reads."""

from __future__ import annotations

import math

import numpy as np

from launcher.config.ds_config import global_batch_size
from launcher.config.spec import TrainConfig


def lr_at(step: int, train: TrainConfig) -> float:
    """Linear warmup to train.lr, then cosine decay to train.min_lr at lr_decay_steps.

    `step` counts optimizer steps already taken, so the first update uses lr_at(0) > 0.
    """
    decay_steps = train.lr_decay_steps or train.max_steps
    if step < train.warmup_steps:
        return train.lr * (step + 1) / (train.warmup_steps + 1)
    if step >= decay_steps:
        return train.min_lr
    progress = (step - train.warmup_steps) / max(1, decay_steps - train.warmup_steps)
    return train.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (train.lr - train.min_lr)


def rank_sample_indices(
    step: int, micro_step: int, micro_batch: int, grad_accum: int, dp_size: int, dp_rank: int
) -> np.ndarray:
    """Global sample indices one rank reads for one micro-step of one optimizer step.

    Step s consumes exactly [s*G, (s+1)*G) with G = micro_batch * grad_accum * dp_size, whatever
    the number of ranks: the data a step sees depends only on s and G.
    """
    global_batch = global_batch_size(micro_batch, grad_accum, dp_size)
    start = step * global_batch + (micro_step * dp_size + dp_rank) * micro_batch
    return np.arange(start, start + micro_batch)
