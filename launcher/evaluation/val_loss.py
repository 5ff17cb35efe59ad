"""Held-out loss during training, measured on every rank (under ZeRO-3 all ranks must take part
in every forward)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


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
