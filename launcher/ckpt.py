"""Inspect a run's checkpoints.

zerolaunch ckpt list runs/NAME [--json]        tags, losses, sizes, completeness (sizes only)
zerolaunch ckpt verify runs/NAME [--tag TAG]   every file against its recorded content hash
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from launcher.checkpoints import store
from launcher.errors import UserError, run_cli


def _fmt_loss(value: float | None) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def rows(run_dir: Path) -> list[dict]:
    """One row per tag directory, oldest first."""
    ckpt_dir = store.checkpoint_dir(run_dir)
    latest = store.read_pointer(ckpt_dir, store.LATEST)
    best = store.read_pointer(ckpt_dir, store.BEST)
    out = []
    for step, tag in store.all_tags(ckpt_dir):
        tag_dir = ckpt_dir / tag
        problem = store.verify(tag_dir)
        meta = None if problem else store.read_meta(tag_dir)
        size = sum(p.stat().st_size for p in tag_dir.rglob("*") if p.is_file())
        marks = [m for m, t in (("latest", latest), ("best", best)) if t == tag]
        out.append(
            {
                "tag": tag,
                "step": step,
                "train_loss": meta.train_loss if meta else None,
                "val_loss": meta.own_val_loss if meta else None,
                "bytes": size,
                "complete": problem is None,
                "problem": problem,
                "marks": marks,
                "world_size": meta.world_size if meta else None,
                "zero_stage": meta.zero_stage if meta else None,
                "precision": meta.precision if meta else None,
            }
        )
    return out


def format_table(table: list[dict]) -> str:
    header = (
        f"{'tag':<22} {'step':>8} {'train':>8} {'val':>8} {'size':>10}  {'ranks/ZeRO':<10} status"
    )
    lines = [header]
    for r in table:
        status = "complete" if r["complete"] else f"INCOMPLETE: {r['problem']}"
        if r["marks"]:
            status += f" ({', '.join(r['marks'])})"
        layout = f"{r['world_size']}/{r['zero_stage']}" if r["complete"] else "-"
        lines.append(
            f"{r['tag']:<22} {r['step']:>8} {_fmt_loss(r['train_loss']):>8} "
            f"{_fmt_loss(r['val_loss']):>8} {_size(r['bytes']):>10}  {layout:<10} {status}"
        )
    return "\n".join(lines)


def verify(run_dir: Path, tag: str | None) -> int:
    """Check tags' files against their recorded sizes and content hashes; exit 2 naming the
    damaged ones."""
    ckpt_dir = store.checkpoint_dir(run_dir)
    tags = [tag] if tag else [t for _, t in store.all_tags(ckpt_dir)]
    if tag and not (ckpt_dir / tag).is_dir():
        known = ", ".join(t for _, t in store.all_tags(ckpt_dir)) or "none"
        raise UserError(f"no tag {tag!r} in {ckpt_dir}; it has: {known}")
    if not tags:
        raise UserError(f"{run_dir} has no checkpoints ({ckpt_dir})")
    damaged = []
    for name in tags:
        started = time.perf_counter()
        if not (ckpt_dir / name / store.META_FILE).exists():  # being written, or never finished
            print(f"{name:<22} INCOMPLETE: no completion marker (a save in progress, or one that "
                  "never finished: resume skips it)")  # fmt: skip
            continue
        problem = store.verify_contents(ckpt_dir / name)
        if problem is None:
            meta = store.read_meta(ckpt_dir / name)
            how = "content hashes" if meta.hashes else "sizes only: saved before hashes were"
            print(
                f"{name:<22} ok ({len(meta.manifest)} files, {_size(meta.bytes)}, {how}; "
                f"{time.perf_counter() - started:.1f} s)"
            )
        else:
            damaged.append(name)
            print(f"{name:<22} DAMAGED: {problem}")
    if damaged:
        raise UserError(
            f"{len(damaged)} damaged checkpoint(s) in {ckpt_dir}: {', '.join(damaged)}; "
            "resume: auto skips them (a tag given by path is refused)"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="zerolaunch ckpt",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="tags with step, losses, size, completeness, pointers")
    listing.add_argument("run", type=Path, help="run directory, e.g. runs/NAME")
    listing.add_argument("--json", action="store_true", help="one JSON object per tag")
    checking = sub.add_parser("verify", help="every file of every tag against its content hash")
    checking.add_argument("run", type=Path, help="run directory, e.g. runs/NAME")
    checking.add_argument("--tag", help="only this tag, e.g. global_step1000")
    args = p.parse_args(argv)
    if not (args.run / "spec.yaml").exists() and not store.checkpoint_dir(args.run).is_dir():
        raise UserError(f"{args.run} is not a zerolaunch run directory")
    if args.command == "verify":
        return verify(args.run, args.tag)
    table = rows(args.run)
    if not table:
        raise UserError(f"{args.run} has no checkpoints ({store.checkpoint_dir(args.run)})")
    if args.json:
        print("\n".join(json.dumps(r) for r in table))
    else:
        print(format_table(table))
    return 0


if __name__ == "__main__":
    run_cli(main)
