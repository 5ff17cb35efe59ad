"""Plot a run from its metrics.jsonl (works with wandb off): writes runs/NAME/report.png.

    python -m launcher.report runs/NAME

Panels: train and val loss against tokens seen (best val and overfitting onset marked, each
eval.sets curve beside val), tokens/s, MFU, and the learning rate, each against the step; and
when the run scored downstream tasks, every task's accuracy against the step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from launcher.errors import UserError, run_cli


def load_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(log records, event records) of a run."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise UserError(f"{path} does not exist; is {run_dir} a zerolaunch run directory?")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    events = [r for r in rows if "event" in r]
    records = [r for r in rows if "event" not in r]
    if not any("Loss/train" in r for r in records):
        raise UserError(f"{path} has no logged training steps yet")
    return records, events


def _series(records: list[dict], key: str, x: str = "step") -> tuple[list, list]:
    pairs = [(r[x], r[key]) for r in records if key in r and x in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot(run_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records, events = load_metrics(run_dir)
    spec_file = run_dir / "spec.yaml"
    spec = yaml.safe_load(spec_file.read_text()) if spec_file.exists() else {}
    block = (spec.get("model") or {}).get("block_size") or 1
    for r in records:
        if "Training/tokens" in r:
            r["tokens"] = r["Training/tokens"]
        elif "consumed_samples" in r:  # a run from before Training/tokens
            r["tokens"] = r["consumed_samples"] * block
    tokens_at = {r["step"]: r["tokens"] for r in records if "tokens" in r}
    accuracies = task_accuracies(records)
    rows = 3 if accuracies else 2
    fig = plt.figure(figsize=(13, 4.25 * rows))
    grid = fig.add_gridspec(rows, 2)
    axes = [[fig.add_subplot(grid[row, col]) for col in range(2)] for row in range(2)]
    _loss_panel(axes[0][0], records, events, tokens_at)
    _panel(axes[0][1], *_series(records, "Timing/tokens_per_sec"), "tokens/s (all ranks)", "C2")
    _panel(axes[1][0], *_series(records, "Loss/mfu"), "MFU (%)", "C3")
    _panel(axes[1][1], *_series(records, "Training/lr"), "learning rate", "C4")
    if accuracies:
        _tasks_panel(fig.add_subplot(grid[2, :]), records, accuracies)
    fig.suptitle(f"{spec.get('name', run_dir.name)} ({run_dir})")
    fig.tight_layout()
    out = run_dir / "report.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def task_accuracies(records: list[dict]) -> dict[str, list[str]]:
    """{task: its logged accuracy metrics}: `Eval/<task>/acc` and `Eval/<task>/acc_norm`."""
    tasks: dict[str, list[str]] = {}
    for name in sorted({key for r in records for key in r}):
        parts = name.split("/")
        if len(parts) == 3 and parts[0] == "Eval" and parts[2] in ("acc", "acc_norm"):
            tasks.setdefault(parts[1], []).append(name)
    return tasks


def _tasks_panel(ax, records: list[dict], accuracies: dict[str, list[str]]) -> None:
    for i, (task, names) in enumerate(accuracies.items()):
        for name in names:
            style = "o--" if name.endswith("acc_norm") else "o-"
            label = f"{task} {name.rsplit('/', 1)[1]}"
            ax.plot(*_series(records, name), style, color=f"C{i % 10}", markersize=3, label=label)
    ax.set_title("downstream tasks: accuracy (acc solid, acc_norm dashed)")
    ax.set_xlabel("step")
    ax.legend(ncol=min(4, sum(len(n) for n in accuracies.values())), fontsize="small")
    ax.grid(alpha=0.3)


def _panel(ax, xs: list, ys: list, title: str, color: str) -> None:
    ax.plot(xs, ys, color=color)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)


def _loss_panel(ax, records: list[dict], events: list[dict], tokens_at: dict) -> None:
    ax.plot(*_series(records, "Loss/train", "tokens"), label="train", color="C0")
    val_x, val_y = _series(records, "Loss/val", "tokens")
    ax.plot(val_x, val_y, "o-", label="val", color="C1", markersize=3)
    if val_y:
        best = min(range(len(val_y)), key=val_y.__getitem__)
        ax.plot(
            val_x[best],
            val_y[best],
            "*",
            color="gold",
            markersize=16,
            markeredgecolor="k",
            label=f"best val {val_y[best]:.4f}",
        )
    val_sets = sorted({k for r in records for k in r if k.startswith("Loss/val/")})
    for i, name in enumerate(val_sets):
        label = f"val {name.removeprefix('Loss/val/')}"
        xs, ys = _series(records, name, "tokens")
        ax.plot(xs, ys, ".:", label=label, color=f"C{(i + 5) % 10}", markersize=3)
    for event in events:
        if event["event"] == "overfitting" and event["step"] in tokens_at:
            ax.axvline(
                tokens_at[event["step"]],
                color="red",
                linestyle="--",
                label=f"overfitting (step {event['step']})",
            )
    ax.set_title("loss")
    ax.set_xlabel("tokens seen")
    ax.legend()
    ax.grid(alpha=0.3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="zerolaunch report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", type=Path, help="run directory, e.g. runs/NAME")
    args = p.parse_args(argv)
    print(plot(args.run))
    return 0


if __name__ == "__main__":
    run_cli(main)
