"""Sequence parallelism for long contexts: DeepSpeed-Ulysses (Jacobs et al., 2023) around the
GPT's attention.

Each of the `parallel.sequence` ranks of a replica holds a contiguous slice of every sequence
(its positions offset accordingly) and runs the whole block on it, except attention: there an
all-to-all trades the sequence slices of all heads for whole sequences of a share of the heads
(DeepSpeed's `DistributedAttention`), each rank attends causally over the whole sequence for
its heads, and a second all-to-all gives every rank its slice back. Weights are replicated over
the sequence ranks; DeepSpeed reduces their gradients over the sequence x data ranks. At ZeRO
stages 0-2 it divides by the data-parallel size only, so each rank backpropagates its slice's
mean loss divided by the sequence size (`backward_scale`): together the mean over the whole
sequence. ZeRO-3 divides by the sequence x data ranks itself (scale 1), and must partition the
parameters over those same ranks (`engine.build_engine`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from model.gpt import GPT


def backward_scale(sequence: int, zero_stage: int) -> float:
    """What each rank's loss is multiplied by for backward (see the module's docstring)."""
    return 1.0 if sequence == 1 or zero_stage == 3 else 1.0 / sequence


class UlyssesAttention:
    """A block's `sequence_mixer`: q, k, v of this rank's slice (B, heads, T / n, d) in, the
    attention output for it out, through DeepSpeed's DistributedAttention."""

    def __init__(self, attn: Any, group: Any) -> None:
        from deepspeed.sequence.layer import DistributedAttention

        self.attn = attn
        # (B, T, heads, d): scatter the heads (dim 2), gather the sequence (dim 1).
        self.distributed = DistributedAttention(self._local, group, scatter_idx=2, gather_idx=1)

    def _local(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Whole sequences of this rank's heads, (B, T, heads / n, d)."""
        y = self.attn.core(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return y.transpose(1, 2)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        return self.distributed(q, k, v, 0).transpose(1, 2)


def enable(model: GPT, group: Any, rank: int, size: int) -> None:
    """Every block's attention through Ulysses; this rank's slice starts at rank x T / size."""
    for block in model.transformer.h:
        block.attn.sequence_mixer = UlyssesAttention(block.attn, group)
    model.position_offset = rank * (model.config.block_size // size)


@contextlib.contextmanager
def whole_sequences(model: GPT) -> Iterator[None]:
    """Within: every rank runs whole sequences by itself (sampling, downstream tasks), as
    without sequence parallelism; the weights are the same on every sequence rank."""
    blocks = list(model.transformer.h)
    mixers = [block.attn.sequence_mixer for block in blocks]
    offset = model.position_offset
    for block in blocks:
        block.attn.sequence_mixer = None
    model.position_offset = 0
    try:
        yield
    finally:
        for block, mixer in zip(blocks, mixers):
            block.attn.sequence_mixer = mixer
        model.position_offset = offset
