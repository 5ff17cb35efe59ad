"""Prepared token datasets: a directory with `meta.json`, `tokenizer.json` and one `.bin` per split.

Training reads the splits through `numpy.memmap`, so opening is instant and memory stays flat.
Which tokens a sample holds is a pure function of (seed, global sample index): a resumed run only
needs the number of samples consumed to continue in the same order, at any number of ranks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_pipeline.tokenizer import CharTokenizer, load_tokenizer

FORMAT = "zerolaunch-tokens"
VERSION = 1
PREPARE_HINT = "python -m data_pipeline.prepare --source shakespeare --out {path}"
_VAL_STREAM = 0x5EED_0F_7A1  # keeps val samples independent of the train order


class DatasetError(ValueError):
    """A prepared dataset is missing or damaged; the message says what to run."""


@dataclass
class PreparedDataset:
    path: Path
    meta: dict
    tokenizer: CharTokenizer

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def split(self, name: str) -> np.ndarray:
        """Memory-map one split's tokens."""
        info = self.meta["splits"].get(name)
        if info is None:
            raise DatasetError(
                f"{self.path}: no split {name!r} (has {sorted(self.meta['splits'])})"
            )
        file = self.path / info["file"]
        dtype = np.dtype(self.meta["dtype"])
        expected = int(info["tokens"]) * dtype.itemsize
        if not file.exists() or file.stat().st_size != expected:
            size = file.stat().st_size if file.exists() else "missing"
            raise DatasetError(
                f"{file}: expected {expected} bytes ({info['tokens']} tokens), found {size}; "
                "the dataset is incomplete. Prepare it again: "
                + PREPARE_HINT.format(path=self.path)
            )
        return np.memmap(file, dtype=dtype, mode="r")


def open_dataset(path: str | Path) -> PreparedDataset:
    """Open a prepared dataset directory, or raise DatasetError saying how to prepare it."""
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.exists():
        raise DatasetError(
            f"no prepared dataset at {path} ({meta_file} is missing). "
            f"Prepare it first: {PREPARE_HINT.format(path=path)}"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{meta_file} is not valid JSON ({e}); prepare the dataset again") from e
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise DatasetError(
            f"{meta_file}: format {meta.get('format')!r} version {meta.get('version')!r}, "
            f"expected {FORMAT!r} version {VERSION}; prepare the dataset again"
        )
    return PreparedDataset(path, meta, load_tokenizer(path / "tokenizer.json"))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A fast, well-mixed 64-bit hash (Steele et al.), vectorised; wraps modulo 2**64."""
    x = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_offsets(seed: int, indices: np.ndarray, n_tokens: int, block_size: int) -> np.ndarray:
    """Start offset of each global sample index: uniform over the split, fixed by the seed."""
    span = n_tokens - block_size - 1
    if span <= 0:
        raise DatasetError(
            f"a split of {n_tokens} tokens is too short for block_size={block_size}; "
            "use a smaller model.block_size or more data"
        )
    keyed = _splitmix64(np.asarray(indices, dtype=np.uint64) ^ _splitmix64(np.array([seed]))[0])
    return (keyed % np.uint64(span + 1)).astype(np.int64)


def load_batch(
    tokens: np.ndarray, offsets: np.ndarray, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, (B, block_size) int64 each."""
    window = np.stack([tokens[o : o + block_size + 1] for o in offsets]).astype(np.int64)
    window = torch.from_numpy(window)
    return window[:, :-1], window[:, 1:]


def rank_sample_indices(
    step: int, micro_step: int, micro_batch: int, grad_accum: int, dp_size: int, dp_rank: int
) -> np.ndarray:
    """Global sample indices that one rank reads for one micro-step of one optimizer step.

    Step s consumes indices [s*G, (s+1)*G) with G = micro_batch * grad_accum * dp_size.
    """
    global_batch = micro_batch * grad_accum * dp_size
    start = step * global_batch + (micro_step * dp_size + dp_rank) * micro_batch
    return np.arange(start, start + micro_batch)


def val_seed(seed: int) -> int:
    return seed ^ _VAL_STREAM
