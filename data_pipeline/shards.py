"""Preparation across nodes: `prepare --shard I/N` prepares the I-th of N disjoint, ordered parts
of the inputs, and `prepare --merge` joins the parts into the dataset one process would have
written, byte for byte (.bin, .idx and .json).

Parts are cut from the inputs' bytes: part I holds the inputs between I-1/N and I/N of the total
size. A file that straddles a cut goes whole to the part its first byte falls in, except an
uncompressed .jsonl, which is cut there, on a line boundary: a part reads the lines that begin
inside its byte range (the line a cut falls in belongs to the part before). Every part is an
ordinary dataset (`OUT.part-I-of-N.bin/.idx/.json`), so the parts can run anywhere (a Slurm job
array: slurm/prepare.sbatch), and the merge only concatenates them, in order, through the same
writer. The tokenizer must exist before the parts start: `char` and `sentencepiece:train` learn
theirs from the whole corpus and cannot be sharded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.indexed import IndexedDataset, IndexedDatasetError, IndexedDatasetWriter
from data_pipeline.sources import ReadStats, input_format, sha256_of
from data_pipeline.tokenizers import Tokenizer, describe_identity, identity, load_tokenizer

PART = "{out}.part-{index}-of-{count}"
PART_FILE = re.compile(r"part-(\d+)-of-(\d+)\.")
MERGE_BLOCK = 1 << 22
"""Tokens copied at a time by the merge (memory stays near 16-32 MB)."""


class ShardError(ValueError):
    """A shard or merge request cannot be carried out; the message says what to do."""


@dataclass(frozen=True)
class Piece:
    """A whole file (end None), or the lines of an uncompressed .jsonl beginning in
    [start, end)."""

    path: Path
    start: int = 0
    end: int | None = None


def parse_shard(text: str) -> tuple[int, int]:
    """'2/8' -> (2, 8): the second of eight parts (1-based, as Slurm prints array tasks + 1)."""
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i = n = 0
    if not sep or not 1 <= i <= n:
        raise ShardError(f"--shard {text!r}: expected I/N with 1 <= I <= N, e.g. --shard 1/8")
    return i, n


def check_tokenizer_spec(spec: str) -> None:
    """Refuse tokenizers that learn their vocabulary from the corpus being sharded."""
    if spec == "char" or spec.startswith("sentencepiece:train"):
        raise ShardError(
            f"--tokenizer {spec} learns its vocabulary from the whole corpus, which no part "
            "sees: prepare the tokenizer first (e.g. sentencepiece:train:VOCAB on a sample, "
            "then --tokenizer sentencepiece:OUT.spm-*.model) or use tiktoken:NAME or hf:PATH"
        )


def _splittable(path: Path) -> bool:
    return input_format(path) == ("jsonl", None)


def plan(files: list[Path], index: int, count: int) -> list[Piece]:
    """The pieces of part `index` of `count` (1-based): contiguous in input order, together
    every byte exactly once."""
    sizes = [f.stat().st_size for f in files]
    total = sum(sizes)
    low, high = total * (index - 1) // count, total * index // count
    pieces, offset = [], 0
    for path, size in zip(files, sizes):
        start, end = offset, offset + size
        offset = end
        if _splittable(path) and size:
            a, b = max(start, low), min(end, high)
            if a < b:
                whole = a == start and b == end
                pieces.append(Piece(path) if whole else Piece(path, a - start, b - start))
        elif low <= start < high or (size == 0 and start == high == total and index == count):
            pieces.append(Piece(path))
    return pieces


def part_prefix(out: Path, index: int, count: int) -> Path:
    return Path(PART.format(out=out, index=index, count=count))


# ------------------------------------------------------------------------------ merging


def find_parts(out: Path) -> list[Path]:
    """OUT.part-I-of-N for I = 1..N, all present and complete (their .json written last)."""
    found: dict[int, set[int]] = {}
    for path in out.parent.glob(f"{out.name}.part-*-of-*.*"):
        match = PART_FILE.match(path.name[len(out.name) + 1 :])
        if match:
            found.setdefault(int(match.group(2)), set()).add(int(match.group(1)))
    if not found:
        raise ShardError(
            f"no parts of {out} to merge (looked for {out}.part-I-of-N.*): run "
            f"prepare --shard I/N --out {out} for each part first"
        )
    if len(found) > 1:
        counts = ", ".join(f"of {n}" for n in sorted(found))
        raise ShardError(f"parts of {out} from different splits ({counts}): remove the old ones")
    (count,) = found
    parts = [part_prefix(out, i, count) for i in range(1, count + 1)]
    missing = [p.name for p in parts if not any(p.parent.glob(f"{p.name}.*"))]
    if missing:
        raise ShardError(f"{out}: part(s) missing: {', '.join(missing)}; prepare them first")
    unfinished = [p.name for p in parts if not Path(f"{p}.json").is_file()]
    if unfinished:
        raise ShardError(
            f"{out}: part(s) not complete (no .json yet: still running, or failed): "
            f"{', '.join(unfinished)}; wait for them or prepare them again"
        )
    return parts


def read_part(prefix: Path) -> tuple[dict, Tokenizer]:
    """A part's metadata and tokenizer, checked to be a part."""
    meta = json.loads(Path(f"{prefix}.json").read_text())
    if "shard" not in meta:
        raise ShardError(f"{prefix}.json is not a part written by prepare --shard")
    return meta, load_tokenizer(meta["tokenizer"], prefix.parent)


def check_same(parts: list[Path], metas: list[dict], tokenizers: list[Tokenizer]) -> None:
    """Every part prepared with the same settings and tokenizer as the first."""
    first = identity(tokenizers[0])
    for prefix, meta, tokenizer in zip(parts[1:], metas[1:], tokenizers[1:]):
        if identity(tokenizer) != first:
            raise ShardError(
                f"{prefix.name} was prepared with {describe_identity(identity(tokenizer))}, "
                f"{parts[0].name} with {describe_identity(first)}: prepare it again"
            )
        if meta["prepare_args"] != metas[0]["prepare_args"]:
            raise ShardError(
                f"{prefix.name} was prepared with other settings than {parts[0].name} "
                f"({meta['prepare_args']} vs {metas[0]['prepare_args']}): prepare it again"
            )


def merged_stats(metas: list[dict]) -> ReadStats:
    """The reading statistics of the whole input: counts summed, a file cut between parts
    listed once with its whole size and hash (hashed again here, streaming)."""
    stats = ReadStats()
    for meta in metas:
        for key, value in meta["skipped"].items():
            setattr(stats, key, getattr(stats, key) + value)
        for source in meta["sources"]:
            if "range" not in source:
                stats.files.append(source)
            elif not stats.files or stats.files[-1]["path"] != source["path"]:
                stats.files.append(dict(source))
    for source in stats.files:
        if source.pop("range", None) is not None:
            path = Path(source["path"])
            source["bytes"], source["sha256"] = path.stat().st_size, sha256_of(path)
    return stats


def concatenate(parts: list[Path], out: Path, dtype: np.dtype) -> tuple[int, int]:
    """Every part's documents, in order, into OUT.bin/.idx through the dataset writer (the
    same bytes one prepare writes); returns (documents, tokens)."""
    writer = IndexedDatasetWriter(out, dtype)
    try:
        for prefix in parts:
            try:
                data = IndexedDataset(prefix)
            except IndexedDatasetError as e:
                raise ShardError(f"{prefix.name}: {e}; prepare it again") from e
            _copy(data, writer)
        return writer.finalize()
    except BaseException:
        writer.abort()
        raise


def _copy(data: IndexedDataset, writer: IndexedDatasetWriter) -> None:
    offsets = np.concatenate(([0], np.cumsum(data.sizes, dtype=np.int64)))
    first = 0
    while first < len(data.sizes):
        # as many documents as fit a block (at least one)
        last = int(np.searchsorted(offsets, offsets[first] + MERGE_BLOCK, side="right")) - 1
        last = min(max(last, first + 1), len(data.sizes))
        tokens = data.tokens[offsets[first] : offsets[last]]
        writer.add_documents(tokens, data.sizes[first:last])
        first = last
