"""Datasets made by other tools (Megatron-LM, GPT-NeoX): `.bin/.idx` without our `PREFIX.json`.

Such a dataset says nothing of its tokenizer, so the run spec does (`data.tokenizer`):

    tiktoken:NAME              a tiktoken encoding
    sentencepiece:MODEL_FILE   a SentencePiece model
    hf:PATH                    a Hugging Face tokenizer.json, or a directory holding one
    vocab:SIZE:eod=ID          only the vocabulary size and the end-of-document id: training
                               works, sampling and tokenizer export do not (no text)

Before first use every token id is checked to be below the tokenizer's vocabulary (`scan`,
chunked: bounded memory at any size); the result is cached beside the sample index, keyed by
the files' sizes and times and the vocabulary size, so each dataset is scanned once. Local rank
0 scans while the node's other ranks wait for the cached result.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_pipeline.indexed import CODE_OF, IndexedDataset, bin_path, idx_path
from data_pipeline.tokenizers import (
    HF_FILE,
    HFTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    TokenizerError,
    parse_tokenizer_spec,
)

FORMS = "tiktoken:NAME, sentencepiece:MODEL_FILE, hf:PATH or vocab:SIZE:eod=ID"
VOCAB_SPEC = re.compile(r"^vocab:(\d+):eod=(\d+)$")
SCAN_VERSION = 1
SCAN_CHUNK_BYTES = 1 << 25
"""Bytes of .bin read at a time by the scan (32 MiB): its memory, whatever the dataset's size."""
WAIT_TIMEOUT_S = 3600.0
WAIT_BYTES_PER_S = 50e6
"""Waiting ranks allow the scan at least this speed beyond WAIT_TIMEOUT_S."""


class ForeignDataError(ValueError):
    """A dataset made elsewhere cannot be used as declared; the message says what to change."""


class VocabTokenizer:
    """A vocabulary size and an EOD id, nothing more (`vocab:SIZE:eod=ID`): enough to train on
    token ids; encoding or decoding text raises TokenizerError."""

    def __init__(self, vocab_size: int, eod_id: int) -> None:
        if not 0 <= eod_id < vocab_size:
            raise TokenizerError(
                f"vocab:{vocab_size}:eod={eod_id}: the EOD id is not below the size"
            )
        self.vocab_size, self.eod_id = vocab_size, eod_id

    def _no_text(self) -> TokenizerError:
        return TokenizerError(
            f"the tokenizer vocab:{self.vocab_size}:eod={self.eod_id} is a vocabulary size only: "
            "it has no text to encode or decode; give the real one (tiktoken:NAME, "
            "sentencepiece:MODEL_FILE or hf:PATH) as data.tokenizer"
        )

    def encode(self, text: str) -> list[int]:
        raise self._no_text()

    def decode(self, ids: list[int]) -> str:
        raise self._no_text()

    def describe(self) -> dict:
        return {"type": "vocab", "vocab_size": self.vocab_size, "eod_id": self.eod_id}


def has_text(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer can encode and decode text (all but vocab:SIZE:eod=ID)."""
    return not isinstance(tokenizer, VocabTokenizer)


def check_declared(spec: str) -> str | None:
    """What is wrong with the form of a data.tokenizer value, or None (files not opened)."""
    if spec.startswith("vocab:"):
        match = VOCAB_SPEC.match(spec)
        if match is None:
            return f"{spec!r}: expected vocab:SIZE:eod=ID, e.g. vocab:50257:eod=50256"
        size, eod = int(match[1]), int(match[2])
        return None if eod < size else f"{spec!r}: the EOD id {eod} is not below the size {size}"
    if spec == "char":
        return (
            "'char': a char vocabulary is the one prepare built from its corpus; a dataset made "
            f"elsewhere needs {FORMS}"
        )
    if spec.startswith("sentencepiece:train:"):
        return f"{spec!r}: training a tokenizer is for prepare; give {FORMS}"
    try:
        parse_tokenizer_spec(spec)
    except TokenizerError:
        return f"{spec!r}: expected {FORMS}"
    return None


def declared_tokenizer(spec: str) -> Tokenizer:
    """Load the tokenizer data.tokenizer names (paths relative to the working directory)."""
    problem = check_declared(spec)
    if problem:
        raise TokenizerError(f"data.tokenizer {problem}")
    kind, _, arg = spec.partition(":")
    if kind == "vocab":
        match = VOCAB_SPEC.match(spec)
        return VocabTokenizer(int(match[1]), int(match[2]))
    if kind == "tiktoken":
        return TiktokenTokenizer(arg)
    if kind == "sentencepiece":
        return SentencePieceTokenizer(Path(arg))
    tokenizer = HFTokenizer.from_path(Path(arg))
    if tokenizer.stored_name == HF_FILE:  # a run directory's tokenizer.json is our description
        tokenizer.stored_name = f"hf-{tokenizer.sha256[:12]}.tokenizer.json"
    return tokenizer


def describe_spec(tokenizer: Tokenizer) -> str:
    """The data.tokenizer value that loads this tokenizer (for messages)."""
    described = tokenizer.describe()
    kind = described.get("type")
    if kind == "vocab":
        return f"vocab:{tokenizer.vocab_size}:eod={tokenizer.eod_id}"
    if kind == "tiktoken":
        return f"tiktoken:{described['name']}"
    if kind == "sentencepiece":
        return f"sentencepiece:{tokenizer.model_file}"
    if kind == "hf":
        return f"hf:{tokenizer.file}"
    return str(kind)


# ------------------------------------------------------------------------------ the token scan


@dataclass
class ScanResult:
    """What a scan of every token id found, against one vocabulary size."""

    vocab_size: int
    tokens: int
    largest: int | None
    """The largest id (None for an empty dataset, or when the scan stopped at a bad id)."""
    smallest: int | None
    bad_id: int | None = None
    """The first id outside [0, vocab_size), where it is below."""
    bad_token: int | None = None
    """Its index among the .bin file's tokens."""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.bad_id is None


def scan(dataset: IndexedDataset, vocab_size: int, progress: bool = False) -> ScanResult:
    """Check every token id against the vocabulary, reading .bin in chunks into one buffer;
    stops at the first id outside [0, vocab_size)."""
    from tqdm import tqdm

    dtype, started = dataset.dtype, time.perf_counter()
    total = dataset.num_tokens
    per_chunk = max(1, SCAN_CHUNK_BYTES // dtype.itemsize)
    buffer = np.empty(min(per_chunk, max(total, 1)), dtype=dtype)
    largest, smallest, done = None, None, 0
    bar = tqdm(
        total=total * dtype.itemsize,
        unit="B",
        unit_scale=True,
        desc=f"token ids of {dataset.prefix}",
        disable=None if progress else True,  # a terminal only
        delay=2.0,  # quiet for a small dataset
        leave=False,
    )
    with open(bin_path(dataset.prefix), "rb") as f, bar:
        while done < total:
            chunk = buffer[: min(per_chunk, total - done)]
            if f.readinto(memoryview(chunk).cast("B")) != chunk.nbytes:
                raise ForeignDataError(f"{bin_path(dataset.prefix)} changed while it was read")
            high, low = int(chunk.max()), int(chunk.min())
            if high >= vocab_size or low < 0:
                at = int(np.flatnonzero((chunk >= vocab_size) | (chunk < 0))[0])
                return ScanResult(vocab_size, total, None, None, int(chunk[at]), done + at,
                                  time.perf_counter() - started)  # fmt: skip
            largest = high if largest is None else max(largest, high)
            smallest = low if smallest is None else min(smallest, low)
            done += len(chunk)
            bar.update(chunk.nbytes)
    return ScanResult(vocab_size, total, largest, smallest, seconds=time.perf_counter() - started)


def locate(dataset: IndexedDataset, token: int) -> tuple[int, int]:
    """(document, position within it) of the token at index `token` of the .bin file."""
    byte = token * dataset.dtype.itemsize
    sequence = int(np.searchsorted(dataset.pointers, byte, side="right")) - 1
    document = int(np.searchsorted(dataset.doc_index, sequence, side="right")) - 1
    first = int(dataset.pointers[dataset.doc_index[document]]) // dataset.dtype.itemsize
    return document, token - first


def bad_id_message(dataset: IndexedDataset, result: ScanResult, tokenizer: str) -> str:
    """The offending id, its document and its position there."""
    document, position = locate(dataset, result.bad_token)
    problem = "is negative" if result.bad_id < 0 else f"is not below {result.vocab_size}"
    return (
        f"{bin_path(dataset.prefix)}: token id {result.bad_id} in document {document} at "
        f"position {position} (token {result.bad_token:,} of the file) {problem}, the "
        f"vocabulary size of {tokenizer}"
    )


def check_token_ids(
    dataset: IndexedDataset, tokenizer: Tokenizer, cache_dir: Path, is_builder: bool = True
) -> ScanResult:
    """The cached scan of the dataset against the tokenizer's vocabulary (the builder scans on
    a miss, the others wait for its result); ForeignDataError naming the first bad id."""
    if dataset.dtype.kind not in "iu":
        raise ForeignDataError(
            f"{idx_path(dataset.prefix)}: its tokens are {dataset.dtype} (dtype code "
            f"{CODE_OF[dataset.dtype]}); token ids are integers: this is not a token dataset"
        )
    path = Path(cache_dir) / f"token_scan_{_scan_key(dataset, tokenizer.vocab_size)}.json"
    if not path.exists():
        if is_builder:
            _write_scan(path, scan(dataset, tokenizer.vocab_size, progress=True))
        else:
            _wait_for(path, dataset)
    result = ScanResult(**json.loads(path.read_text()))
    if not result.ok:
        raise ForeignDataError(
            f"{bad_id_message(dataset, result, describe_spec(tokenizer))}: the dataset was made "
            "with another tokenizer (or is damaged). Set data.tokenizer to the one it was made "
            "with"
        )
    return result


def _scan_key(dataset: IndexedDataset, vocab_size: int) -> str:
    """The files (path, sizes, modification times) and the vocabulary size."""
    files = [idx_path(dataset.prefix).stat(), bin_path(dataset.prefix).stat()]
    identity = {
        "prefix": str(dataset.prefix.resolve()),
        "files": [[s.st_size, s.st_mtime_ns] for s in files],
        "vocab_size": vocab_size,
        "version": SCAN_VERSION,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _write_scan(path: Path, result: ScanResult) -> None:
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(asdict(result)))
        os.replace(tmp, path)
    except OSError as e:
        raise ForeignDataError(_unwritable(path.parent, e)) from e


def _unwritable(directory: Path, error: object) -> str:
    return (
        f"cannot write the token scan's cache in {directory} ({error}); set data.index_cache "
        "to a writable directory"
    )


def _wait_for(path: Path, dataset: IndexedDataset) -> None:
    """Wait for local rank 0's scan; fail as it will when the directory cannot be written."""
    existing = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    if not os.access(existing, os.W_OK):
        raise ForeignDataError(_unwritable(path.parent, "permission denied"))
    size = bin_path(dataset.prefix).stat().st_size
    deadline = time.monotonic() + WAIT_TIMEOUT_S + size / WAIT_BYTES_PER_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise ForeignDataError(f"timed out waiting for local rank 0 to scan into {path}")
        time.sleep(0.2)
