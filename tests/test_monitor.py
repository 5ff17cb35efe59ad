"""The training monitor: metric names in real wandb files, MFU, overfitting, the report."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from conftest import DEEPSPEED, PYTHON, overrides, read_metrics, run
from wandb_file import alerts, history, run_record

from launcher.checkpoints import store
from launcher.monitoring import mfu
from launcher.monitoring.overfit import OverfitDetector
from launcher.monitoring.sinks import resolve_wandb_mode
from model.gpt import GPTConfig, flops_per_token

NAMES = [
    "Training/iter",
    "Training/loss",
    "Training/loss_tot",
    "Training/lr",
    "Loss/iter",
    "Loss/train",
    "Loss/val",
    "Loss/lossf",
    "Loss/mfu",
    "Loss/val_train_gap",
    "Loss/best_val",
    "Loss/perplexity_val",
    "Timing/iter",
    "Timing/dt_iter",
    "Timing/dt_avg",
    "Timing/dt_tot",
    "Timing/dtf_avg",
    "Timing/dtf_tot",
    "Timing/dtb_avg",
    "Timing/dtb_tot",
    "Timing/startup_time",
    "Timing/samples_per_sec",
    "Timing/samples_per_sec_per_gpu",
    "Timing/tokens_per_sec",
    "Timing/tokens_per_sec_per_gpu",
    "Memory/peak_gib",
    "Data/epoch",
]


def synthetic_curve(steps: int = 40, rise_from: int = 20) -> tuple[list[float], list[float]]:
    """Like a real overfitting run: train falls throughout; val falls, flattens, then rises."""
    rng = np.random.default_rng(0)
    train = [3.0 * math.exp(-s / 15) + 0.5 for s in range(steps)]
    val = [
        3.0 * math.exp(-s / 10) + 1.2 + max(0, s - rise_from) ** 1.5 * 0.02 + rng.normal(0, 0.005)
        for s in range(steps)
    ]
    return train, val


def test_detector_fires_once_after_patience_rises() -> None:
    _, val = synthetic_curve()
    detector = OverfitDetector(patience=3, min_delta=0.01)
    fired = [s for s, v in enumerate(val) if detector.update(s, v)]
    assert len(fired) == 1
    assert detector.best_step in range(18, 25)  # where the curve bottoms out
    assert detector.best_step < fired[0] <= detector.best_step + 8
    assert detector.best_val == min(val[: fired[0] + 1])


def test_detector_ignores_noise_and_plateaus_within_min_delta() -> None:
    rng = np.random.default_rng(1)
    flat = 2.0 + rng.normal(0, 0.003, 200)
    detector = OverfitDetector(patience=3, min_delta=0.02)
    assert not any(detector.update(s, v) for s, v in enumerate(flat))
    falling = [3.0 - 0.01 * s for s in range(100)]
    detector = OverfitDetector(patience=1, min_delta=0.0)
    assert not any(detector.update(s, v) for s, v in enumerate(falling))


def test_detector_state_round_trips() -> None:
    detector = OverfitDetector(patience=2, min_delta=0.0)
    for s, v in enumerate([3.0, 2.0, 2.5, 2.6]):
        detector.update(s, v)
    restored = OverfitDetector(**detector.state())
    assert restored == detector and restored.fired_at == 3


def test_gpt2_124m_flops_and_mfu_on_an_h100() -> None:
    config = GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257)
    per_token = flops_per_token(config)
    assert per_token == 855_166_464
    peak = mfu.table_peak("NVIDIA H100 80GB HBM3", half_precision=True)
    assert peak == 989e12
    # 107,000 tokens/s per GPU (the reference run) on an H100 is 9.25% MFU by this formula.
    assert mfu.mfu(per_token, 107_000, peak) == pytest.approx(9.25, abs=0.01)
    assert mfu.hfu(per_token, per_token / 3, 107_000, peak) > mfu.mfu(per_token, 107_000, peak)


def test_peak_table_prefers_specific_names() -> None:
    assert mfu.table_peak("NVIDIA H100 PCIe", True) == 756e12
    assert mfu.table_peak("NVIDIA A100-SXM4-80GB", False) == 156e12
    assert mfu.table_peak("AMD Instinct MI300X", True) == 1307e12
    assert mfu.table_peak("Some Future GPU", True) is None


def test_cpu_peak_is_measured_once_and_cached(tmp_path: Path, monkeypatch) -> None:
    import torch

    monkeypatch.setenv("ZEROLAUNCH_CACHE", str(tmp_path))
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    first = mfu.cpu_peak(torch.float32)
    assert 1e9 < first < 1e13 and (tmp_path / "cpu_peak.json").exists()
    # Measuring leaves the global RNG alone: rank 0's dropout masks do not depend on the cache.
    assert torch.equal(torch.rand(3), expected)
    assert mfu.cpu_peak(torch.float32) == first


def test_a_stale_or_too_low_cpu_peak_is_measured_again(tmp_path: Path, monkeypatch) -> None:
    import json

    import torch

    monkeypatch.setenv("ZEROLAUNCH_CACHE", str(tmp_path))
    measured = mfu.cpu_peak(torch.float32)
    cache = tmp_path / "cpu_peak.json"
    (key,) = json.loads(cache.read_text())
    cache.write_text(json.dumps({key: 1e6}))  # an older version's bare number: stale
    assert mfu.cpu_peak(torch.float32) > 1e9
    low = {"flops": 1e6, "measured_at": 4e9}  # "measured" on a loaded machine, and recent
    cache.write_text(json.dumps({key: low}))
    assert mfu.cpu_peak(torch.float32) == 1e6  # trusted until something says otherwise
    assert mfu.cpu_peak(torch.float32, refresh=True) > 0.3 * measured  # the best ever seen
    high = {"flops": 1e15, "measured_at": 4e9}
    cache.write_text(json.dumps({key: high}))
    assert mfu.cpu_peak(torch.float32, refresh=True) == 1e15  # a busy re-measure never lowers


def test_mfu_is_never_above_100_percent(capsys) -> None:
    import torch

    from launcher.monitoring.metrics import Reporter, Throughput
    from launcher.monitoring.timing import StepTimer

    def reporter(remeasure):
        # 1,000 tokens/s x 1e6 FLOPs/token = 1 GFLOP/s against a "peak" of 0.1 GFLOP/s.
        throughput = Throughput(1000, 10, 1, 10**6, 1e8, 0.5, remeasure)
        return Reporter(throughput, StepTimer(torch.device("cpu"), False),
                        OverfitDetector(3, 0.0), None, 0.0)  # fmt: skip

    fixed = reporter(lambda: 4e9)._rates(steps=1, seconds=1.0)  # measured again: 4 GFLOP/s
    assert fixed["mfu"] == pytest.approx(25.0) and fixed["hfu"] < 100
    assert "measured again: 0.004 TFLOP/s" in capsys.readouterr().err
    capped = reporter(None)._rates(steps=1, seconds=1.0)  # a given peak: capped, one warning
    assert capped["mfu"] == capped["hfu"] == 100.0
    assert "reported as 100" in capsys.readouterr().err


def test_wandb_mode_defaults(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert resolve_wandb_mode(None) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode(None) == "online"
    assert resolve_wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_wandb_mode(None) == "offline"
    assert resolve_wandb_mode("online") == "online"  # the spec, when it says, wins


# --------------------------------------------------------------------- real runs

# A small model on ~6 KB of text with a different held-out document: it memorises the train
# document, so val falls for ~60 steps and then rises while train keeps falling.
MEMORISE = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=128",
    "model.block_size=64",
    "model.dropout=0.0",
    "train.micro_batch_size=8",
    "train.lr=3e-3",
    "train.min_lr=3e-3",
    "train.warmup_steps=5",
    "train.log_interval=10",
    "eval.interval=10",
    "eval.batches=4",
    "checkpoint.interval=10",
    "checkpoint.keep_last=2",
    "sample.max_new_tokens=0",
    "eval.patience=3",
]


@pytest.fixture(scope="module")
def memorise_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import argparse
    import inspect

    root = tmp_path_factory.mktemp("memorise")
    (root / "text").mkdir()
    source = inspect.getsource(argparse)
    (root / "text" / "a.txt").write_text(source[:6000])
    (root / "text" / "b.txt").write_text(source[20000:22000])
    run(
        [
            PYTHON,
            "-m",
            "data_pipeline.prepare",
            "--input",
            str(root / "text"),
            "--out",
            str(root / "ds"),
            "--val-fraction",
            "0.5",
            "--no-progress",
        ]
    )
    return root / "ds"


def wandb_file(run_dir: Path, index: int = -1) -> Path:
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert files, f"no offline wandb run under {run_dir}"
    return files[index]


@pytest.mark.integration
def test_two_rank_run_logs_every_metric_detects_overfitting_and_resumes_the_same_wandb_run(
    memorise_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    cmd = [DEEPSPEED, "--num_gpus", "2", "launcher/run.py", "--ds_config", "ds_configs/zero2.json"]
    items = [*MEMORISE, f"data.train={memorise_data}", f"out_dir={out}"]
    first = run([*cmd, *overrides(*items, "train.max_steps=200", "eval.early_stop=true")])
    assert "the model is overfitting" in first.stderr and "early stop at step" in first.stdout

    # metrics.jsonl: every name, the overfitting event, the stop right there.
    metrics = read_metrics(out)
    event = next(m for m in metrics if m.get("event") == "overfitting")
    logged = [m for m in metrics if "Loss/train" in m]
    assert logged[-1]["step"] == event["step"] < 200
    assert event["best_step"] < event["step"] and event["best_val"] == min(
        m["Loss/val"] for m in metrics if "Loss/val" in m
    )
    assert store.read_pointer(out / "checkpoints", "best") == f"global_step{event['best_step']}"
    assert (out / "checkpoints" / f"global_step{event['step']}" / store.META_FILE).exists()

    # The real offline wandb file holds the same metrics.
    rows = [r for r in history(wandb_file(out)) if "Loss/train" in r]
    assert [r["_step"] for r in rows] == [m["step"] for m in logged]
    for name in NAMES:
        assert name in set().union(*rows), name
    for row in rows:
        assert 0 < row["Loss/mfu"] < 100 and row["Timing/tokens_per_sec"] > 0
        assert row["Timing/tokens_per_sec"] == pytest.approx(
            2 * row["Timing/tokens_per_sec_per_gpu"]
        )
        assert row["Loss/val"] > 0 and row["Loss/perplexity_val"] == pytest.approx(
            math.exp(row["Loss/val"])
        )
        assert row["Memory/peak_gib"] > 0 and row["Timing/dtf_avg"] < row["Timing/dt_avg"]
    assert [a.title for a in alerts(wandb_file(out))] == ["Overfitting"]
    run_id = run_record(wandb_file(out)).run_id
    assert run_id == store.read_meta(out / "checkpoints" / f"global_step{event['step']}").run_id

    # Resume: same wandb run id, no second alert, training continues past the stop.
    second = run([*cmd, *overrides(*items, f"train.max_steps={event['step'] + 10}")])
    assert "resumed from" in second.stdout
    assert run_record(wandb_file(out, -1)).run_id == run_id
    assert len(list(out.glob("wandb/offline-run-*"))) == 2
    assert "overfitting" not in second.stderr

    report = run([PYTHON, "-m", "launcher.report", str(out)])
    assert report.stdout.strip() == str(out / "report.png")
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "report.png").stat().st_size > 20_000


@pytest.mark.integration
def test_broken_or_disabled_wandb_never_stops_training(memorise_data: Path, tmp_path: Path) -> None:
    base = [PYTHON, "launcher/run.py", "--ds_config", "ds_configs/zero0.json"]
    items = [*MEMORISE, f"data.train={memorise_data}", "train.max_steps=10"]
    broken = run(
        [*base, *overrides(*items, f"out_dir={tmp_path / 'broken'}")],
        WANDB_MODE="online",
        WANDB_API_KEY="x" * 40,
        WANDB_BASE_URL="http://127.0.0.1:9",
        ZEROLAUNCH_WANDB_INIT_TIMEOUT="5",
    )
    assert "warning: wandb is off for the rest of this run" in broken.stderr
    assert read_metrics(tmp_path / "broken")[-1]["step"] == 10
    disabled = run(
        [*base, *overrides(*items, f"out_dir={tmp_path / 'off'}", "monitor.wandb.mode=disabled")]
    )
    assert "wandb" not in disabled.stderr and not (tmp_path / "off" / "wandb").exists()
    assert read_metrics(tmp_path / "off")[-1]["Loss/val"] > 0
