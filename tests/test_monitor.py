"""The training monitor: metric names in real wandb files, TensorBoard and CSV files, MFU,
overfitting, the report."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import DEEPSPEED, PYTHON, REPO, free_port, overrides, read_metrics, run
from wandb_file import alerts, config, declared_metrics, history, run_record

from launcher.checkpoints import store
from launcher.config.spec import WandbConfig
from launcher.monitoring import mfu
from launcher.monitoring.overfit import OverfitDetector
from launcher.monitoring.sinks import (
    CsvSink,
    MetricsLog,
    Sinks,
    TensorBoardSink,
    WandbSink,
    csv_file_name,
    monitor_dir,
    resolve_wandb_mode,
    wandb_settings,
    wandb_summary,
)
from launcher.report import task_accuracies
from launcher.training.engine import deepspeed_config
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


def test_tensorboard_and_csv_go_where_the_spec_or_the_deepspeed_json_says(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert monitor_dir(False, None, out, "tensorboard") is None
    assert monitor_dir(True, None, out, "tensorboard") == out / "tensorboard"
    assert monitor_dir(True, {"enabled": False, "output_path": "/x"}, out, "csv") == out / "csv"
    section = {"enabled": True, "output_path": "/logs", "job_name": "gpt"}
    assert monitor_dir(False, section, out, "tensorboard") == Path("/logs/gpt")  # it wins
    assert monitor_dir(True, {"enabled": True}, out, "csv") == out / "DeepSpeedJobName"
    # DeepSpeed gets neither section: it would write its own 3 metrics into the same directory.
    ds = {"train_batch_size": 16, "tensorboard": section, "csv_monitor": section, "bf16": {}}
    assert deepspeed_config(ds) == {"train_batch_size": 16, "bf16": {}}
    assert "tensorboard" in ds  # the run's ds_config.json keeps them
    assert csv_file_name("Loss/val/wiki") == "Loss_val_wiki.csv"


def test_the_deepspeed_jsons_wandb_section_names_the_one_wandb_run(capsys) -> None:
    section = {"enabled": True, "project": "gpt-neox", "group": "ablation", "team": "lab"}
    named = wandb_settings(WandbConfig(), section)
    assert (named.project, named.group, named.entity) == ("gpt-neox", "ablation", "lab")
    own = WandbConfig(project="mine", group="g", entity="me", tags=["a"])
    assert wandb_settings(own, section) == own  # what the spec names wins
    assert wandb_settings(WandbConfig(), {"enabled": True}) == WandbConfig()
    assert wandb_settings(WandbConfig(), {**section, "enabled": False}) == WandbConfig()
    off = WandbConfig(enabled=False)
    assert wandb_settings(off, section) == off
    assert "wandb section is ignored" in capsys.readouterr().err
    # DeepSpeed never gets it: its own wandb.init would start a second run (samples as steps).
    assert deepspeed_config({"wandb": section, "bf16": {}}) == {"bf16": {}}


def test_wandb_summaries_say_what_matters_of_each_metric() -> None:
    assert [wandb_summary(n) for n in ("Loss/val", "Loss/val/wiki", "Loss/perplexity_val")] == [
        "min"
    ] * 3
    assert [wandb_summary(n) for n in ("Eval/hellaswag/acc", "Eval/hellaswag/acc_norm")] == [
        "max"
    ] * 2
    assert wandb_summary("Eval/lambada/ppl") == "min"
    assert wandb_summary("Training/tokens") == "max"
    assert {wandb_summary(n) for n in ("Loss/train", "Loss/val_train_gap", "Loss/best_val")} == {
        None
    }


def test_a_failing_tensorboard_or_csv_writer_warns_once_and_logging_goes_on(
    tmp_path: Path, capsys
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # no directory can be made under it
    wandb = WandbSink(WandbConfig(enabled=False), "t", tmp_path, "id", {}, 0)
    files = [TensorBoardSink(blocker / "tb", 0), CsvSink(blocker / "csv", 0)]
    sinks = Sinks(MetricsLog(tmp_path / "metrics.jsonl", 0), wandb, files)
    for step in (1, 2):
        sinks.write(step, {"Loss/train": 1.0 / step})
    sinks.finish()
    err = capsys.readouterr().err
    assert err.count("warning: TensorBoard") == 1 and err.count("warning: CSV") == 1
    assert "metrics.jsonl still has every metric" in err
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_a_refused_wandb_rewind_resumes_the_run_as_it_stands(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    import wandb

    real_init = wandb.init

    def init(**kwargs):  # what the server answers for a run it cannot rewind
        if "resume_from" in kwargs:
            raise wandb.errors.CommError("failed to rewind run: run not found")
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setenv("WANDB_MODE", "offline")
    try:
        sink = WandbSink(WandbConfig(), "t", tmp_path, "norewind", {}, rewind_to=20)
        sink.log({"Loss/train": 2.0, "Training/tokens": 2048}, step=21)
        sink.finish()
    finally:  # ends wandb's service and its WANDB_SERVICE, which later runs would inherit
        wandb.teardown()
    assert "wandb refused to rewind run norewind to step 20" in capsys.readouterr().err
    path = wandb_file(tmp_path)
    assert run_record(path).run_id == "norewind" and "branch_point" not in config(path)["_wandb"]
    assert [r["_step"] for r in history(path)] == [21]


def png_size(path: Path) -> tuple[int, int]:
    return struct.unpack(">II", path.read_bytes()[16:24])


def test_the_report_shows_downstream_tasks_and_val_sets_when_logged(tmp_path: Path) -> None:
    records = []
    for step in range(10, 110, 10):
        r = {"step": step, "Loss/train": 3 - step / 50, "Loss/val": 3.2 - step / 60,
             "Loss/val/code": 3.5 - step / 70, "Training/tokens": step * 1024,
             "Timing/tokens_per_sec": 1e4, "Loss/mfu": 30.0, "Training/lr": 1e-3}  # fmt: skip
        if step % 20 == 0:
            r |= {"Eval/hellaswag/acc": 0.25 + step / 1000, "Eval/hellaswag/acc_norm": 0.26,
                  "Eval/lambada/acc": step / 500, "Eval/lambada/ppl": 900 - step}  # fmt: skip
        records.append(r)
    assert task_accuracies(records) == {
        "hellaswag": ["Eval/hellaswag/acc", "Eval/hellaswag/acc_norm"],
        "lambada": ["Eval/lambada/acc"],
    }
    heights = {}
    for name, rows in [
        ("tasks", records),
        ("none", [{k: v for k, v in r.items() if not k.startswith("Eval/")} for r in records]),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        report = run([PYTHON, "-m", "launcher.report", str(tmp_path / name)])
        assert report.stdout.strip() == str(tmp_path / name / "report.png")
        heights[name] = png_size(tmp_path / name / "report.png")[1]
    assert heights == {"tasks": 1402, "none": 935}  # a third row of panels for the tasks


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


def crash_when(proc: subprocess.Popen, ready: Callable[[], bool]) -> None:
    """SIGKILL the whole launch (launcher, ranks, wandb's service) once `ready()`."""
    deadline = time.monotonic() + 180
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)


def scalars(log_dir: Path) -> dict[str, list]:
    """What TensorBoard shows: {tag: [(step, value)]}, purges applied."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}


def csv_rows(path: Path) -> tuple[list[str], list[tuple[int, float]]]:
    header, *rows = list(csv.reader(path.open(newline="")))
    return header, [(int(step), float(value)) for step, value in rows]


@pytest.mark.integration
def test_two_rank_run_logs_every_metric_detects_overfitting_and_resumes_after_a_crash(
    memorise_data: Path, tmp_path: Path
) -> None:
    out, tb_dir = tmp_path / "run", tmp_path / "tb" / "memorise"
    # TensorBoard through the DeepSpeed JSON's own section, CSV through the spec.
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds["tensorboard"] = {"enabled": True, "output_path": str(tb_dir.parent), "job_name": "memorise"}
    ds["wandb"] = {"enabled": True, "project": "from-json", "group": "memorise"}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "launcher/run.py",
           "--ds_config", str(tmp_path / "ds.json")]  # fmt: skip
    items = [*MEMORISE, f"data.train={memorise_data}", f"out_dir={out}", "monitor.csv=true"]
    first = run([*cmd, *overrides(*items, "train.max_steps=200", "eval.early_stop=true")])
    assert "the model is overfitting" in first.stderr and "early stop at step" in first.stdout

    # metrics.jsonl: every name, the overfitting event, the stop right there.
    records = read_metrics(out)
    event = next(m for m in records if m.get("event") == "overfitting")
    logged = [m for m in records if "Loss/train" in m]
    assert logged[-1]["step"] == event["step"] < 200
    assert event["best_step"] < event["step"] and event["best_val"] == min(
        m["Loss/val"] for m in records if "Loss/val" in m
    )
    assert store.read_pointer(out / "checkpoints", "best") == f"global_step{event['best_step']}"
    assert (out / "checkpoints" / f"global_step{event['step']}" / store.META_FILE).exists()

    # The real offline wandb file holds the same metrics.
    first_file = wandb_file(out)
    rows = [r for r in history(first_file) if "Loss/train" in r]
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
    assert [a.title for a in alerts(first_file)] == ["Overfitting"]
    run_id = run_record(first_file).run_id
    # The DeepSpeed JSON's wandb section named the one run (DeepSpeed started none of its own).
    assert (run_record(first_file).project, run_record(first_file).run_group) == (
        "from-json",
        "memorise",
    )
    assert not any(name.startswith("Train/Samples") for name in set().union(*rows))
    assert run_id == store.read_meta(out / "checkpoints" / f"global_step{event['step']}").run_id
    declared = declared_metrics(first_file)
    assert declared["Training/tokens"].summary.max and declared["Loss/val"].summary.min

    # A resumed launch crashes (SIGKILL) after logging steps past its checkpoint; the next one
    # logs those steps again.
    saved = event["step"]
    every_step = ["train.log_interval=1", "checkpoint.interval=0"]
    # wandb-core writes the offline file every 15 s: every 0.2 s here, so the crash finds rows
    # past the checkpoint in it (online, they would have reached the server).
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline",
           "WANDB__TRANSACTION_LOG_FLUSH_INTERVAL": "0.2"}  # fmt: skip
    crashed = subprocess.Popen(
        [*cmd, *overrides(*items, *every_step, f"train.max_steps={saved + 1000}")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip

    def rows_written() -> list[dict]:
        files = sorted(out.glob("wandb/offline-run-*/run-*.wandb"))
        return history(files[1]) if len(files) == 2 and files[1].stat().st_size > 7 else []

    crash_when(crashed, lambda: len(rows_written()) >= 3)
    assert store.read_pointer(out / "checkpoints", store.LATEST) == f"global_step{saved}"
    # What the crash left past the checkpoint, in every sink (TensorBoard: a purge to come).
    assert max(step for step, _ in scalars(tb_dir)["Loss/train"]) >= saved + 3
    assert csv_rows(out / "csv" / "Loss_train.csv")[1][-1][0] >= saved + 3
    second = run([*cmd, *overrides(*items, *every_step, f"train.max_steps={saved + 10}")])
    assert "resumed from" in second.stdout and "overfitting" not in second.stderr
    assert len(list(out.glob("wandb/offline-run-*"))) == 3

    # wandb: the launch after the crash rewinds the same run to the checkpoint's step, so the
    # history the server shows is the rows up to it, then the resumed launch's. The crashed
    # launch itself had nothing to rewind (its predecessor stopped at its checkpoint).
    crashed_file, resumed_file = wandb_file(out, 1), wandb_file(out, 2)
    crashed_rows = [r["_step"] for r in history(crashed_file)]
    assert crashed_rows[:3] == [saved + 1, saved + 2, saved + 3]  # flushed before the kill
    assert "branch_point" not in config(crashed_file)["_wandb"]
    assert run_record(resumed_file).run_id == run_id
    assert config(resumed_file)["_wandb"]["branch_point"] == {"run_id": run_id, "step": saved}
    assert declared_metrics(resumed_file)["Training/tokens"].summary.max
    resumed = history(resumed_file)
    assert [r["_step"] for r in resumed] == list(range(saved + 1, saved + 11))
    kept = [r["_step"] for r in history(first_file) + history(crashed_file) if r["_step"] <= saved]
    shown = kept + [r["_step"] for r in resumed]
    assert shown == sorted(set(shown))  # strictly increasing: nothing logged twice
    final = [m for m in read_metrics(out) if "Loss/train" in m]
    assert [r["Loss/train"] for r in resumed] == [m["Loss/train"] for m in final[-10:]]

    # TensorBoard and CSV: every metric, the crashed launch's steps past the checkpoint gone.
    shown_tb, csv_dir = scalars(tb_dir), out / "csv"
    names = set().union(*(m.keys() for m in read_metrics(out) if "event" not in m)) - {"step"}
    assert shown_tb.keys() == names  # DeepSpeed's own writer (Train/Samples/*) is kept out
    for tag, points in shown_tb.items():
        steps = [step for step, _ in points]
        assert steps == sorted(set(steps)), tag
    assert shown_tb["Loss/train"] == [
        (m["step"], pytest.approx(m["Loss/train"], rel=1e-6)) for m in final
    ]
    header, loss_rows = csv_rows(csv_dir / "Loss_train.csv")
    assert header == ["step", "Loss/train"]
    assert loss_rows == [(m["step"], m["Loss/train"]) for m in final]  # the same floats
    assert {p.name for p in csv_dir.iterdir()} == {csv_file_name(n) for n in names}

    report = run([PYTHON, "-m", "launcher.report", str(out)])
    assert report.stdout.strip() == str(out / "report.png")
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "report.png").stat().st_size > 20_000
    assert png_size(out / "report.png")[1] == 935  # no downstream tasks: no task panel


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
