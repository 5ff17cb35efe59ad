"""Where rank 0's metrics go: metrics.jsonl plus one console line per log step, wandb, and
TensorBoard event files and CSV files when asked for.

Metric names are the interface (dashboards use them): `Training/*`, `Loss/*`, `Timing/*`,
`Memory/peak_gib`, `Data/*`, `Eval/*`.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from launcher.config.spec import MonitorConfig, WandbConfig

DEEPSPEED_JOB_NAME = "DeepSpeedJobName"
"""DeepSpeed's default `job_name` of its `tensorboard` and `csv_monitor` sections."""


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


def _warn_off(sink: str, error: Exception) -> None:
    print(
        f"warning: {sink} is off for the rest of this run ({type(error).__name__}: {error}); "
        "metrics.jsonl still has every metric",
        file=sys.stderr,
        flush=True,
    )


def wandb_settings(spec: WandbConfig, section: dict | None) -> WandbConfig:
    """The wandb run to log to: the spec's, taking the project, group and team (entity) that the
    DeepSpeed JSON's enabled `wandb` section names where the spec leaves them at their defaults.
    That section never starts a second run of DeepSpeed's own (engine.py removes it): one run
    holds every metric. With `monitor.wandb.enabled: false` the spec wins, with a warning."""
    section = section or {}
    if not section.get("enabled"):
        return spec
    if not spec.enabled:
        print(
            "warning: the DeepSpeed JSON's wandb section is ignored: the run spec turns wandb off "
            "(monitor.wandb.enabled: false)",
            file=sys.stderr,
            flush=True,
        )
        return spec
    project = spec.project
    if project == WandbConfig.project:  # the spec's default: the section's name wins
        project = section.get("project") or project
    group, entity = spec.group or section.get("group"), spec.entity or section.get("team")
    return replace(spec, project=project, group=group, entity=entity)


def wandb_summary(name: str) -> str | None:
    """What a metric's wandb summary (the runs table) shows, where the last value is not it:
    the lowest val loss and perplexity, the highest task accuracy, the tokens trained."""
    parts = name.split("/")
    if name in ("Loss/val", "Loss/perplexity_val") or parts[:2] == ["Loss", "val"]:
        return "min"
    if parts[0] == "Eval" and len(parts) == 3:
        return "min" if parts[2] == "ppl" else "max" if parts[2].startswith("acc") else None
    return "max" if name == "Training/tokens" else None


class WandbSink:
    """A wandb run, or nothing: any wandb failure warns once and logging goes on without it.

    `rewind_to`: the resumed step, when the launch before logged steps past it (it crashed after
    its last checkpoint): the run is rewound there (`resume_from`), so the steps logged again
    replace those. None: the run with this id goes on as it stands (`resume="allow"`)."""

    def __init__(
        self,
        cfg: WandbConfig,
        name: str,
        run_dir: Path,
        run_id: str,
        config: dict,
        rewind_to: int | None,
    ) -> None:
        self.run = None
        self.defined: set[str] = set()
        self.mode = resolve_wandb_mode(cfg.mode)
        if not cfg.enabled or self.mode == "disabled":
            return
        try:
            import wandb

            run_dir.mkdir(parents=True, exist_ok=True)
            settings = wandb.Settings(
                console="off",
                init_timeout=float(os.environ.get("ZEROLAUNCH_WANDB_INIT_TIMEOUT", "60")),
            )
            init = dict(
                project=cfg.project,
                entity=cfg.entity,
                name=cfg.name or name,
                group=cfg.group,
                tags=cfg.tags or None,
                mode=self.mode,
                id=run_id,
                dir=str(run_dir),
                config=config,
                settings=settings,
            )
            self.run = self._init(wandb, init, rewind_to)
            # The tokens axis: in every record, so any panel can plot against it.
            self.run.define_metric("Training/tokens", summary="max")
            self.defined.add("Training/tokens")
        except Exception as e:  # noqa: BLE001 - wandb raises many kinds; none may stop training
            self._fail(e)

    @staticmethod
    def _init(wandb: Any, init: dict, rewind_to: int | None) -> Any:
        """Rewind the run, or (nothing to rewind, or a server that refuses: rewinding is a W&B
        preview feature) go on with the run of that id as it stands, or start it."""
        if rewind_to is not None:
            try:
                return wandb.init(**init, resume_from=f"{init['id']}?_step={rewind_to}")
            except Exception as e:  # noqa: BLE001
                if "timed out" in str(e).lower():
                    raise  # no answer: asking again would only double the wait
                print(
                    f"warning: wandb refused to rewind run {init['id']} to step {rewind_to} "
                    f"({type(e).__name__}: {e}); resuming it as it stands instead: the steps "
                    "after the checkpoint may show the values of the launch that crashed",
                    file=sys.stderr,
                    flush=True,
                )
        return wandb.init(**init, resume="allow")

    def _fail(self, error: Exception) -> None:
        _warn_off("wandb", error)
        self.run = None

    def log(self, record: dict, step: int) -> None:
        if self.run is not None:
            try:
                for name in record.keys() - self.defined:
                    if summary := wandb_summary(name):
                        self.run.define_metric(name, summary=summary)
                    self.defined.add(name)
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
        self.dropped = 0
        """Records past the resumed step that the launch before left: logged again now."""
        self._truncate_after(resume_step)

    def _truncate_after(self, step: int) -> None:
        """Drop records past the resumed step (a crash after the last checkpoint leaves some)."""
        kept = []
        if step > 0 and self.path.exists():
            records = [json.loads(line) for line in self.path.read_text().splitlines() if line]
            kept = [r for r in records if r.get("step", 0) <= step]
            self.dropped = len(records) - len(kept)
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


def monitor_dir(
    spec_flag: bool, section: dict | None, out_dir: Path, default_name: str
) -> Path | None:
    """Where the TensorBoard or CSV files go: with the DeepSpeed JSON's section enabled, its
    output_path (default: the run directory) / job_name, as DeepSpeed lays them out; else
    out_dir/default_name when the spec's flag is on; else None (off)."""
    section = section or {}
    if section.get("enabled"):
        base = Path(section.get("output_path") or out_dir)
        return base / section.get("job_name", DEEPSPEED_JOB_NAME)
    return out_dir / default_name if spec_flag else None


def _scalars(record: dict) -> list[tuple[str, float]]:
    return [
        (name, value)
        for name, value in record.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    ]


class TensorBoardSink:
    """Every metric as a TensorBoard scalar in `log_dir`, flushed at each log step.

    The writer's purge step is the first step after the resumed one: TensorBoard then hides what
    an earlier launch logged from that step on (a crash after the last checkpoint leaves some)."""

    def __init__(self, log_dir: Path, resume_step: int) -> None:
        self.log_dir, self.writer = log_dir, None
        try:
            from torch.utils.tensorboard import SummaryWriter

            log_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(log_dir), purge_step=resume_step + 1)
        except Exception as e:  # noqa: BLE001 - a missing package or a full disk: warn, go on
            self._fail(e)

    def _fail(self, error: Exception) -> None:
        _warn_off(f"TensorBoard ({self.log_dir})", error)
        self.writer = None

    def log(self, record: dict, step: int) -> None:
        if self.writer is not None:
            try:
                for name, value in _scalars(record):
                    self.writer.add_scalar(name, value, step)
                self.writer.flush()
            except Exception as e:  # noqa: BLE001
                self._fail(e)

    def finish(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception as e:  # noqa: BLE001
                self._fail(e)


def csv_file_name(metric: str) -> str:
    """DeepSpeed csv_monitor's file name for a metric: `Loss/val` -> `Loss_val.csv`."""
    return metric.replace("/", "_").replace(" ", "_") + ".csv"


class CsvSink:
    """One CSV file per metric in `directory` (DeepSpeed's csv_monitor layout), each with the
    header `step,<metric name>` and one row per logged step, flushed at each log step.

    Rows past the resumed step are dropped first (all rows on a fresh start), like
    metrics.jsonl's records: the steps after the checkpoint are logged again."""

    def __init__(self, directory: Path, resume_step: int) -> None:
        self.directory = directory
        self.files: dict[str, IO[str]] | None = {}
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._truncate_after(resume_step)
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def _truncate_after(self, step: int) -> None:
        for path in sorted(self.directory.glob("*.csv")):
            with path.open(newline="") as f:
                rows = list(csv.reader(f))
            if not rows or rows[0][:1] != ["step"]:
                continue  # not one of ours
            kept = [rows[0], *(r for r in rows[1:] if r and int(r[0]) <= step)]
            if len(kept) < len(rows):
                with path.open("w", newline="") as f:
                    csv.writer(f).writerows(kept)

    def _fail(self, error: Exception) -> None:
        _warn_off(f"CSV ({self.directory})", error)
        self.finish()
        self.files = None

    def _file(self, name: str) -> IO[str]:
        if name not in self.files:
            path = self.directory / csv_file_name(name)
            new = not path.exists() or path.stat().st_size == 0
            self.files[name] = path.open("a", newline="")
            if new:
                csv.writer(self.files[name]).writerow(["step", name])
        return self.files[name]

    def log(self, record: dict, step: int) -> None:
        if self.files is not None:
            try:
                for name, value in _scalars(record):
                    csv.writer(self._file(name)).writerow([step, value])
                for f in self.files.values():
                    f.flush()
            except Exception as e:  # noqa: BLE001
                self._fail(e)

    def finish(self) -> None:
        for f in (self.files or {}).values():
            f.close()
        self.files = {} if self.files is not None else None


def file_sinks(
    monitor: MonitorConfig, ds_config: dict, out_dir: Path, resume_step: int
) -> list[TensorBoardSink | CsvSink]:
    """The TensorBoard and CSV sinks that the spec or the DeepSpeed JSON turn on."""
    sinks: list[TensorBoardSink | CsvSink] = []
    tb_dir = monitor_dir(monitor.tensorboard, ds_config.get("tensorboard"), out_dir, "tensorboard")
    if tb_dir is not None:
        sinks.append(TensorBoardSink(tb_dir, resume_step))
    csv_dir = monitor_dir(monitor.csv, ds_config.get("csv_monitor"), out_dir, "csv")
    if csv_dir is not None:
        sinks.append(CsvSink(csv_dir, resume_step))
    return sinks


class Sinks:
    """Rank 0's outputs together: metrics.jsonl (and the console line), wandb, and the
    TensorBoard and CSV files when on."""

    def __init__(
        self,
        log: MetricsLog,
        wandb: WandbSink,
        files: list[TensorBoardSink | CsvSink] | None = None,
    ) -> None:
        self.log, self.wandb, self.files = log, wandb, files or []

    def write(self, step: int, record: dict) -> None:
        self.log.write({"step": step, **record})
        self.wandb.log(record, step=step)
        for sink in self.files:
            sink.log(record, step)

    def event(self, record: dict, title: str, text: str) -> None:
        """A one-off event (e.g. overfitting): a metrics.jsonl record and a wandb alert."""
        self.log.write(record)
        self.wandb.alert(title, text)

    def finish(self) -> None:
        self.wandb.finish()
        for sink in self.files:
            sink.finish()
