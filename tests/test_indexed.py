"""The MMIDIDX format: bytes as Megatron-LM / GPT-NeoX describe them, and damaged files."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import mmididx_bytes

from data_pipeline.indexed import (
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    token_dtype,
)

DOCS = [[5, 6, 7, 0], [8, 0], [9, 10, 11, 12, 13, 0]]


def write(prefix: Path, docs: list[list[int]], dtype=np.uint16) -> Path:
    writer = IndexedDatasetWriter(prefix, np.dtype(dtype))
    for doc in docs:
        writer.add_documents(np.array(doc), np.array([len(doc)]))
    writer.finalize()
    return prefix


@pytest.mark.parametrize(("dtype", "code"), [(np.uint16, 8), (np.int32, 4)])
def test_written_index_matches_the_format_byte_for_byte(tmp_path: Path, dtype, code) -> None:
    write(tmp_path / "ds", DOCS, dtype)
    lengths = [len(d) for d in DOCS]
    expected = mmididx_bytes(lengths, list(range(len(DOCS) + 1)), code, np.dtype(dtype).itemsize)
    assert (tmp_path / "ds.idx").read_bytes() == expected
    tokens = np.fromfile(tmp_path / "ds.bin", dtype=dtype)
    assert tokens.tolist() == [t for d in DOCS for t in d]


def test_a_dataset_written_from_the_description_opens_here(tmp_path: Path) -> None:
    # As Megatron's preprocess_data.py would leave it: int32 tokens, dtype code 4.
    (tmp_path / "meg.idx").write_bytes(mmididx_bytes([3, 2], [0, 1, 2], 4, 4))
    np.array([1, 2, 3, 4, 5], dtype=np.int32).tofile(tmp_path / "meg.bin")
    ds = IndexedDataset(tmp_path / "meg")
    assert len(ds) == 2 and ds.num_documents == 2 and ds.num_tokens == 5
    assert ds[0].tolist() == [1, 2, 3] and ds[1].tolist() == [4, 5]
    assert ds.dtype == np.int32


def test_dtype_follows_the_vocabulary() -> None:
    assert token_dtype(50_257) == np.uint16
    assert token_dtype(65_499) == np.uint16
    assert token_dtype(100_277) == np.int32


def _patch(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def _truncate(path: Path, n: int) -> None:
    path.write_bytes(path.read_bytes()[:-n])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: Path(f"{p}.idx").write_bytes(b"MMIDIDX"), "shorter than the 34-byte header"),
        (lambda p: _patch(Path(f"{p}.idx"), 0, b"XXXXXXX"), "not an MMIDIDX index"),
        (lambda p: _patch(Path(f"{p}.idx"), 9, struct.pack("<Q", 2)), "index version 2"),
        (lambda p: _patch(Path(f"{p}.idx"), 17, b"\x09"), "unknown dtype code 9"),
        (lambda p: _truncate(Path(f"{p}.idx"), 8), "the file is truncated or damaged"),
        (lambda p: _truncate(Path(f"{p}.bin"), 2), "does not belong to this index"),
        (lambda p: Path(f"{p}.bin").unlink(), "ds.bin does not exist"),
        (lambda p: Path(f"{p}.idx").unlink(), "ds.idx does not exist"),
    ],
    ids=[
        "short",
        "magic",
        "version",
        "dtype",
        "idx-truncated",
        "bin-truncated",
        "no-bin",
        "no-idx",
    ],
)
def test_damaged_files_are_named_and_explained(tmp_path: Path, damage, message) -> None:
    prefix = write(tmp_path / "ds", DOCS)
    damage(prefix)
    with pytest.raises(IndexedDatasetError, match=message) as e:
        IndexedDataset(prefix)
    assert "ds." in str(e.value)


def test_aborted_write_leaves_no_dataset_and_keeps_the_old_one(tmp_path: Path) -> None:
    prefix = write(tmp_path / "ds", DOCS)
    (tmp_path / "ds.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    writer = IndexedDatasetWriter(prefix, np.dtype(np.uint16))
    writer.add_documents(np.array([1, 2, 0]), np.array([3]))
    writer.abort()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
