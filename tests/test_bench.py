"""The throughput harness runs the real step on synthetic tokens and reports sane figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import DEEPSPEED, PYTHON, overrides, run

from launcher.config.load import load_spec
from model.gpt import GPT

SMALL = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=64",
    "model.block_size=64",
    "model.vocab_size=96",
    "train.micro_batch_size=4",
    "train.grad_accum_steps=2",
]


@pytest.mark.integration
def test_one_rank_against_the_plain_pytorch_reference(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [PYTHON, "-m", "launcher.bench", "--ds_config", "ds_configs/zero0.json"]
    result = run([*cmd, *overrides(*SMALL), "--steps", "6", "--warmup", "1", "--reference",
                  "--json", "--out", str(out)])  # fmt: skip
    r = json.loads(out.read_text())
    assert out.read_text().strip() in result.stdout  # the same object, printed
    assert r["world_size"] == 1 and r["zero_stage"] == 0 and r["steps"] == 6
    assert r["params"] == GPT(load_spec(None, SMALL).model).num_params(non_embedding=False)
    tokens = 4 * 2 * 64  # micro x accum x block
    assert r["tokens_per_sec_per_device"] == pytest.approx(tokens / (r["step_ms_median"] / 1000))
    assert r["step_ms_median"] <= r["step_ms_p90"]
    assert 0 < r["mfu"] <= 100 and r["hfu"] == r["mfu"]  # no activation checkpointing
    assert r["peak_flops"] > 0 and "measured" in r["peak_source"]
    ref = r["reference"]
    assert ref["tokens_per_sec_per_device"] > 0 and 0 < ref["mfu"] <= 100
    assert 0.2 < r["vs_reference"] < 5  # the same model: the same order of speed
    low, high = r["vs_reference_iqr"]
    assert low <= r["vs_reference"] <= high


@pytest.mark.integration
def test_two_ranks_zero2_with_activation_checkpointing(tmp_path: Path) -> None:
    cmd = [DEEPSPEED, "--num_gpus", "2", "launcher/bench.py", "--ds_config",
           "ds_configs/zero2.json"]  # fmt: skip
    items = [*SMALL, "model.activation_checkpointing=full"]
    out = tmp_path / "bench.json"
    run([*cmd, *overrides(*items), "--steps", "3", "--warmup", "1", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["world_size"] == 2 and r["zero_stage"] == 2
    assert r["tokens_per_sec"] == pytest.approx(2 * r["tokens_per_sec_per_device"])
    assert r["hfu"] > r["mfu"]  # the recomputed forward is work the hardware did


def test_bad_arguments_exit_2() -> None:
    result = run([PYTHON, "-m", "launcher.bench", "--steps", "0"], check=False)
    assert result.returncode == 2 and "--steps must be >= 1" in result.stderr
    bad = ["--sampling", "gpt2-124m", "--new-tokens", "0", "--batch", "0"]
    result = run([PYTHON, "-m", "launcher.bench", *bad], check=False)
    assert (
        result.returncode == 2 and "--new-tokens 0, --batch 0: each must be >= 1" in result.stderr
    )


@pytest.mark.parametrize("shape", ["gpt2-124m", "llama-124m"])
def test_sampling_without_and_with_the_kv_cache(tmp_path: Path, shape: str) -> None:
    """The plumbing of `zerolaunch bench --sampling` on a cut-down shape (the figures themselves
    are docs/benchmarks.md's)."""
    small = ["model.n_layer=1", "model.n_embd=64", "model.n_head=8", "model.vocab_size=96",
             "model.block_size=32"]  # fmt: skip
    out = tmp_path / "sampling.json"
    cmd = [PYTHON, "-m", "launcher.bench", "--sampling", shape, *overrides(*small)]
    args = ["--new-tokens", "40", "--prompt-tokens", "3", "--batch", "2", "--repeats", "2"]
    result = run([*cmd, *args, "--out", str(out)])
    r = json.loads(out.read_text())
    assert result.stdout.startswith(f"{shape} (") and "the same tokens: yes" in result.stdout
    assert r["same_tokens"] and r["new_tokens"] == 40 and r["batch"] == 2
    for mode in ("uncached", "cached"):
        figures = r[mode]
        assert len(figures["samples_s"]) == 2
        assert figures["tokens_per_sec"] == pytest.approx(2 * 40 / figures["seconds"])
    assert r["speedup"] == pytest.approx(r["uncached"]["seconds"] / r["cached"]["seconds"])
    llama = shape.startswith("llama")
    assert r["model"]["positions"] == ("rope" if llama else "learned")
    assert r["model"]["kv_heads"] == (4 if llama else 8) and r["model"]["n_layer"] == 1
