"""Turns what the training loop measures into the named metrics, once per log step.

Every rank accumulates on its device without synchronising; at a log step one all-reduce gives
the mean losses over all ranks and the peak memory of the fullest device, and rank 0 writes.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.distributed as dist

from data_pipeline.gpt_dataset import BlendedSamples
from launcher.monitoring import mfu
from launcher.monitoring.overfit import OverfitDetector
from launcher.monitoring.sinks import Sinks
from launcher.monitoring.timing import StepTimer


class StepLoss(NamedTuple):
    """One optimizer step's losses on this rank, still on the device."""

    mean: torch.Tensor
    """Mean over the step's micro-batches."""
    last_micro: torch.Tensor
    """The last micro-batch's loss."""


@dataclass(frozen=True)
class Throughput:
    """The constants that turn step times into tokens/s, MFU and HFU."""

    tokens_per_step: int
    """Tokens of one optimizer step over all ranks."""
    block_size: int
    """Tokens per sample."""
    world_size: int
    """Ranks sharing the tokens."""
    flops_per_token: int
    """Training FLOPs per token of the model (PaLM formula)."""
    peak_flops: float
    """Peak FLOP/s of one device; 0 where unknown (ranks other than 0): no MFU."""
    recompute_fraction: float
    """Share of blocks recomputed in backward (activation checkpointing), for HFU."""
    remeasure_peak: Callable[[], float] | None = None
    """Measures the peak again (a measured peak only): called when MFU comes out above 100%."""

    def rates(self, steps: int, seconds: float) -> dict[str, float]:
        """tokens/s (all ranks and per device), MFU and HFU over `steps` steps in `seconds`."""
        tokens_per_sec = steps * self.tokens_per_step / max(seconds, 1e-9)
        per_device = tokens_per_sec / self.world_size
        forward_recomputed = self.flops_per_token / 3 * self.recompute_fraction
        return {
            "tokens_per_sec": tokens_per_sec,
            "per_device": per_device,
            "mfu": mfu.mfu(self.flops_per_token, per_device, self.peak_flops)
            if self.peak_flops
            else 0.0,
            "hfu": mfu.hfu(self.flops_per_token, forward_recomputed, per_device, self.peak_flops)
            if self.peak_flops
            else 0.0,
        }


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process's device: allocated on GPUs, resident set size on CPUs."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def val_set_metrics(losses: dict[str, float]) -> dict[str, float]:
    """Loss/val/<name> of each named val set (the training loop and `zerolaunch eval` alike)."""
    return {f"Loss/val/{name}": loss for name, loss in losses.items()}


def task_metrics(task: str, scores: dict[str, float]) -> dict[str, float]:
    """Eval/<task>/<metric> of a downstream task's scores (acc, acc_norm or ppl; not `n`)."""
    return {f"Eval/{task}/{metric}": value for metric, value in scores.items() if metric != "n"}


def data_metrics(samples: BlendedSamples, consumed_samples: int) -> dict[str, float]:
    """consumed_samples, Data/epoch (the first source's) and per-source tokens and epochs."""
    progress = samples.progress(consumed_samples)
    record = {
        "consumed_samples": consumed_samples,
        "Data/epoch": next(iter(progress.values()))["epoch"],
    }
    for name, p in progress.items():
        record[f"Data/{name}/tokens"] = p["tokens"]
        record[f"Data/{name}/epoch"] = p["epoch"]
    return record


class Reporter:
    """Accumulates per step, reduces and writes per log step; only rank 0 has sinks."""

    def __init__(
        self,
        throughput: Throughput,
        timer: StepTimer,
        detector: OverfitDetector,
        sinks: Sinks | None,
        started_at: float,
    ) -> None:
        self.throughput, self.timer, self.detector, self.sinks = throughput, timer, detector, sinks
        self.started_at, self.startup_time = started_at, None
        device = timer.device
        self.window_loss = torch.zeros((), device=device)
        self.total_loss = torch.zeros((), device=device)
        self.last_micro = torch.zeros((), device=device)
        self.window_steps = self.total_steps = 0
        self.totals = {"step": 0.0, "forward": 0.0, "backward": 0.0}
        self.losses: dict[str, float] = {}
        """The latest train_loss, val_loss and val_step, for the checkpoint's metadata."""
        self.last_finite: tuple[int, float] | None = None
        """(step, train loss) of the last log window whose loss was finite."""
        self.capped = False

    def step_started(self) -> None:
        """Call at the start of every step (its micro-steps' timing marks follow)."""
        if self.startup_time is None:
            self.startup_time = time.perf_counter() - self.started_at
        self.timer.begin_step()

    def step_done(self, loss: StepLoss) -> None:
        self.window_loss += loss.mean
        self.total_loss += loss.mean
        self.last_micro = loss.last_micro
        self.window_steps += 1
        self.total_steps += 1

    def _reduce(self) -> tuple[float, float, float, float]:
        """(window mean, launch mean, last micro loss) over ranks, and the peak GiB of any rank."""
        window = self.window_loss / self.window_steps
        sums = torch.stack([window, self.total_loss / self.total_steps, self.last_micro]).float()
        dist.all_reduce(sums)
        device = self.timer.device
        memory = torch.tensor([peak_memory_gib(device)], device=device)
        dist.all_reduce(memory, op=dist.ReduceOp.MAX)
        window, total, last = (sums / self.throughput.world_size).tolist()
        return window, total, last, memory.item()

    def train_record(self, step: int, lr: float) -> dict:
        """The Training/Loss/Timing/Memory metrics of the window ending at `step`."""
        window, total, last, memory = self._reduce()
        times = self.timer.collect()
        for key in self.totals:
            self.totals[key] += times[key]
        n = max(times["steps"], 1)
        rates = self._rates(n, times["step"])
        block = self.throughput.block_size
        self.losses["train_loss"] = window
        if math.isfinite(window):
            self.last_finite = (step, window)
        self.window_loss.zero_()
        self.window_steps = 0
        record = {
            "Training/iter": step,
            "Training/loss": window,
            "Training/loss_tot": total,
            "Training/lr": lr,
            "Loss/iter": step,
            "Loss/train": window,
            "Loss/lossf": last,
            "Loss/mfu": rates["mfu"],
            "Timing/iter": step,
            "Timing/dt_iter": times["last_step"],
            "Timing/dt_avg": times["step"] / n,
            "Timing/dt_tot": self.totals["step"],
            "Timing/startup_time": self.startup_time or 0.0,
            "Timing/samples_per_sec": rates["tokens_per_sec"] / block,
            "Timing/samples_per_sec_per_gpu": rates["per_device"] / block,
            "Timing/tokens_per_sec": rates["tokens_per_sec"],
            "Timing/tokens_per_sec_per_gpu": rates["per_device"],
            "Memory/peak_gib": memory,
        }
        if self.throughput.recompute_fraction:  # the recomputed forward is work done too
            record["Loss/hfu"] = rates["hfu"]
        if self.timer.detailed:
            for name, key in (("dtf", "forward"), ("dtb", "backward")):
                record[f"Timing/{name}_avg"] = times[key] / n
                record[f"Timing/{name}_tot"] = self.totals[key]
        return record

    def _rates(self, steps: int, seconds: float) -> dict[str, float]:
        """Throughput and utilisation; never MFU or HFU above 100%: a measured peak that gives
        more is measured again (it was measured on a busy machine), and what still exceeds it
        is capped, with one warning."""
        rates = self.throughput.rates(steps, seconds)
        remeasure = self.throughput.remeasure_peak
        if max(rates["mfu"], rates["hfu"]) > 100.0 and remeasure is not None:
            old = self.throughput.peak_flops
            self.throughput = replace(self.throughput, peak_flops=remeasure(), remeasure_peak=None)
            print(
                f"warning: MFU above 100% against the measured peak of {old / 1e12:,.3f} TFLOP/s "
                f"(measured on a busy machine?); measured again: "
                f"{self.throughput.peak_flops / 1e12:,.3f} TFLOP/s",
                file=sys.stderr,
                flush=True,
            )
            rates = self.throughput.rates(steps, seconds)
        if max(rates["mfu"], rates["hfu"]) > 100.0 and not self.capped:
            self.capped = True
            print(
                "warning: MFU above 100% of the peak: reported as 100; set monitor.peak_flops "
                "to this device's real peak",
                file=sys.stderr,
                flush=True,
            )
        return rates | {"mfu": min(rates["mfu"], 100.0), "hfu": min(rates["hfu"], 100.0)}

    def val_record(self, step: int, val: float) -> dict:
        """Loss/val and the overfitting view; fires the detector's warning once."""
        self.losses |= {"val_loss": val, "val_step": step}
        fired = self.detector.update(step, val)
        record = {
            "Loss/val": val,
            "Loss/best_val": self.detector.best_val,
            "Loss/perplexity_val": math.exp(min(val, 50.0)),
        }
        if "train_loss" in self.losses:
            record["Loss/val_train_gap"] = val - self.losses["train_loss"]
        if fired and self.sinks is not None:
            self._overfitting(step)
        return record

    def _overfitting(self, step: int) -> None:
        d = self.detector
        text = (
            f"val loss has been above its best ({d.best_val:.4f} at step {d.best_step}) by more "
            f"than {d.min_delta} for {d.patience} evaluations: the model is overfitting"
        )
        print(f"warning: step {step}: {text}", file=sys.stderr, flush=True)
        event = {"event": "overfitting", "step": step, "best_step": d.best_step}
        self.sinks.event({**event, "best_val": d.best_val}, "Overfitting", f"step {step}: {text}")

    def write(self, step: int, record: dict) -> None:
        if self.sinks is not None and record:
            self.sinks.write(step, record)

    def finish(self) -> None:
        if self.sinks is not None:
            self.sinks.finish()
