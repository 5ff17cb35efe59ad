"""Where rank 0's metrics go: metrics.jsonl plus one console line per log step, and wandb.

Metric names are the interface (dashboards use them): `Training/*`, `Loss/*`, `Timing/*`,
`Memory/peak_gib`, `Data/*`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from launcher.config.spec import WandbConfig


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
    """`metrics.jsonl` (one object per log step or event) and the console line."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        self.last_val: float | None = None  # printed on every line once known
        self._truncate_after(resume_step)

    def _truncate_after(self, step: int) -> None:
        """Drop records past the resumed step (a crash after the last checkpoint leaves some)."""
        kept = []
        if step > 0 and self.path.exists():
            records = [json.loads(line) for line in self.path.read_text().splitlines() if line]
            kept = [r for r in records if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.last_val = next((r["Loss/val"] for r in reversed(kept) if "Loss/val" in r), None)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
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


class Sinks:
    """Rank 0's outputs together: metrics.jsonl (and the console line) and wandb."""

    def __init__(self, log: MetricsLog, wandb: WandbSink) -> None:
        self.log, self.wandb = log, wandb

    def write(self, step: int, record: dict) -> None:
        self.log.write({"step": step, **record})
        self.wandb.log(record, step=step)

    def event(self, record: dict, title: str, text: str) -> None:
        """A one-off event (e.g. overfitting): a metrics.jsonl record and a wandb alert."""
        self.log.write(record)
        self.wandb.alert(title, text)

    def finish(self) -> None:
        self.wandb.finish()
