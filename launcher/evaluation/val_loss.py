"""Held-out loss, measured on every rank (under ZeRO-3 all ranks must take part in every
forward): during training (`evaluate`), and over any number of samples at any world size for
`zerolaunch eval` (`dataset_loss`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data_pipeline.gpt_dataset import BlendedSamples


def all_reduce_mean(value: torch.Tensor) -> float:
    value = value.detach().float().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value.item() / dist.get_world_size()


@torch.no_grad()
def evaluate(engine: Any, batches: Any, n_batches: int) -> float:
    """Mean val loss over n_batches micro-batches per rank, averaged over ranks; `batches` is
    anything with `.val(batch) -> (x, y)`."""
    engine.eval()
    losses = []
    for b in range(n_batches):
        x, y = batches.val(b)
        _, loss = engine(x, y)
        losses.append(loss.float())
    engine.train()
    return all_reduce_mean(torch.stack(losses).mean())


def rank_share(n: int, rank: int, world_size: int, micro_batch_size: int) -> tuple[list, int]:
    """Rank `rank`'s micro-batches of global indices [0, n) (strided over the ranks), and how
    many forwards every rank makes: the most any rank needs (ZeRO-3 gathers parameters in
    every forward, so no rank may skip one)."""
    mine = list(range(rank, n, world_size))
    batches = [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
    per_rank = math.ceil(n / world_size)
    most = math.ceil(per_rank / micro_batch_size)
    return batches, most


@torch.no_grad()
def dataset_loss(
    forward: Callable[[torch.Tensor], torch.Tensor],
    samples: BlendedSamples,
    n_samples: int,
    micro_batch_size: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[float, int]:
    """(mean cross-entropy per token, tokens) over the first n_samples samples, whatever the
    ranks and micro-batch size: each rank sums its share's token losses in float64, the sums are
    all-reduced. `forward(x)` returns the logits of every position."""
    batches, most = rank_share(n_samples, rank, world_size, micro_batch_size)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(most):
        idx = batches[i] if i < len(batches) else [0]  # a forward for the others' sake only
        window = torch.from_numpy(samples.batch(np.asarray(idx))).to(device)
        x, y = window[:, :-1], window[:, 1:]
        logits = forward(x).float()
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
        if i < len(batches):
            total += torch.stack([loss.double(), torch.tensor(y.numel(), device=device).double()])
    if world_size > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return (total[0] / total[1]).item(), int(total[1].item())
