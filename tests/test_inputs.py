"""Input formats of `python -m data_pipeline.prepare` (parquet, gzip, zstd, mixed directories),
damaged input, documents past the size limit, and the bounded window of chunks in flight."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import corpus_documents
from test_prepare import assert_fails, assert_round_trip, prepare

from data_pipeline import indexed
from data_pipeline.prepare import CHUNK_BYTES, encode_stream, in_order
from data_pipeline.tokenizers import CharTokenizer

SEP = "<|doc|>"
KEY = "body"  # not the default key: --text-key must reach every format


def documents() -> list[str]:
    """About 440 KB of text as 120 documents of a few KB, with non-ASCII characters."""
    text = "".join(corpus_documents())
    step = len(text) // 119
    docs = [text[i : i + step] for i in range(0, len(text), step)]
    docs[3] = "naïve café — 日本語 🎉\n" + docs[3]
    return docs


def jsonl_bytes(docs: list[str]) -> bytes:
    return "".join(json.dumps({"id": i, KEY: d}) + "\n" for i, d in enumerate(docs)).encode()


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_checksum=True).compress(data)  # as the zstd CLI writes


def write_parquet(path: Path, docs: list[str], rows_per_group: int = 25) -> None:
    table = pa.table({"id": list(range(len(docs))), KEY: docs})
    pq.write_table(table, path, row_group_size=rows_per_group)


def write_input(path: Path, docs: list[str]) -> Path:
    """The documents as one file of the format its name says."""
    text = SEP.join(docs).encode()
    writers = {
        ".jsonl": lambda: jsonl_bytes(docs),
        ".jsonl.gz": lambda: gzip.compress(jsonl_bytes(docs)),
        ".jsonl.zst": lambda: zstd(jsonl_bytes(docs)),
        ".txt": lambda: text,
        ".txt.gz": lambda: gzip.compress(text),
        ".txt.zst": lambda: zstd(text),
        ".zst": lambda: zstd(text),
    }
    suffix = next(s for s in writers | {".parquet": None} if path.name.endswith(s))
    if suffix == ".parquet":
        write_parquet(path, docs)
    else:
        path.write_bytes(writers[suffix]())
    return path


def prepare_input(*inputs: Path, out: Path, check: bool = True, extra: tuple[str, ...] = ()):
    args = ["--text-key", KEY, "--txt-separator", SEP, "--tokenizer", "char", *extra]
    return prepare("--input", *map(str, inputs), *args, "--out", str(out), check=check)


def dataset_bytes(prefix: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in prefix.parent.glob(f"{prefix.name}.*")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The documents as plain .jsonl, prepared."""
    root = tmp_path_factory.mktemp("reference")
    out = root / "ds"
    prepare_input(write_input(root / "docs.jsonl", documents()), out=out)
    assert_round_trip(out, documents())
    return out


@pytest.mark.parametrize(
    "suffix", [".jsonl.gz", ".jsonl.zst", ".parquet", ".txt", ".txt.gz", ".txt.zst", ".zst"]
)
def test_every_format_gives_the_jsonl_dataset(reference: Path, tmp_path: Path, suffix: str):
    source = write_input(tmp_path / f"docs{suffix}", documents())
    out = tmp_path / "ds"
    prepare_input(source, out=out)
    for part in (".bin", ".idx"):
        assert Path(f"{out}{part}").read_bytes() == Path(f"{reference}{part}").read_bytes()
    (recorded,) = json.loads(Path(f"{out}.json").read_text())["sources"]
    assert recorded["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()  # as stored
    assert recorded["bytes"] == source.stat().st_size


def test_a_directory_mixing_every_format(tmp_path: Path) -> None:
    docs, root = documents(), tmp_path / "mixed"
    suffixes = [".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".txt", ".txt.gz", ".txt.zst"]
    (root / "sub").mkdir(parents=True)
    parts = np.array_split(np.arange(len(docs)), len(suffixes) + 1)
    for n, (suffix, rows) in enumerate(zip([*suffixes, ".zst"], parts)):
        where = root / "sub" if n % 2 else root  # found recursively, ordered by path
        write_input(where / f"{n:02d}{suffix}", [docs[i] for i in rows])
    (root / "notes.md").write_text("not an input: left alone")
    out = tmp_path / "ds"
    result = prepare_input(root, out=out)
    assert f"{len(docs)} documents" in result.stdout
    order = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix != ".md")
    stored = sum(p.stat().st_size for p in order)  # every file's bytes counted, parquet's too
    assert f"{stored / 1e6:,.1f} MB in" in result.stdout
    expected = [docs[i] for path in order for i in parts[int(path.name[:2])]]
    assert_round_trip(out, expected)
    recorded = json.loads(Path(f"{out}.json").read_text())["sources"]
    assert [r["path"] for r in recorded] == [str(p) for p in order]


def test_parquet_row_groups_a_text_column_and_its_errors(tmp_path: Path) -> None:
    docs = documents()
    write_parquet(tmp_path / "docs.parquet", docs, rows_per_group=7)
    assert pq.ParquetFile(tmp_path / "docs.parquet").num_row_groups == 18
    out = tmp_path / "ds"
    prepare_input(tmp_path / "docs.parquet", out=out)
    assert_round_trip(out, docs)
    missing = prepare("--input", str(tmp_path / "docs.parquet"), "--out", str(out), check=False)
    assert_fails(missing, "docs.parquet: no column 'text' (it has id, body); pass --text-key")
    pq.write_table(pa.table({KEY: ["fine", None]}), tmp_path / "null.parquet")
    null = prepare_input(tmp_path / "null.parquet", out=tmp_path / "other", check=False)
    assert_fails(null, "null.parquet, row 1: 'body' is null, not text")
    pq.write_table(pa.table({KEY: [1, 2]}), tmp_path / "ints.parquet")
    ints = prepare_input(tmp_path / "ints.parquet", out=tmp_path / "other", check=False)
    assert_fails(ints, "ints.parquet: column 'body' holds int64, not text")


def truncated(data: bytes) -> bytes:
    return data[: len(data) * 2 // 3]


def flipped(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0x5A for b in data[middle : middle + 64]) + data[middle + 64 :]


def broken_row_group(path: Path) -> bytes:
    """The parquet file with the page header of its second row group overwritten."""
    start = pq.ParquetFile(path).metadata.row_group(1).column(1).data_page_offset
    data = path.read_bytes()
    return data[:start] + b"\xff" * 16 + data[start + 16 :]


DAMAGE = {
    "truncated.jsonl.zst": (lambda p: truncated(p.read_bytes()), "truncated zstd data", "line "),
    "corrupt.jsonl.zst": (lambda p: flipped(p.read_bytes()), "corrupt zstd data", "line "),
    "truncated.jsonl.gz": (lambda p: truncated(p.read_bytes()), "truncated gzip data", "line "),
    "corrupt.jsonl.gz": (lambda p: flipped(p.read_bytes()), "corrupt gzip data", "line "),
    "truncated.txt.zst": (lambda p: truncated(p.read_bytes()), "truncated zstd data", "document "),
    "truncated.parquet": (lambda p: truncated(p.read_bytes()), "not a readable parquet", "footer"),
    "corrupt.parquet": (
        broken_row_group,
        "row group 1 of 5 (rows 25 to 49, 0 of them read) cannot be read",
    ),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_damaged_input_names_the_file_and_keeps_the_previous_dataset(
    tmp_path: Path, name: str
) -> None:
    inputs, out = tmp_path / "in", tmp_path / "ds"
    inputs.mkdir()
    write_input(inputs / "a.jsonl", documents()[:10])
    prepare_input(inputs, out=out)
    before = dataset_bytes(out)
    damage, *fragments = DAMAGE[name]
    good = write_input(tmp_path / name.replace("truncated", "good").replace("corrupt", "good"),
                       documents())  # fmt: skip
    (inputs / name).write_bytes(damage(good))
    result = prepare_input(inputs, out=out, check=False, extra=("--force",))
    assert_fails(result, str(inputs / name), *fragments)
    assert dataset_bytes(out) == before  # no .tmp left either


def test_documents_past_the_limit_are_refused_before_they_are_read(tmp_path: Path) -> None:
    (tmp_path / "book.txt").write_text("word " * 400_000)  # 2 MB, one document without SEP
    out = tmp_path / "ds"
    whole = prepare("--input", str(tmp_path / "book.txt"), "--max-document-mb", "1",
                    "--out", str(out), check=False)  # fmt: skip
    message = "book.txt: the file would be one document of 2.0 MB, over the limit of 1.0 MB"
    assert_fails(whole, message, "(--max-document-mb). Split it into documents with --txt-sep")
    (tmp_path / "book.txt").unlink()
    long_line = [documents()[0], "x" * 1_500_000, documents()[1]]
    (tmp_path / "long.jsonl.zst").write_bytes(zstd(jsonl_bytes(long_line)))
    line = prepare_input(tmp_path / "long.jsonl.zst", out=out, check=False,
                         extra=("--max-document-mb", "1"))  # fmt: skip
    assert_fails(line, "long.jsonl.zst: line 2 would be one document of over 1.0 MB")
    (tmp_path / "long.jsonl.zst").unlink()
    (tmp_path / "one.txt").write_text("short" + SEP + "y" * 3_000_000 + SEP + "short")
    piece = prepare_input(tmp_path, out=out, check=False, extra=("--max-document-mb", "2"))
    assert_fails(piece, "one.txt: document 2 would be one document", f"{SEP!r} right?")
    assert not list(tmp_path.glob("ds.*"))


class Counted:
    """A task whose result is known, and a source of them that counts how many were taken."""

    def __init__(self, value: int) -> None:
        self.value = value

    def get(self) -> int:
        return self.value


def test_in_order_takes_tasks_only_while_the_window_has_room() -> None:
    taken = []

    def tasks(sizes):
        for i, size in enumerate(sizes):
            taken.append(i)
            yield Counted(i), size

    results = in_order(tasks([10] * 100), max_tasks=4, max_chars=1000)
    assert next(results) == 0 and len(taken) == 4  # 4 in flight, then the first is returned
    assert list(results) == list(range(1, 100))
    taken.clear()
    results = in_order(tasks([300] * 100), max_tasks=4, max_chars=1000)
    assert next(results) == 0 and len(taken) == 4  # 1,200 characters: over the window
    taken.clear()
    results = in_order(tasks([5000, 10, 10]), max_tasks=4, max_chars=1000)
    assert next(results) == 0 and len(taken) == 1  # a larger chunk goes alone


def test_reading_stays_a_bounded_window_ahead_of_the_workers(tmp_path: Path) -> None:
    pulled = []

    def documents_read():
        for i in range(40):  # 40 chunks of text: reading them all first is what to avoid
            pulled.append(i)
            yield "ab" * (CHUNK_BYTES // 2)

    tokenizer = CharTokenizer(["a", "b"])
    stream = encode_stream(documents_read(), tokenizer, np.dtype(np.uint16), tmp_path, workers=2)
    tokens, lengths = next(stream)
    assert lengths.tolist() == [CHUNK_BYTES + 1] and tokens[-1] == tokenizer.eod_id
    assert len(pulled) <= 2 * 2 + 1  # 2 x workers chunks in flight
    assert sum(len(t) for t, _ in stream) == 39 * (CHUNK_BYTES + 1)


def test_the_writer_spills_lengths_and_writes_the_index_in_blocks(tmp_path: Path, monkeypatch):
    """Memory does not grow with the number of documents: the index comes out of a file of
    lengths in blocks (here of 7 entries), with the bytes write_index gives in one piece."""
    monkeypatch.setattr(indexed, "INDEX_BLOCK", 7)
    lengths = np.random.default_rng(0).integers(1, 50, size=60)
    writer = indexed.IndexedDatasetWriter(tmp_path / "ds", np.dtype(np.int32))
    for part in np.array_split(lengths, 9):
        writer.add_documents(np.zeros(int(part.sum()), np.int32), part)
    assert writer.finalize() == (60, int(lengths.sum()))
    indexed.write_index(tmp_path / "whole.idx", lengths, np.arange(61), np.dtype(np.int32))
    assert (tmp_path / "ds.idx").read_bytes() == (tmp_path / "whole.idx").read_bytes()
    assert not list(tmp_path.glob("*.tmp"))
    assert indexed.IndexedDataset(tmp_path / "ds").sizes.tolist() == lengths.tolist()
