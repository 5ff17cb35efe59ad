"""Turns what the training loop measures into the named metrics, once per log step.

Every rank accumulates on its device without synchronising; at a log step one all-reduce gives
the mean losses over all ranks and the peak memory of the fullest device, and rank 0 writes.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from data_pipeline.gpt_dataset import BlendedSamples
from launcher import mfu
from launcher.config import RunSpec, spec_to_dict
from launcher.monitor import MetricsLog, OverfitDetector, StepTimer, WandbSink
from model.gpt import recompute_fraction


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process's device: allocated on GPUs, resident set size on CPUs."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def data_metrics(samples: BlendedSamples, consumed_samples: int) -> dict[str, float]:
    """Data/epoch (the first source's) and per-source consumed tokens and epochs."""
    progress = samples.progress(consumed_samples)
    record = {"Data/epoch": next(iter(progress.values()))["epoch"]}
    for name, p in progress.items():
        record[f"Data/{name}/tokens"] = p["tokens"]
        record[f"Data/{name}/epoch"] = p["epoch"]
    return record


class Reporter:
    """Accumulates per step, reduces and writes per log step; rank 0 owns the sinks."""

    def __init__(
        self,
        spec: RunSpec,
        *,
        device: torch.device,
        world_size: int,
        is_main: bool,
        flops_per_token: int,
        samples_per_step: int,
        started_at: float,
        resume_step: int,
        resume_meta: dict | None,
        run_id: str,
        ds_config: dict,
    ) -> None:
        self.spec, self.device, self.world_size, self.is_main = spec, device, world_size, is_main
        self.flops_per_token, self.samples_per_step = flops_per_token, samples_per_step
        self.started_at, self.startup_time = started_at, None
        self.recompute = recompute_fraction(spec.model)
        self.timer = StepTimer(device, spec.monitor.detailed_timing)
        self.window_loss = torch.zeros((), device=device)
        self.total_loss = torch.zeros((), device=device)
        self.last_micro = torch.zeros((), device=device)
        self.window_steps = self.total_steps = 0
        self.totals = {"step": 0.0, "forward": 0.0, "backward": 0.0}
        saved = dict((resume_meta or {}).get("monitor", {}))
        saved |= {"patience": spec.eval.patience, "min_delta": spec.eval.min_delta}  # spec wins
        self.detector = OverfitDetector(**saved)
        self.losses: dict[str, float] = {}
        self.log = MetricsLog(spec.run_dir / "metrics.jsonl", resume_step, is_main)
        self.wandb, self.peak, self.peak_source = None, 0.0, ""
        if is_main:
            half = bool(
                ds_config.get("bf16", {}).get("enabled") or ds_config.get("fp16", {}).get("enabled")
            )
            self.peak, self.peak_source = mfu.device_peak(device, half, spec.monitor.peak_flops)
            config = {"spec": spec_to_dict(spec), "ds_config": ds_config}
            self.wandb = WandbSink(spec.monitor.wandb, spec.name, spec.run_dir, run_id, config)

    def step_started(self) -> list:
        """Call at the start of a step; returns the list its micro-step marks go into."""
        if self.startup_time is None:
            self.startup_time = time.perf_counter() - self.started_at
        micro_marks: list = []
        self.timer.steps.append(micro_marks)
        return micro_marks

    def step_done(self, mean_loss: torch.Tensor, last_micro: torch.Tensor) -> None:
        self.window_loss += mean_loss
        self.total_loss += mean_loss
        self.last_micro = last_micro
        self.window_steps += 1
        self.total_steps += 1

    def _reduce(self) -> tuple[float, float, float, float]:
        """(window mean, launch mean, last micro loss) over ranks, and the peak GiB of any rank."""
        window = self.window_loss / self.window_steps
        sums = torch.stack([window, self.total_loss / self.total_steps, self.last_micro]).float()
        dist.all_reduce(sums)
        memory = torch.tensor([peak_memory_gib(self.device)], device=self.device)
        dist.all_reduce(memory, op=dist.ReduceOp.MAX)
        window, total, last = (sums / self.world_size).tolist()
        return window, total, last, memory.item()

    def train_record(
        self, step: int, lr: float, samples: BlendedSamples, consumed_samples: int
    ) -> dict:
        """The Training/Loss/Timing/Memory/Data metrics of the window ending at `step`."""
        window, total, last, memory = self._reduce()
        times = self.timer.collect()
        for key in self.totals:
            self.totals[key] += times[key]
        n = max(times["steps"], 1)
        tokens = n * self.samples_per_step * self.spec.model.block_size
        tokens_per_sec = tokens / max(times["step"], 1e-9)
        per_device = tokens_per_sec / self.world_size
        self.losses["train_loss"] = window
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
            "Loss/mfu": mfu.mfu(self.flops_per_token, per_device, self.peak) if self.peak else 0.0,
            "Timing/iter": step,
            "Timing/dt_iter": times["last_step"],
            "Timing/dt_avg": times["step"] / n,
            "Timing/dt_tot": self.totals["step"],
            "Timing/startup_time": self.startup_time or 0.0,
            "Timing/samples_per_sec": tokens_per_sec / self.spec.model.block_size,
            "Timing/samples_per_sec_per_gpu": per_device / self.spec.model.block_size,
            "Timing/tokens_per_sec": tokens_per_sec,
            "Timing/tokens_per_sec_per_gpu": per_device,
            "Memory/peak_gib": memory,
            "consumed_samples": consumed_samples,
            **data_metrics(samples, consumed_samples),
        }
        if self.recompute:  # activation checkpointing: the recomputed forward is work done too
            record["Loss/hfu"] = (
                mfu.hfu(
                    self.flops_per_token,
                    self.flops_per_token / 3 * self.recompute,
                    per_device,
                    self.peak,
                )
                if self.peak
                else 0.0
            )
        if self.timer.detailed:
            for name, key in (("dtf", "forward"), ("dtb", "backward")):
                record[f"Timing/{name}_avg"] = times[key] / n
                record[f"Timing/{name}_tot"] = self.totals[key]
        return record

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
        if fired and self.is_main:
            self._overfitting(step)
        return record

    def _overfitting(self, step: int) -> None:
        d = self.detector
        text = (
            f"val loss has been above its best ({d.best_val:.4f} at step {d.best_step}) by more "
            f"than {d.min_delta} for {d.patience} evaluations: the model is overfitting"
        )
        print(f"warning: step {step}: {text}", file=sys.stderr, flush=True)
        self.log.write(
            {"event": "overfitting", "step": step, "best_step": d.best_step, "best_val": d.best_val}
        )
        if self.wandb:
            self.wandb.alert("Overfitting", f"step {step}: {text}")

    def write(self, step: int, record: dict) -> None:
        if self.is_main and record:
            self.log.write({"step": step, **record})
            if self.wandb:
                self.wandb.log(record, step=step)

    def checkpoint_fields(self) -> dict[str, Any]:
        """Losses and the detector's state, for the checkpoint's metadata."""
        return {**self.losses, "monitor": self.detector.state()}

    def finish(self) -> None:
        if self.wandb:
            self.wandb.finish()
