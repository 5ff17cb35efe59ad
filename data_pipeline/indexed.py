"""Megatron-LM / GPT-NeoX indexed datasets: `PREFIX.bin` (tokens) + `PREFIX.idx` (MMIDIDX index).

The `.idx` layout, little-endian, arrays unaligned right after a 34-byte header:

    offset  size  field
    0       9     magic  b"MMIDIDX\\x00\\x00"
    9       8     version, u64 = 1
    17      1     dtype code, u8 (8 = uint16, 4 = int32; Megatron's table below)
    18      8     sequence count N, u64
    26      8     document-index length D, u64 (number of documents + 1)
    34      4*N   sequence lengths, int32 (tokens)
    ..      8*N   byte pointers, int64 (offset of each sequence in .bin: running sum of
                  lengths x item size)
    ..      8*D   document index, int64: cumulative sequence counts, starting at 0 and ending at N

A file written here opens in Megatron-LM and GPT-NeoX, and theirs open here. Opening checks the
magic, version, dtype, array sizes and that `.bin` holds exactly the tokens the index describes.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, doc-index length
DTYPE_CODES: dict[int, type] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
    6: np.float64, 7: np.float32, 8: np.uint16,
}  # fmt: skip
CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


class IndexedDatasetError(ValueError):
    """An indexed dataset file is missing, of another format, truncated or inconsistent."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 below 65,500 ids (as Megatron and GPT-NeoX choose), else int32."""
    return np.dtype(np.uint16) if vocab_size < 65_500 else np.dtype(np.int32)


def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def write_index(path: Path, lengths: np.ndarray, doc_index: np.ndarray, dtype: np.dtype) -> None:
    """Write an MMIDIDX `.idx` file for sequences of the given token lengths."""
    lengths = np.asarray(lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= np.dtype(dtype).itemsize
    doc_index = np.asarray(doc_index, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(HEADER.pack(MAGIC, VERSION, CODE_OF[np.dtype(dtype)], len(lengths), len(doc_index)))
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(doc_index.tobytes(order="C"))


class IndexedDataset:
    """Read-only view of `PREFIX.bin`/`PREFIX.idx`, memory-mapped: opening costs no reads."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        self._open_index(idx_path(prefix))
        self.tokens = self._open_bin(bin_path(prefix))

    def _open_index(self, path: Path) -> None:
        if not path.exists():
            raise IndexedDatasetError(f"{path} does not exist")
        size = path.stat().st_size
        if size < HEADER.size:
            raise IndexedDatasetError(f"{path}: {size} bytes, shorter than the 34-byte header")
        with open(path, "rb") as f:
            magic, version, code, n_seq, n_doc = HEADER.unpack(f.read(HEADER.size))
        if magic != MAGIC:
            raise IndexedDatasetError(
                f"{path}: not an MMIDIDX index (magic {magic!r}, expected {MAGIC!r})"
            )
        if version != VERSION:
            raise IndexedDatasetError(f"{path}: index version {version}, only {VERSION} is known")
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{path}: unknown dtype code {code}")
        expected = HEADER.size + 12 * n_seq + 8 * n_doc
        if size != expected:
            raise IndexedDatasetError(
                f"{path}: {size} bytes, but its header ({n_seq} sequences, {n_doc - 1} documents) "
                f"needs {expected}; the file is truncated or damaged"
            )
        self.dtype = np.dtype(DTYPE_CODES[code])
        buffer = np.memmap(path, dtype=np.uint8, mode="r")
        offset = HEADER.size
        self.sizes = np.frombuffer(buffer, dtype=np.int32, count=n_seq, offset=offset)
        offset += 4 * n_seq
        self.pointers = np.frombuffer(buffer, dtype=np.int64, count=n_seq, offset=offset)
        offset += 8 * n_seq
        self.doc_index = np.frombuffer(buffer, dtype=np.int64, count=n_doc, offset=offset)
        if n_doc < 1 or self.doc_index[0] != 0 or self.doc_index[-1] != n_seq:
            raise IndexedDatasetError(
                f"{path}: document index must run from 0 to the sequence count {n_seq}"
            )
        problem = _array_problem(self.sizes, self.pointers, self.doc_index, self.dtype.itemsize)
        if problem:
            raise IndexedDatasetError(f"{path}: {problem}; the file is damaged")

    def _open_bin(self, path: Path) -> np.ndarray:
        if not path.exists():
            raise IndexedDatasetError(
                f"{path} does not exist (its index {idx_path(self.prefix)} does)"
            )
        n_tokens = int(self.sizes.sum(dtype=np.int64))
        expected = n_tokens * self.dtype.itemsize
        if path.stat().st_size != expected:
            raise IndexedDatasetError(
                f"{path}: {path.stat().st_size} bytes, but its index describes {n_tokens} tokens "
                f"({expected} bytes); the file is truncated or does not belong to this index"
            )
        if n_tokens == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(path, dtype=self.dtype, mode="r")

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_documents(self) -> int:
        return len(self.doc_index) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))

    def __getitem__(self, i: int) -> np.ndarray:
        start = self.pointers[i] // self.dtype.itemsize
        return self.tokens[start : start + self.sizes[i]]

    def token_offsets(self) -> np.ndarray:
        """Start of each sequence in tokens (pointers / item size)."""
        return self.pointers // self.dtype.itemsize


class IndexedDatasetWriter:
    """Stream documents into `PREFIX.bin`/`.idx` under temporary names; `finalize` renames them.

    An interrupted write leaves only `*.tmp` files, never a `.idx` that looks valid. The lengths
    go to a temporary file as they come and the index is written from it in blocks, so memory
    does not grow with the number of documents.
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype) -> None:
        self.prefix, self.dtype = Path(prefix), np.dtype(dtype)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = Path(f"{prefix}.bin.tmp")
        self._bin = open(self._bin_tmp, "wb")  # noqa: SIM115 (closed in finalize/abort)
        self._lengths_tmp = Path(f"{prefix}.lengths.tmp")
        self._lengths = open(self._lengths_tmp, "wb")  # noqa: SIM115 (int32, one per document)
        self._documents = self._tokens = 0

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as one token array and the length of each document."""
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        lengths = np.asarray(lengths, dtype=np.int32)
        self._lengths.write(lengths.tobytes())
        self._documents += len(lengths)
        self._tokens += int(lengths.sum(dtype=np.int64))

    def finalize(self) -> tuple[int, int]:
        """Close, write the index, rename into place; returns (documents, tokens)."""
        self._bin.close()
        self._lengths.close()
        idx_tmp = Path(f"{self.prefix}.idx.tmp")
        _write_index_from(self._lengths_tmp, self._documents, idx_tmp, self.dtype)
        self._lengths_tmp.unlink()
        # Retire the old dataset first (its PREFIX.json marks it complete, then its index): a
        # crash between the renames leaves a dataset that refuses to open, never an old index
        # over new tokens that looks valid. Until this point the old dataset stays intact.
        Path(f"{self.prefix}.json").unlink(missing_ok=True)
        idx_path(self.prefix).unlink(missing_ok=True)
        os.replace(self._bin_tmp, bin_path(self.prefix))
        os.replace(idx_tmp, idx_path(self.prefix))
        return self._documents, self._tokens

    def abort(self) -> None:
        self._bin.close()
        self._lengths.close()
        self._bin_tmp.unlink(missing_ok=True)
        self._lengths_tmp.unlink(missing_ok=True)


INDEX_BLOCK = 1 << 20
"""Index entries written at a time by the writer (4-8 MB)."""


def _write_index_from(lengths_file: Path, count: int, path: Path, dtype: np.dtype) -> None:
    """The `.idx` of `count` one-sequence documents whose int32 lengths are in lengths_file,
    written block by block: the same bytes as write_index, in constant memory."""
    with open(path, "wb") as out:
        out.write(HEADER.pack(MAGIC, VERSION, CODE_OF[np.dtype(dtype)], count, count + 1))
        for lengths in _int32_blocks(lengths_file):
            out.write(lengths.tobytes())
        offset = 0  # bytes into .bin
        for lengths in _int32_blocks(lengths_file):
            ends = np.cumsum(lengths, dtype=np.int64) * np.dtype(dtype).itemsize + offset
            out.write(np.concatenate(([offset], ends[:-1])).astype(np.int64).tobytes())
            offset = int(ends[-1])
        for start in range(0, count + 1, INDEX_BLOCK):
            out.write(np.arange(start, min(start + INDEX_BLOCK, count + 1), dtype=np.int64).data)


def _int32_blocks(path: Path) -> Iterator[np.ndarray]:
    with open(path, "rb") as f:
        while block := f.read(4 * INDEX_BLOCK):
            yield np.frombuffer(block, dtype=np.int32)


CHUNK = 1 << 24
"""Entries checked at a time: opening a dataset of 10^9 sequences stays within ~200 MB."""


def _array_problem(
    sizes: np.ndarray, pointers: np.ndarray, doc_index: np.ndarray, itemsize: int
) -> str | None:
    """What is inconsistent in an index's arrays (lengths, byte offsets, document index)."""
    for start in range(0, len(sizes), CHUNK):
        if (sizes[start : start + CHUNK] < 0).any():
            return "a sequence length is negative"
    for start in range(0, max(len(doc_index) - 1, 0), CHUNK):
        part = doc_index[start : start + CHUNK + 1]
        if (part[1:] < part[:-1]).any():
            return "the document index goes backwards"
    if len(pointers):
        # Offsets follow the lengths: checked at up to 4,096 evenly spaced sequences.
        at = np.unique(np.linspace(0, len(pointers) - 2, min(len(pointers) - 1, 4096)).astype(int))
        at = at[at >= 0]
        gaps = pointers[at + 1] - pointers[at] if len(pointers) > 1 else np.zeros(0)
        if pointers[0] != 0 or (len(at) and (gaps != sizes[at].astype(np.int64) * itemsize).any()):
            return "the byte offsets do not follow the sequence lengths"
    return None
