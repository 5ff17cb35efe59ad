"""Training samples: across documents, shuffled by epoch, cached, blended, resumable anywhere."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.gpt_dataset import Blend, BlendedSamples, DocumentRange, GPTSamples, carve
from data_pipeline.indexed import IndexedDataset, IndexedDatasetWriter
from launcher.training.step import Batches

SEQ = 16


@pytest.fixture
def dataset(tmp_path: Path) -> IndexedDataset:
    """40 documents of varied lengths whose tokens encode (document, position)."""
    rng = np.random.default_rng(0)
    writer = IndexedDatasetWriter(tmp_path / "docs", np.dtype(np.int32))
    for d in range(40):
        n = int(rng.integers(3, 60))
        writer.add_documents(d * 1000 + np.arange(n), np.array([n]))
    writer.finalize()
    return IndexedDataset(tmp_path / "docs")


def samples(dataset: IndexedDataset, cache: Path, seed: int = 7, seq: int = SEQ) -> GPTSamples:
    return GPTSamples(DocumentRange(dataset, 0, dataset.num_documents), seq, seed, cache)


def test_samples_span_documents_and_each_epoch_covers_the_data_once(dataset, tmp_path) -> None:
    s = samples(dataset, tmp_path / "cache")
    s.prepare(2 * s.samples_per_epoch)
    assert s.samples_per_epoch == (dataset.num_tokens - 1) // SEQ
    for epoch in range(2):
        rows = [s.sample(epoch * s.samples_per_epoch + j) for j in range(s.samples_per_epoch)]
        assert all(len(r) == SEQ + 1 for r in rows)
        # Consecutive samples of the epoch stream overlap by one token and tile it exactly.
        order = s._load(epoch)[0]
        stream = np.concatenate([dataset[int(i)] for i in order])
        shuffle = s._load(epoch)[2]
        for j, row in enumerate(rows):
            k = shuffle[j]
            assert np.array_equal(row, stream[k * SEQ : (k + 1) * SEQ + 1])
        starts = sorted(int(shuffle[j]) * SEQ for j in range(len(rows)))
        assert starts == list(range(0, s.samples_per_epoch * SEQ, SEQ))
    crosses = sum(len({int(t) // 1000 for t in s.sample(j)}) > 1 for j in range(50))
    assert crosses > 10  # samples run across document boundaries
    first, second = (s._load(e)[0] for e in range(2))
    assert not np.array_equal(first, second)  # each epoch shuffles documents anew


def test_order_is_fixed_by_the_seed(dataset, tmp_path) -> None:
    a, b = samples(dataset, tmp_path / "a"), samples(dataset, tmp_path / "b")
    c = samples(dataset, tmp_path / "c", seed=8)
    idx = range(0, 3 * a.samples_per_epoch, 7)
    assert all(np.array_equal(a.sample(i), b.sample(i)) for i in idx)
    assert not all(np.array_equal(a.sample(i), c.sample(i)) for i in idx)


def test_index_cache_is_reused_and_rebuilt_when_its_key_changes(dataset, tmp_path) -> None:
    cache = tmp_path / "cache"
    first = samples(dataset, cache)
    first.prepare(3 * first.samples_per_epoch)
    assert first.built_epochs == [0, 1, 2]
    files = sorted(cache.glob("*.npy"))
    assert len(files) == 9  # docs, samples, shuffle for each of 3 epochs
    again = samples(dataset, cache)
    again.prepare(3 * again.samples_per_epoch)
    assert again.built_epochs == []  # all loaded from the cache
    more = samples(dataset, cache)
    more.prepare(4 * more.samples_per_epoch)
    assert more.built_epochs == [3]  # a longer run indexes only what is new
    for changed in (samples(dataset, cache, seed=99), samples(dataset, cache, seq=8)):
        changed.prepare(1)
        assert changed.built_epochs == [0]
    assert len(list(cache.glob("*.npy"))) == 12 + 3 + 3


def test_other_ranks_wait_for_the_builder(dataset, tmp_path) -> None:
    cache = tmp_path / "cache"
    waiter = samples(dataset, cache)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (waiter.prepare(10, is_builder=False), done.set()))
    thread.start()
    assert not done.wait(0.5)  # nothing built yet: the non-builder waits
    samples(dataset, cache).prepare(10)
    thread.join(timeout=10)
    assert done.is_set() and waiter.built_epochs == []


def test_carve_takes_the_last_documents_for_val(dataset) -> None:
    train, val = carve(dataset, 0.1)
    assert (train.start, train.stop, val.start, val.stop) == (0, 36, 36, 40)
    with pytest.raises(ValueError, match="cannot carve"):
        carve(dataset, 0.0)


@pytest.mark.parametrize(
    "weights", [[0.5, 0.5], [0.7, 0.2, 0.1], [1, 2, 3, 4, 5], [0.001, 0.999], [3.14159, 2.71828]]
)
def test_blend_follows_weights_over_every_prefix_and_window(weights) -> None:
    blend = Blend(weights)
    n = 50_000
    source, within = blend.locate(np.arange(n))
    share = np.asarray(weights, dtype=float) / sum(weights)
    for d in range(len(weights)):
        counts = np.cumsum(source == d)
        assert np.abs(counts - share[d] * np.arange(1, n + 1)).max() < 1 + 1e-4 * n / 65_536
        for length in (7, 100, 1000):
            window = counts[length:] - counts[:-length]
            assert np.abs(window - share[d] * length).max() < 2
        # Within-source indices count up from 0 without gaps.
        assert np.array_equal(within[source == d], np.arange((source == d).sum()))
    assert np.array_equal(blend.source_counts(n), np.bincount(source, minlength=len(weights)))


def test_exact_counts_for_simple_weights() -> None:
    blend = Blend([0.7, 0.2, 0.1])
    assert blend.period == 10
    source, _ = blend.locate(np.arange(1000))
    for start in range(0, 1000, 10):
        assert np.bincount(source[start : start + 10], minlength=3).tolist() == [7, 2, 1]


def test_blended_progress_reports_tokens_and_epochs(dataset, tmp_path) -> None:
    a = samples(dataset, tmp_path / "a")
    b = samples(dataset, tmp_path / "b", seed=3)
    blended = BlendedSamples([a, b], [3, 1], ["a", "b"])
    progress = blended.progress(400)
    assert progress["a"]["tokens"] == 300 * SEQ and progress["b"]["tokens"] == 100 * SEQ
    assert progress["a"]["epoch"] == pytest.approx(300 / a.samples_per_epoch)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_resumed_batches_equal_uninterrupted_ones_at_any_world_size(
    dataset, tmp_path, world_size
) -> None:
    """Global batch of 8 sequences: the same tokens per step for 1, 2 or 4 ranks, and a run
    resumed at step k (new objects, position = consumed samples) reads what the uninterrupted
    run would have read."""
    blended = BlendedSamples([samples(dataset, tmp_path / "c")], [1.0], ["docs"])
    reference = BlendedSamples([samples(dataset, tmp_path / "c")], [1.0], ["docs"])
    micro, accum = 8 // world_size // 2, 2

    def step_tokens(source: BlendedSamples, step: int) -> list[list[int]]:
        rows = []
        for rank in range(world_size):
            batches = Batches(source, micro, accum, world_size, rank, torch.device("cpu"))
            for m in range(accum):
                x, y = batches.train(step, m)
                rows += [xr.tolist() + yr[-1:].tolist() for xr, yr in zip(x, y)]
        return sorted(rows)

    single = Batches(reference, 8, 1, 1, 0, torch.device("cpu"))
    for step in range(12):  # spans several epochs of this small dataset
        x, y = single.train(step, 0)
        expected = sorted(xr.tolist() + yr[-1:].tolist() for xr, yr in zip(x, y))
        resumed = BlendedSamples([samples(dataset, tmp_path / "c")], [1.0], ["docs"])
        assert step_tokens(blended, step) == expected
        assert step_tokens(resumed, step) == expected
