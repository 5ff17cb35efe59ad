"""Training samples from indexed datasets: shuffled, across document boundaries, blendable.

A sample is `seq_len + 1` consecutive tokens of an epoch's stream, in which the documents of a
split are concatenated in an order shuffled by (seed, epoch); samples start every `seq_len`
tokens and are themselves shuffled by (seed, epoch). Every epoch of a split holds the same number
of samples S, so global sample i lives in epoch i // S: the order is a pure function of i, the
same for any number of ranks and any `max_steps`, and a checkpoint needs only the count of
samples consumed.

The per-epoch index arrays are cached beside the data as `.npy` (keyed by dataset, split, seq
length, seed and epoch), built by local rank 0 of each node while the other ranks wait.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from data_pipeline.indexed import IndexedDataset, bin_path, idx_path

INDEX_VERSION = 1
WAIT_TIMEOUT_S = 3600.0


class SampleIndexError(ValueError):
    """The data cannot provide samples as configured; the message says what to change."""


@dataclass(frozen=True)
class DocumentRange:
    """Documents [start, stop) of an indexed dataset: a train or val split of it."""

    dataset: IndexedDataset
    start: int
    stop: int

    def sequences(self) -> np.ndarray:
        doc_index = self.dataset.doc_index
        return np.arange(doc_index[self.start], doc_index[self.stop], dtype=np.int64)

    def describe(self) -> str:
        return f"{self.dataset.prefix} documents [{self.start}, {self.stop})"


def carve(dataset: IndexedDataset, val_fraction: float) -> tuple[DocumentRange, DocumentRange]:
    """(train, val): the last round(val_fraction x documents) documents (at least one) are val."""
    n = dataset.num_documents
    n_val = max(1, round(val_fraction * n))
    if val_fraction <= 0 or n_val >= n:
        raise SampleIndexError(
            f"{dataset.prefix}: cannot carve a val split of {val_fraction:.3g} from "
            f"{n} document(s); need val_fraction > 0 and at least one document left for training "
            "(or give data.val separately)"
        )
    return DocumentRange(dataset, 0, n - n_val), DocumentRange(dataset, n - n_val, n)


def _cache_key(split: DocumentRange, seq_len: int, seed: int) -> str:
    ds = split.dataset
    identity = {
        "prefix": str(ds.prefix.resolve()),
        "idx": [idx_path(ds.prefix).stat().st_size, idx_path(ds.prefix).stat().st_mtime_ns],
        "bin": bin_path(ds.prefix).stat().st_size,
        "documents": [split.start, split.stop],
        "seq_len": seq_len,
        "seed": seed,
        "version": INDEX_VERSION,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


class GPTSamples:
    """Samples of one document range; epochs are built on demand and cached."""

    def __init__(self, split: DocumentRange, seq_len: int, seed: int, cache_dir: Path) -> None:
        self.split, self.seq_len, self.seed = split, seq_len, seed
        self.cache_dir, self.is_builder = Path(cache_dir), True
        self.sequences = split.sequences()
        dataset = split.dataset
        self.lengths = dataset.sizes[self.sequences].astype(np.int64)
        self.starts = dataset.token_offsets()[self.sequences]
        self.tokens = dataset.tokens
        total = int(self.lengths.sum())
        self.samples_per_epoch = (total - 1) // seq_len
        if self.samples_per_epoch < 1:
            raise SampleIndexError(
                f"{split.describe()} holds {total} tokens, fewer than one sample of "
                f"{seq_len + 1}; use a smaller model.block_size or more data"
            )
        self.key = _cache_key(split, seq_len, seed)
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.built_epochs: list[int] = []  # epochs this process built (not loaded from cache)

    def epochs_for(self, num_samples: int) -> int:
        return -(-num_samples // self.samples_per_epoch)

    def _paths(self, epoch: int) -> tuple[Path, Path, Path]:
        stem = self.cache_dir / f"{self.key}_e{epoch}"
        return Path(f"{stem}_docs.npy"), Path(f"{stem}_samples.npy"), Path(f"{stem}_shuffle.npy")

    def _build(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch, INDEX_VERSION])
        order = rng.permutation(len(self.sequences))
        ends = np.cumsum(self.lengths[order])
        positions = np.arange(self.samples_per_epoch + 1, dtype=np.int64) * self.seq_len
        doc_pos = np.searchsorted(ends, positions, side="right")
        offsets = positions - (ends[doc_pos] - self.lengths[order][doc_pos])
        samples = np.stack([doc_pos, offsets], axis=1).astype(np.int64)
        shuffle = rng.permutation(self.samples_per_epoch).astype(np.int64)
        return order.astype(np.int64), samples, shuffle

    def prepare(self, num_samples: int, is_builder: bool = True) -> None:
        """Build (builder) or wait for (others) the index of every epoch num_samples needs."""
        from tqdm import tqdm

        self.is_builder = is_builder
        epochs = tqdm(
            range(self.epochs_for(num_samples)),
            desc=f"sample index of {self.split.describe()}",
            unit="epoch",
            disable=None if is_builder else True,  # a terminal only, and one rank per node
            delay=2.0,  # quiet when the cache already holds it
            leave=False,
        )
        for epoch in epochs:
            self._load(epoch)

    def _load(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if epoch in self._epochs:
            return self._epochs[epoch]
        paths = self._paths(epoch)
        if not paths[-1].exists():
            if self.is_builder:
                self._write(epoch, paths)
            else:
                self._wait_for(paths[-1])
        arrays = tuple(np.load(p, mmap_mode="r") for p in paths)
        self._epochs[epoch] = arrays
        return arrays

    def _write(self, epoch: int, paths: tuple[Path, Path, Path]) -> None:
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            for path, array in zip(paths, self._build(epoch)):  # the shuffle file lands last
                _save_atomic(path, array)
        except OSError as e:
            raise SampleIndexError(
                f"cannot write the sample index cache in {self.cache_dir} ({e}); set "
                "data.index_cache to a writable directory"
            ) from e
        self.built_epochs.append(epoch)

    def _wait_for(self, path: Path) -> None:
        deadline = time.monotonic() + WAIT_TIMEOUT_S
        while not path.exists():
            if time.monotonic() > deadline:
                raise SampleIndexError(f"timed out waiting for local rank 0 to build {path}")
            time.sleep(0.2)

    def sample(self, index: int) -> np.ndarray:
        """The seq_len + 1 tokens of sample `index` (any epoch)."""
        epoch, j = divmod(int(index), self.samples_per_epoch)
        order, samples, shuffle = self._load(epoch)
        k = shuffle[j]
        (p0, o0), (p1, o1) = samples[k], samples[k + 1]
        if p0 == p1:
            start = self.starts[order[p0]]
            return self.tokens[start + o0 : start + o1 + 1]
        pieces = [self._doc(order[p0])[o0:]]
        pieces += [self._doc(order[p]) for p in range(p0 + 1, p1)]
        pieces.append(self._doc(order[p1])[: o1 + 1])
        return np.concatenate(pieces)

    def _doc(self, i: int) -> np.ndarray:
        start = self.starts[i]
        return self.tokens[start : start + self.lengths[i]]


class Blend:
    """Global sample i -> (source, index within source), following the weights exactly.

    The weights become exact fractions (`0.7, 0.2, 0.1` is 7:2:1); the period P is the least
    common denominator (weights that need more than 2**17 are rounded to counts out of 65,536).
    Each period is laid out by the greedy rule of Megatron's blending helper (pick the source
    furthest behind its share), so every period holds exactly each source's count and no prefix
    strays a whole sample from its share.
    """

    MAX_PERIOD = 1 << 17
    FALLBACK_PERIOD = 1 << 16

    def __init__(self, weights: list[float]) -> None:
        if len(weights) == 0 or any(w <= 0 for w in weights):
            raise SampleIndexError(f"blend weights must be positive, got {weights}")
        self.counts = self._counts(weights)
        self.period = int(self.counts.sum())
        self.weights = self.counts / self.period
        self.pattern = self._layout(self.counts)
        one_hot = np.zeros((self.period + 1, len(weights)), dtype=np.int64)
        one_hot[np.arange(1, self.period + 1), self.pattern] = 1
        self.prefix_counts = np.cumsum(one_hot, axis=0)  # samples of each source before r

    def _counts(self, weights: list[float]) -> np.ndarray:
        """Integer samples per source per period, in the exact ratio of the weights."""
        exact = [Fraction(str(w)).limit_denominator(10**6) for w in weights]
        shares = [w / sum(exact) for w in exact]
        period = math.lcm(*(f.denominator for f in shares))
        if period <= self.MAX_PERIOD:
            return np.array([int(f * period) for f in shares], dtype=np.int64)
        scaled = np.array([float(f) for f in shares]) * self.FALLBACK_PERIOD
        counts = np.floor(scaled).astype(np.int64)
        remainder = self.FALLBACK_PERIOD - int(counts.sum())
        counts[np.argsort(-(scaled - counts), kind="stable")[:remainder]] += 1
        if (counts == 0).any():
            raise SampleIndexError(f"a blend weight is below 1/{self.FALLBACK_PERIOD}: {weights}")
        return counts

    @staticmethod
    def _layout(counts: np.ndarray) -> np.ndarray:
        period = int(counts.sum())
        taken = np.zeros(len(counts), dtype=np.int64)
        pattern = np.empty(period, dtype=np.int64)
        for i in range(period):  # deficit after i+1 samples: counts_d * (i+1) - period * taken_d
            d = int(np.argmax(counts * (i + 1) - period * taken))
            pattern[i] = d
            taken[d] += 1
        return pattern

    def source_counts(self, num_samples: int) -> np.ndarray:
        """Samples drawn from each source among global samples [0, num_samples)."""
        periods, rest = divmod(int(num_samples), self.period)
        return periods * self.counts + self.prefix_counts[rest]

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, index within that source) of each global sample index."""
        indices = np.asarray(indices, dtype=np.int64)
        periods, rest = np.divmod(indices, self.period)
        source = self.pattern[rest]
        within = periods * self.counts[source] + self.prefix_counts[rest, source]
        return source, within


class BlendedSamples:
    """One or more weighted sources behind a single global sample index."""

    def __init__(self, sources: list[GPTSamples], weights: list[float], names: list[str]) -> None:
        self.sources, self.names = sources, names
        self.blend = Blend(weights)

    def prepare(self, num_samples: int, is_builder: bool = True) -> None:
        """Index every epoch the first num_samples samples need (see GPTSamples.prepare)."""
        for source, count in zip(self.sources, self.blend.source_counts(num_samples)):
            source.prepare(int(count), is_builder)

    def batch(self, indices: np.ndarray) -> np.ndarray:
        """(len(indices), seq_len + 1) int64 tokens."""
        source, within = self.blend.locate(indices)
        rows = [self.sources[s].sample(j) for s, j in zip(source.tolist(), within.tolist())]
        return np.stack(rows).astype(np.int64)

    def progress(self, consumed_samples: int) -> dict[str, dict[str, float]]:
        """Per source: tokens consumed and epochs completed, after `consumed_samples` samples."""
        counts = self.blend.source_counts(consumed_samples)
        return {
            name: {"tokens": int(c) * s.seq_len, "epoch": int(c) / s.samples_per_epoch}
            for name, s, c in zip(self.names, self.sources, counts)
        }
