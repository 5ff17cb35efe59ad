"""Shared fixtures: a small real corpus, prepared once, and helpers to launch real runs."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
DEEPSPEED = str(Path(PYTHON).with_name("deepspeed"))
ZEROLAUNCH = str(Path(PYTHON).with_name("zerolaunch"))  # the console script of pyproject.toml

# A model small enough that a 2-rank DeepSpeed run of 30 steps takes seconds on 2 CPU cores.
TINY = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=64",
    "model.block_size=64",
    "model.dropout=0.0",
    "train.micro_batch_size=8",
    "train.lr=3e-3",
    "train.min_lr=3e-4",
    "train.warmup_steps=5",
    "train.log_interval=5",
    "eval.interval=10",
    "eval.batches=4",
    "checkpoint.interval=10",
    "sample.max_new_tokens=40",
]


def corpus_documents() -> list[str]:
    """About 440 KB of real English prose and code: five modules of Python's standard library."""
    import argparse
    import logging
    import pathlib
    import subprocess as sp
    import typing

    return [inspect.getsource(m) for m in (argparse, logging, sp, typing, pathlib)]


def write_corpus(root: Path) -> Path:
    """The corpus as one .txt file per document."""
    root.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(corpus_documents()):
        (root / f"doc{i}.txt").write_text(text)
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A char-level indexed dataset (5 documents, the last carved off as val) built by the CLI."""
    root = tmp_path_factory.mktemp("corpus")
    out = root / "data" / "stdlib"
    cmd = [PYTHON, "-m", "data_pipeline.prepare", "--input", str(write_corpus(root / "text"))]
    run([*cmd, "--tokenizer", "char", "--val-fraction", "0.2", "--out", str(out), "--workers", "2"])
    return out


def mmididx_bytes(
    lengths: list[int], doc_index: list[int], dtype_code: int, item_size: int
) -> bytes:
    """An .idx file written straight from the format description (not from our writer), as
    Megatron-LM's and GPT-NeoX's indexed_dataset.py write it."""
    header = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", dtype_code)
    header += struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_index))
    assert len(header) == 34
    pointers, total = [], 0
    for n in lengths:
        pointers.append(total)
        total += n * item_size
    body = struct.pack(f"<{len(lengths)}i", *lengths)
    body += struct.pack(f"<{len(lengths)}q", *pointers)
    body += struct.pack(f"<{len(doc_index)}q", *doc_index)
    return header + body


MEGATRON_DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5,
                        np.float64: 6, np.float32: 7, np.uint16: 8}  # fmt: skip


def write_megatron(prefix: Path, documents: list[list[list[int]]], dtype: type) -> Path:
    """A dataset as Megatron-LM / GPT-NeoX leave it (no PREFIX.json): each document a list of
    sequences (their sentences), added one by one, each document closed by its end
    (`end_document` appends the sequence count to doc_idx)."""
    lengths, doc_index, tokens = [], [0], []
    for document in documents:
        for sequence in document:
            lengths.append(len(sequence))
            tokens += sequence
        doc_index.append(len(lengths))
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.bin").write_bytes(np.array(tokens, dtype=dtype).tobytes())
    item_size = np.dtype(dtype).itemsize
    idx = mmididx_bytes(lengths, doc_index, MEGATRON_DTYPE_CODES[dtype], item_size)
    Path(f"{prefix}.idx").write_bytes(idx)
    return prefix


def run(cmd: list[str], check: bool = True, timeout: int = 300, cwd: Path = REPO, **env: str):
    """Run a command (from the repo root unless `cwd`); on failure show its whole output."""
    # wandb stays on this machine unless a test asks otherwise (a developer's API key included).
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", **env}
    result = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )
    if check and result.returncode != 0:
        pytest.fail(f"{cmd} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def overrides(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of metrics.jsonl; while a run writes it, only the complete lines (none
    before the file exists)."""
    path = run_dir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    lines = text.splitlines()
    if text and not text.endswith("\n"):
        lines = lines[:-1]  # the record being written
    return [json.loads(line) for line in lines]


def _ctrl_c_as_in_a_terminal() -> None:
    """In the launch's first process, before it starts: SIGINT's default action again. A shell
    runs a background job (`bash .ci/run &`) with SIGINT ignored, and every process started from
    it inherits that, the deepspeed runner too: it would never exit on a Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_deepspeed_run(tiny_data: Path, out: Path, *extra: str) -> subprocess.Popen:
    """2 ranks under the deepspeed runner in a session of their own, training until stopped
    (`extra` spec items win), returned once 3 metrics records are written."""
    items = [*TINY, f"data.train={tiny_data}", f"out_dir={out}", "train.log_interval=1"]
    items += ["train.max_steps=100000", "checkpoint.interval=0", "sample.max_new_tokens=0", *extra]
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "launcher/run.py",
           "--ds_config", "ds_configs/zero2.json", *overrides(*items)]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    pipe, merged = subprocess.PIPE, subprocess.STDOUT
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=pipe, stderr=merged, text=True, start_new_session=True,
        preexec_fn=_ctrl_c_as_in_a_terminal,
    )  # fmt: skip
    deadline = time.monotonic() + 180
    while not (out / "metrics.jsonl").exists() or len(read_metrics(out)) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.5)
    return proc


def output_of(proc: subprocess.Popen, timeout: float = 180) -> str:
    """The merged output of a launch from start_deepspeed_run once every process holding it has
    closed it. Past `timeout` the session is killed and the test fails with what is still running
    and the output's end (a launch that hangs says where)."""
    import psutil

    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        alive = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            with contextlib.suppress(psutil.Error, OSError):
                if os.getsid(p.info["pid"]) == proc.pid:
                    alive.append(f"{p.info['pid']}: {' '.join(p.info['cmdline'] or [])[:160]}")
        os.killpg(proc.pid, signal.SIGKILL)
        output = proc.communicate(timeout=60)[0]
        pytest.fail(
            f"still running after {timeout} s:\n" + "\n".join(alive) + "\n" + output[-6000:]
        )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
