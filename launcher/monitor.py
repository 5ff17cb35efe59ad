"""What a run reports: metrics.jsonl, one console line per log step, wandb, overfitting alerts.

Metric names are the interface (dashboards use them): `Training/*`, `Loss/*`, `Timing/*`,
`Memory/peak_gib`, `Data/*`. Only rank 0 writes; every value is already reduced over ranks.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from launcher.config import WandbConfig


class StepTimer:
    """Marks in the step (start, forward done, backward+step done) without synchronising.

    On GPUs marks are CUDA events, read once per log line after one synchronise; on CPUs they
    are wall-clock times.
    """

    def __init__(self, device: torch.device, detailed: bool) -> None:
        self.cuda = device.type == "cuda"
        self.detailed = detailed
        self.steps: list[list[tuple[Any, Any, Any]]] = []  # per step: (start, fwd, bwd) per micro

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _seconds(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) / 1000.0 if self.cuda else b - a

    def collect(self) -> dict[str, float]:
        """Sums over the steps since the last call: step, forward and backward seconds."""
        if self.cuda:
            torch.cuda.synchronize()
        out = {"step": 0.0, "forward": 0.0, "backward": 0.0, "last_step": 0.0, "steps": 0}
        for micro in self.steps:
            step_time = self._seconds(micro[0][0], micro[-1][2])
            out["step"] += step_time
            out["last_step"] = step_time
            out["steps"] += 1
            for start, fwd, bwd in micro:
                if fwd is not None:
                    out["forward"] += self._seconds(start, fwd)
                    out["backward"] += self._seconds(fwd, bwd)
        self.steps = []
        return out


@dataclass
class OverfitDetector:
    """Fires once when val has been above its best by more than min_delta for `patience`
    evaluations in a row (while train may keep falling)."""

    patience: int
    min_delta: float
    best_val: float = math.inf
    best_step: int = -1
    rises: int = 0
    fired_at: int | None = None

    def update(self, step: int, val: float) -> bool:
        """Take one evaluation; True when this one makes the detector fire."""
        if val < self.best_val:
            self.best_val, self.best_step, self.rises = val, step, 0
        elif val > self.best_val + self.min_delta:
            self.rises += 1
        else:
            self.rises = 0
        if self.rises >= self.patience and self.fired_at is None:
            self.fired_at = step
            return True
        return False

    def state(self) -> dict:
        return asdict(self)


def resolve_wandb_mode(mode: str | None) -> str:
    """The spec's mode; if null, WANDB_MODE; else online with an API key (env or netrc)."""
    if mode is not None:
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "online" if "api.wandb.ai" in netrc.read_text() else "offline"
    except OSError:
        return "offline"


class WandbSink:
    """A wandb run, or nothing: any wandb failure warns once and logging goes on without it."""

    def __init__(
        self, cfg: WandbConfig, name: str, run_dir: Path, run_id: str, config: dict
    ) -> None:
        self.run = None
        self.mode = resolve_wandb_mode(cfg.mode)
        if not cfg.enabled or self.mode == "disabled":
            return
        try:
            import wandb

            run_dir.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=cfg.name or name,
                group=cfg.group,
                tags=cfg.tags or None,
                mode=self.mode,
                id=run_id,
                resume="allow",
                dir=str(run_dir),
                config=config,
                settings=wandb.Settings(
                    console="off",
                    init_timeout=float(os.environ.get("ZEROLAUNCH_WANDB_INIT_TIMEOUT", "60")),
                ),
            )
        except Exception as e:  # noqa: BLE001 - wandb raises many kinds; none may stop training
            self._fail(e)

    def _fail(self, error: Exception) -> None:
        print(
            f"warning: wandb is off for the rest of this run ({type(error).__name__}: {error}); "
            "metrics.jsonl still has every metric",
            file=sys.stderr,
            flush=True,
        )
        self.run = None

    def log(self, record: dict, step: int) -> None:
        if self.run is not None:
            try:
                self.run.log(record, step=step)
            except Exception as e:  # noqa: BLE001
                self._fail(e)

    def alert(self, title: str, text: str) -> None:
        if self.run is not None:
            try:
                self.run.alert(title=title, text=text)
            except Exception as e:  # noqa: BLE001
                self._fail(e)

    def finish(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as e:  # noqa: BLE001
                self._fail(e)


class MetricsLog:
    """`metrics.jsonl` (one object per log step or event) and the console line, rank 0 only."""

    def __init__(self, path: Path, resume_step: int, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        self.last_val: float | None = None  # printed on every line once known
        self.records: list[dict] = []
        if enabled:
            self._truncate_after(resume_step)

    def _truncate_after(self, step: int) -> None:
        """Drop records past the resumed step (a crash after the last checkpoint leaves some)."""
        kept = []
        if step > 0 and self.path.exists():
            records = [json.loads(line) for line in self.path.read_text().splitlines() if line]
            kept = [r for r in records if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.records = kept
        self.last_val = next((r["Loss/val"] for r in reversed(kept) if "Loss/val" in r), None)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.records.append(record)
        if "event" not in record:
            print(self.line(record), flush=True)

    def line(self, r: dict) -> str:
        parts = [f"step {r['step']:>6}"]
        if "Loss/train" in r:
            parts.append(f"loss {r['Loss/train']:.4f}")
        self.last_val = r.get("Loss/val", self.last_val)
        if self.last_val is not None:
            parts.append(f"val {self.last_val:.4f}")
        if "Training/lr" in r:
            parts.append(f"lr {r['Training/lr']:.2e}")
        if "Timing/tokens_per_sec" in r:
            parts.append(f"{r['Timing/tokens_per_sec']:,.0f} tok/s")
            parts.append(f"{1000 * r['Timing/dt_avg']:.1f} ms/step")
            parts.append(f"mfu {r['Loss/mfu']:.1f}%")
        return " | ".join(parts)
