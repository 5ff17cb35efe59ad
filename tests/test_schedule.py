"""LR schedule and batch arithmetic: pure functions of the step."""

from __future__ import annotations

import numpy as np
import pytest

from launcher.config.ds_config import global_batch_size
from launcher.config.spec import TrainConfig
from launcher.training.schedule import lr_at, rank_sample_indices


def test_warmup_rises_linearly_to_peak() -> None:
    t = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100)
    warm = [lr_at(s, t) for s in range(10)]
    assert warm[0] > 0
    assert all(b > a for a, b in zip(warm, warm[1:]))
    assert lr_at(10, t) == pytest.approx(1e-3)


def test_cosine_decays_to_min_lr_and_stays() -> None:
    t = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100)
    decay = [lr_at(s, t) for s in range(10, 101)]
    assert all(b <= a for a, b in zip(decay, decay[1:]))
    assert lr_at(55, t) == pytest.approx(0.5 * (1e-3 + 1e-4))  # half-way point of the cosine
    assert lr_at(100, t) == pytest.approx(1e-4)
    assert lr_at(500, t) == pytest.approx(1e-4)


def test_explicit_decay_steps() -> None:
    t = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=100, lr_decay_steps=50)
    assert lr_at(0, t) == pytest.approx(1.0)
    assert lr_at(50, t) == pytest.approx(0.0)


def test_batch_arithmetic() -> None:
    assert global_batch_size(8, 4, 16) == 512


@pytest.mark.parametrize("micro,accum,ranks", [(4, 1, 2), (2, 2, 2), (1, 2, 4), (8, 1, 1)])
def test_every_layout_reads_the_same_samples_per_step(micro: int, accum: int, ranks: int) -> None:
    # Global batch 8 however it is split: step s reads exactly samples [8s, 8s + 8), each once.
    for step in range(3):
        read = [
            rank_sample_indices(step, m, micro, accum, ranks, r)
            for m in range(accum)
            for r in range(ranks)
        ]
        assert sorted(np.concatenate(read).tolist()) == list(range(8 * step, 8 * step + 8))
