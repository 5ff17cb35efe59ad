"""Real training runs: several DeepSpeed ranks, checkpoints on disk, resume, sampling."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import DEEPSPEED, PYTHON, TINY, ZEROLAUNCH, overrides, read_metrics, run

pytestmark = pytest.mark.integration


def test_deepspeed_zero2_two_ranks_trains_checkpoints_and_resumes(
    tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    base = [*TINY, f"data.train={tiny_data}", f"out_dir={out}", "checkpoint.keep_last=2"]
    cmd = [DEEPSPEED, "--num_gpus", "2", "launcher/run.py", "--ds_config", "ds_configs/zero2.json"]
    first = run([*cmd, *overrides(*base, "train.max_steps=30")])
    assert "engine: ZeRO stage 2, 2 rank(s)" in first.stdout
    metrics = read_metrics(out)
    losses = [m["Loss/train"] for m in metrics if "Loss/train" in m]
    assert [m["step"] for m in metrics if "Loss/train" in m] == [5, 10, 15, 20, 25, 30]
    assert losses[-1] < losses[0] - 0.8, losses  # from ~4.5 (uniform) to well below
    assert [m["step"] for m in metrics if "Loss/val" in m] == [10, 20, 30]
    assert all(
        m["Timing/tokens_per_sec"] > 0 and m["Timing/dt_avg"] > 0
        for m in metrics
        if "Loss/train" in m
    )
    tag = out / "checkpoints" / "global_step30"
    for rank in (0, 1):
        assert (tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").stat().st_size > 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "global_step30"
    assert (out / "spec.yaml").exists() and (out / "ds_config.json").exists()
    assert "--- sample ---\nWhat is an LLM?" in first.stdout

    second = run([*cmd, *overrides(*base, "train.max_steps=40")])
    assert "resumed from" in second.stdout and "global_step30 at step 30" in second.stdout
    steps = [m["step"] for m in read_metrics(out) if "Loss/train" in m]
    assert steps == [5, 10, 15, 20, 25, 30, 35, 40]  # continued, nothing repeated
    resumed_loss = next(m["Loss/train"] for m in read_metrics(out) if m["step"] == 35)
    assert resumed_loss < losses[0] - 0.8  # the trained weights were loaded, not a fresh model
    tags = sorted(p.name for p in (out / "checkpoints").glob("global_step*"))
    assert tags == ["global_step30", "global_step40"]  # keep_last=2 rotated the rest

    sample = run(
        [
            PYTHON,
            "-m",
            "launcher.sample",
            "--run",
            str(out),
            "--prompt",
            "def ",
            "--max-new-tokens",
            "30",
        ]
    )
    assert sample.stdout.startswith("def ") and len(sample.stdout.rstrip("\n")) == 34
    shutil.rmtree(out)


def test_zerolaunch_train_from_another_folder_with_blended_data(
    tiny_data: Path, tmp_path: Path
) -> None:
    # A second dataset with the same tokenizer: blended 3:1 with the first.
    other = tmp_path / "other" / "copy"
    other.parent.mkdir()
    for suffix in (".bin", ".idx", ".json"):
        shutil.copyfile(f"{tiny_data}{suffix}", f"{other}{suffix}")
    out = tmp_path / "single"
    blend = f"data.train=[{{path: {tiny_data}, weight: 3}}, {{path: {other}, weight: 1}}]"
    # The installed command, one process, run outside the checkout: the default spec and the
    # shipped DeepSpeed JSON (named the Hugging Face way) are found in the project.
    cmd = [ZEROLAUNCH, "train", "--deepspeed", "ds_configs/zero0.json"]
    items = overrides(*TINY, blend, f"out_dir={out}", "train.max_steps=10")
    result = run([*cmd, *items], cwd=tmp_path)
    assert "run shakespeare_char" in result.stdout  # launcher/specs/shakespeare_char.yaml
    assert "ZeRO stage 0, 1 rank(s)" in result.stdout
    assert "data: stdlib x3, copy x1" in result.stdout
    last = read_metrics(out)[-1]
    assert last["step"] == 10 and last["consumed_samples"] == 80
    # 80 samples of 64 tokens, exactly 3:1.
    assert last["Data/stdlib/tokens"] == 60 * 64 and last["Data/copy/tokens"] == 20 * 64
    assert 0 < last["Data/copy/epoch"] < last["Data/stdlib/epoch"]
    assert (out / "checkpoints" / "global_step10" / "mp_rank_00_model_states.pt").exists()
    shutil.rmtree(out)


def test_torchrun_zero3_two_processes(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "zero3"
    torchrun = str(Path(PYTHON).with_name("torchrun"))
    result = run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "launcher/run.py",
            "--ds_config",
            "ds_configs/zero3.json",
            *overrides(
                *TINY,
                f"data.train={tiny_data}",
                f"out_dir={out}",
                "train.max_steps=10",
                "train.grad_accum_steps=2",
            ),
        ]
    )
    assert "ZeRO stage 3, 2 rank(s)" in result.stdout
    assert "batch 32 sequences" in result.stdout  # 8 micro x 2 accum x 2 ranks
    assert "--- sample ---" in result.stdout
    metrics = read_metrics(out)
    assert metrics[-1]["step"] == 10 and "Loss/val" in metrics[-1]
    sample = run([ZEROLAUNCH, "sample", "--run", str(out), "--max-new-tokens", "5"])
    assert sample.stdout.startswith("What is an LLM?")
    # Sharded parameters consolidate into the Hugging Face layout too.
    run([ZEROLAUNCH, "export", "--run", str(out), "--out", str(tmp_path / "hf")])
    exported = run(
        [
            PYTHON,
            "-m",
            "launcher.sample",
            "--run",
            str(tmp_path / "hf"),
            "--max-new-tokens",
            "5",
            "--temperature",
            "0",
        ]
    )
    greedy = run(
        [
            PYTHON,
            "-m",
            "launcher.sample",
            "--run",
            str(out),
            "--max-new-tokens",
            "5",
            "--temperature",
            "0",
        ]
    )
    assert exported.stdout == greedy.stdout
    shutil.rmtree(out)
