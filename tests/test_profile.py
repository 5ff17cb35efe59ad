"""The profiler switch (train.profile): a real torch profiler over a tiny GPT's real steps,
driven the way the training loop drives it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from launcher.config.spec import ProfileConfig
from launcher.training.profile import StepProfiler
from model.gpt import GPT, GPTConfig

CPU = torch.device("cpu")


def train(profiler: StepProfiler, start_step: int = 0, max_steps: int = 6) -> str | None:
    """A tiny GPT's optimizer steps start_step+1 .. max_steps, as the loop drives the profiler."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 64, (4, 33))
    for step in range(start_step + 1, max_steps + 1):
        profiler.step_started(step)
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        profiler.step_done(step)
    return profiler.close()


def step_markers(trace: Path) -> list[str]:
    events = json.loads(trace.read_text())["traceEvents"]
    return sorted(e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#"))


def test_records_exactly_the_window(tmp_path: Path) -> None:
    profiler = StepProfiler(ProfileConfig(start=3, steps=2), tmp_path, 0, CPU, start_step=0)
    summary = train(profiler)
    trace = tmp_path / "profile" / "rank0.pt.trace.json"
    events = json.loads(trace.read_text())["traceEvents"]
    assert step_markers(trace) == ["ProfilerStep#3", "ProfilerStep#4"]
    assert any(e.get("name") in ("aten::mm", "aten::addmm", "aten::matmul") for e in events)
    print(summary)
    assert summary.startswith("profile of steps 3-4 (")
    assert "ms/step" in summary and "%" in summary and str(trace) in summary
    assert "\n" not in summary
    assert not profiler.active
    assert profiler.close() == summary  # idempotent


def test_off_writes_nothing(tmp_path: Path) -> None:
    profiler = StepProfiler(ProfileConfig(start=3, steps=0), tmp_path, 0, CPU, start_step=0)
    assert train(profiler) is None
    assert not (tmp_path / "profile").exists()


def test_resumed_inside_the_window_records_the_rest(tmp_path: Path) -> None:
    profiler = StepProfiler(ProfileConfig(start=3, steps=2), tmp_path, 0, CPU, start_step=3)
    summary = train(profiler, start_step=3)
    assert step_markers(tmp_path / "profile" / "rank0.pt.trace.json") == ["ProfilerStep#4"]
    assert summary.startswith("profile of step 4 (")


def test_resumed_past_the_window_records_nothing(tmp_path: Path) -> None:
    profiler = StepProfiler(ProfileConfig(start=3, steps=2), tmp_path, 0, CPU, start_step=10)
    assert train(profiler, start_step=10, max_steps=12) is None
    assert not (tmp_path / "profile").exists()


def test_run_ending_before_the_window_says_so(tmp_path: Path) -> None:
    profiler = StepProfiler(ProfileConfig(start=8, steps=2), tmp_path, 0, CPU, start_step=0)
    summary = train(profiler)
    assert summary == "profile of steps 8-9 not recorded: training stopped at step 6"
    assert not (tmp_path / "profile").exists()


def test_other_ranks_write_a_trace_and_no_summary(tmp_path: Path) -> None:
    profiler = StepProfiler(ProfileConfig(start=3, steps=2), tmp_path, 1, CPU, start_step=0)
    assert train(profiler) is None
    assert step_markers(tmp_path / "profile" / "rank1.pt.trace.json") == [
        "ProfilerStep#3",
        "ProfilerStep#4",
    ]


def test_an_exception_inside_the_window_still_stops_and_writes(tmp_path: Path) -> None:
    profiler = StepProfiler(ProfileConfig(start=3, steps=3), tmp_path, 0, CPU, start_step=0)
    profiler.step_started(3)
    profiler.step_done(3)
    profiler.step_started(4)  # the step raises: no step_done
    summary = profiler.close()
    assert not profiler.active
    assert summary.startswith("profile of step 3 (")
    assert "stopped during step 4" in summary
    trace = tmp_path / "profile" / "rank0.pt.trace.json"
    assert step_markers(trace) == ["ProfilerStep#3", "ProfilerStep#4"]  # 4 as far as it got


def test_a_trace_that_cannot_be_written_does_not_raise(tmp_path: Path, capsys) -> None:
    (tmp_path / "profile").write_text("a file where the folder should be")
    profiler = StepProfiler(ProfileConfig(start=1, steps=1), tmp_path, 0, CPU, start_step=0)
    summary = train(profiler, max_steps=2)
    assert "the trace could not be written" in summary
    assert "could not write the trace" in capsys.readouterr().err
