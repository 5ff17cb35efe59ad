"""The byte streams under the document readers of sources.py: a file hashed as it is read,
gzip and zstd decompressed member by member and frame by frame with the place a damaged stream
broke, and a parquet file's text column in batches of bounded size."""

from __future__ import annotations

import hashlib
import io
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from data_pipeline.sources import ReadStats

BLOCK = 8 * 1024 * 1024  # buffered reads of (decompressed) text
COMPRESSED_BLOCK = 64 * 1024  # compressed bytes fed to a decompressor at a time
GZIP_OUTPUT = 1024 * 1024  # decompressed bytes taken from zlib at a time
PARQUET_BATCH_BYTES = 8 * 1024 * 1024  # text decoded from parquet at a time, about
PARQUET_BUFFER = 1024 * 1024  # pyarrow reads column chunks page by page through this buffer


class SourceError(ValueError):
    """An input cannot be read as documents; the message names the file and the fix."""


class HashingReader(io.RawIOBase):
    """Wraps a binary file: hashes and counts every byte read through it."""

    def __init__(self, raw: io.BufferedReader, stats: ReadStats) -> None:
        self.raw, self.sha, self.stats, self.size = raw, hashlib.sha256(), stats, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        n = self.raw.readinto(buffer)
        if n:
            self.sha.update(memoryview(buffer)[:n])
            self.size += n
            self.stats.bytes_read += n
        return n


class Damaged(Exception):
    """A compressed stream is truncated or corrupt (the reader adds the file and position)."""


def _decoder(codec: str):
    """A decompressor of one gzip member or zstd frame (.decompress, .eof, .unused_data)."""
    if codec == "gzip":
        return zlib.decompressobj(wbits=31)
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj()


class Decompressing(io.RawIOBase):
    """The decompressed bytes of a gzip or zstd stream, every member or frame of it in turn.

    Unlike gzip.GzipFile and zstandard's stream_reader, an input that ends inside a member or
    frame is an error (zstandard's reader ends quietly), and the error says where it broke.
    Input goes in by COMPRESSED_BLOCK; gzip's output comes out by GZIP_OUTPUT at most, zstd's
    by what one input block holds (a few MB at the ratios of text)."""

    def __init__(self, source: HashingReader, codec: str) -> None:
        self.source, self.codec, self.produced = source, codec, 0
        self.decoder, self.started, self.error = _decoder(codec), False, None
        self.tail = b""  # input read but not yet taken by the decoder
        self.pending, self.offset = b"", 0  # decompressed, not yet returned from pending[offset:]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        while self.offset == len(self.pending):
            if not self._fill():
                return 0
        n = min(len(buffer), len(self.pending) - self.offset)
        buffer[:n] = self.pending[self.offset : self.offset + n]
        self.offset += n
        return n

    def _fill(self) -> bool:
        """Decompress some more input into pending; False at the end of the input. A damaged
        block gives what decompressed before the damage first, then the error."""
        if self.error:
            raise self.error
        self.tail = self.tail or self.source.read(COMPRESSED_BLOCK)
        if not self.tail:
            if self.started and not self.decoder.eof:
                unit = "member" if self.codec == "gzip" else "frame"
                raise Damaged(f"truncated {self.codec} data: the file ends inside a {unit}")
            return False
        self.pending, self.offset = self._step(), 0
        return True

    def _step(self) -> bytes:
        data, self.tail = self.tail, b""
        if not self.started and not data.strip(b"\x00"):
            return b""  # zero padding after the last member (some tools write it)
        self.started = True
        try:
            if self.codec == "gzip":
                out = self.decoder.decompress(data, GZIP_OUTPUT)
                self.tail = self.decoder.unconsumed_tail
            else:
                out = self.decoder.decompress(data)
        except Exception as e:  # zlib.error, zstandard.ZstdError
            self.error = Damaged(f"corrupt {self.codec} data ({e})")
            return b""
        if self.decoder.eof:  # the next member or frame, if any, starts in unused_data
            self.tail = self.decoder.unused_data
            self.decoder, self.started = _decoder(self.codec), False
        self.produced += len(out)
        return out


def open_parquet(path: Path):
    """A pyarrow ParquetFile that reads column chunks page by page (not whole, not prebuffered)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(
            path,
            buffer_size=PARQUET_BUFFER,
            pre_buffer=False,
            page_checksum_verification=True,
        )
    except (pa.ArrowException, OSError) as e:
        raise SourceError(
            f"{path}: not a readable parquet file ({_one_line(e)}); a truncated parquet file "
            f"loses its footer (this one is {path.stat().st_size:,} bytes): download or write it "
            "again"
        ) from None


def text_column(file, path: Path, key: str) -> int:
    """The index of the text column, which must hold strings."""
    import pyarrow as pa

    schema = file.schema_arrow
    if key not in schema.names:
        raise SourceError(
            f"{path}: no column {key!r} (it has {', '.join(schema.names)}); pass --text-key with "
            "the column that holds the text"
        )
    kind = schema.field(key).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise SourceError(f"{path}: column {key!r} holds {kind}, not text (string)")
    return schema.get_field_index(key)


def _batch_rows(file, group: int, column: int) -> int:
    """Rows per batch so that a batch holds about PARQUET_BATCH_BYTES of text."""
    meta = file.metadata.row_group(group)
    text_bytes = meta.column(column).total_uncompressed_size
    per_row = max(1, text_bytes // max(meta.num_rows, 1))
    return int(min(65_536, max(1, PARQUET_BATCH_BYTES // per_row)))


def row_group_values(
    file, path: Path, group: int, column: int, key: str
) -> Iterator[tuple[int, list]]:
    """(first row, values) of each batch of one row group; a damaged one names the group."""
    import pyarrow as pa

    first = sum(file.metadata.row_group(g).num_rows for g in range(group))
    rows, start = file.metadata.row_group(group).num_rows, first
    batches = file.iter_batches(
        batch_size=_batch_rows(file, group, column),
        row_groups=[group],
        columns=[key],
        use_threads=False,
    )
    try:
        for batch in batches:
            values = batch.column(0).to_pylist()
            yield start, values
            start += len(values)
    except (pa.ArrowException, OSError) as e:
        raise SourceError(
            f"{path}: row group {group} of {file.num_row_groups} (rows {first:,} to "
            f"{first + rows - 1:,}, {start - first:,} of them read) cannot be read "
            f"({_one_line(e)}); the file is damaged: download or write it again"
        ) from None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def sha256_of(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            sha.update(block)
    return sha.hexdigest()
