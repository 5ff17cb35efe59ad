"""A torch profiler trace of a few optimizer steps (`train.profile: {start, steps}`).

Every rank records steps start .. start + steps - 1 and writes one Chrome trace,
out_dir/profile/rank<N>.pt.trace.json. Each recorded step is a `ProfilerStep#<step>` range
(the step numbers the log prints), with the aten operators, the CUDA kernels on a GPU, and
memory allocations (profile_memory) inside it. To look at it:

- https://ui.perfetto.dev (Open trace file) or chrome://tracing (Load): one file, one rank;
  traces of several ranks can be opened side by side in separate tabs.
- `tensorboard --logdir out_dir/profile` with the torch-tb-profiler plugin
  (`pip install torch-tb-profiler`, no longer maintained by PyTorch): it takes any folder holding
  `*.pt.trace.json` files as a run, here a run named `profile` whose workers are rank0, rank1, ...
  (TensorBoard's own `plugins/profile/<run>/` layout is for TensorFlow's xplane files, not
  these.)

Rank 0 also gets a one-line summary for the end of training: milliseconds per recorded step and
the operators that took the most self time (device time on a GPU, CPU time otherwise).

The profiler is started and stopped directly, not through torch.profiler.schedule, so the trace
holds exactly the requested steps and nothing is recorded outside the window. Cost, measured on
CPU only (a 4-layer, 256-wide GPT, 0.21-0.25 s steps, 5 steps recorded): the step time did not
change beyond noise, with or without profile_memory; profile_memory made the trace 7.4 MB instead
of 4.5 MB and its export 70 ms instead of 40 ms. Not yet measured on a GPU, where the per-op
bookkeeping weighs more against short kernels, so the recorded ms/step may read a little high.
With profile_memory torch warns once ("Memory block of unknown size was allocated before the
profiling started"): blocks allocated before the window have no allocation event; harmless.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from launcher.config.spec import ProfileConfig

STEP_MARKER = "ProfilerStep#"
"""Name prefix of each recorded step's range; the step number follows (ProfilerStep#5)."""
TOP_OPS = 4
"""Operators named in the summary."""


def trace_path(out_dir: Path, rank: int) -> Path:
    """Where a rank's trace goes."""
    return out_dir / "profile" / f"rank{rank}.pt.trace.json"


def profiled_steps(cfg: ProfileConfig, start_step: int) -> range:
    """The steps a launch that has already done start_step steps records (empty: none)."""
    if cfg.steps <= 0:
        return range(0)
    return range(max(cfg.start, start_step + 1), cfg.start + cfg.steps)


class StepProfiler:
    """Records the window of train.profile, driven by the loop with step_started/step_done."""

    def __init__(
        self, cfg: ProfileConfig, out_dir: Path, rank: int, device: torch.device, start_step: int
    ) -> None:
        """start_step: optimizer steps already done when this launch starts (a resumed run);
        steps before cfg.start are not recorded; a window already passed
        (start_step >= cfg.start + cfg.steps - 1) records nothing, and a window the run starts
        inside records its remaining steps."""
        self.steps = profiled_steps(cfg, start_step)
        self.path = trace_path(out_dir, rank)
        self.rank = rank
        self.device = device
        self._prof: profile | None = None
        self._marker: record_function | None = None
        self._started_at = 0.0
        self._done_at = 0.0
        self._unfinished: int | None = None
        self._recorded: list[int] = []
        self._last_step = start_step
        self._summary: str | None = None
        self._closed = False

    @property
    def active(self) -> bool:
        """True while the profiler is recording."""
        return self._prof is not None

    def step_started(self, step: int) -> None:
        """Step `step` (1-based) is about to run: start the profiler on the window's first step,
        and open the step's marker inside the window."""
        if self._closed or step not in self.steps:
            return
        if self._prof is None and step == self.steps[0]:
            self._start()
        if self._prof is not None:
            self._marker = record_function(f"{STEP_MARKER}{step}")
            self._marker.__enter__()
            self._unfinished = step

    def step_done(self, step: int) -> None:
        """Step `step` finished: close its marker, and stop and export after the last one."""
        self._last_step = max(self._last_step, step)
        if self._prof is None:
            return
        self._close_marker()
        self._unfinished = None
        self._recorded.append(step)
        self._done_at = time.perf_counter()
        if step == self.steps[-1]:
            self._finish()

    def close(self) -> str | None:
        """Stop (idempotent, also after an exception) and write what was recorded; returns the
        one-line summary on rank 0, None on other ranks or when the window was not reached."""
        if not self._closed:
            self._closed = True
            if self._prof is not None:
                self._close_marker()
                self._finish()
            elif self._summary is None and self.steps and self._last_step < self.steps[0]:
                self._summary = self._not_recorded()
        return self._summary if self.rank == 0 else None

    def _start(self) -> None:
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        prof = profile(
            activities=activities, record_shapes=False, with_stack=False, profile_memory=True
        )
        try:
            prof.start()
        except Exception as error:  # e.g. another profiler already running
            self._warn(f"could not start the profiler: {error}")
            self._summary = f"profile of {_span(self.steps)} not recorded: {error}"
            self._closed = True
            return
        self._prof = prof
        self._started_at = time.perf_counter()

    def _close_marker(self) -> None:
        if self._marker is not None:
            marker, self._marker = self._marker, None
            marker.__exit__(None, None, None)

    def _finish(self) -> None:
        """Stop the profiler (after the device's queued kernels) and write the trace."""
        prof, self._prof = self._prof, None
        self._closed = True
        try:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            wall_s = time.perf_counter() - self._started_at
            prof.stop()
        except Exception as error:
            self._warn(f"the profiler failed to stop: {error}")
            self._summary = f"profile of {self._recorded_span()}: failed: {error}"
            return
        if not self._recorded:
            self._summary = self._not_recorded()
            return
        on_device = self.device.type == "cuda"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(self.path))
        except Exception as error:
            self._warn(f"could not write the trace {self.path}: {error}")
            written = f"the trace could not be written to {self.path}: {error}"
        else:
            written = f"trace {self.path} (Perfetto, chrome://tracing)"
        try:
            ops = top_ops(prof.key_averages(), on_device, wall_s)
        except Exception as error:
            ops = f"no operator table: {error}"
        # A step cut short counts in the trace and the shares but not in the time per step.
        window_s = wall_s if self._unfinished is None else self._done_at - self._started_at
        per_step_ms = 1000 * window_s / len(self._recorded)
        cut = "" if self._unfinished is None else f"; stopped during step {self._unfinished}"
        self._summary = (
            f"profile of {self._recorded_span()} ({per_step_ms:.1f} ms/step): {ops}{cut}; {written}"
        )

    def _not_recorded(self) -> str:
        stopped = f"training stopped at step {self._last_step}"
        return f"profile of {_span(self.steps)} not recorded: {stopped}"

    def _recorded_span(self) -> str:
        return _span(self._recorded) if self._recorded else _span(self.steps)

    def _warn(self, message: str) -> None:
        print(f"[rank {self.rank}] profile: {message}", file=sys.stderr, flush=True)


def top_ops(averages: list, on_device: bool, wall_s: float) -> str:
    """'aten::mm 38%, ...': the operators with the most self time (device time on a GPU, CPU
    time otherwise), as a share of the recorded wall time."""
    times: list[tuple[float, str]] = []
    for event in averages:
        # Step ranges (merged as ProfilerStep*) are not operators; a kernel's time is counted
        # in the operator that launched it.
        if event.key.startswith("ProfilerStep") or event.device_type != DeviceType.CPU:
            continue
        self_us = _self_device_us(event) if on_device else event.self_cpu_time_total
        if self_us > 0:
            times.append((self_us, event.key))
    times.sort(reverse=True)
    wall_us = max(wall_s * 1e6, 1e-9)
    kind = "" if on_device else "CPU "
    shares = [f"{name} {100 * us / wall_us:.0f}%" for us, name in times[:TOP_OPS]]
    return ", ".join(shares) if shares else f"no {kind}operator time recorded"


def _self_device_us(event) -> float:
    total = getattr(event, "self_device_time_total", None)
    return total if total is not None else event.self_cuda_time_total


def _span(steps) -> str:
    steps = list(steps)
    return f"steps {steps[0]}-{steps[-1]}" if len(steps) > 1 else f"step {steps[0]}"
