"""Sharded DeepSpeed checkpoints you can trust: tags `global_step{N}` under `out_dir/checkpoints`.

Saving: every rank writes its DeepSpeed shards and its RNG state; after a barrier, rank 0 writes
`zerolaunch.json` into the tag (the completion marker: step, data position, model shape, ZeRO
stage, world size, losses, and a manifest of every file with its size), then the `latest`
pointer, then `best` (the complete tag of lowest val loss), each atomically (temporary name +
rename); only then are older tags rotated out. A tag without its marker, or whose files do not
match the manifest, is incomplete: `resume: auto` skips it with a warning.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from launcher.errors import UserError
from model.gpt import GPTConfig

META_FILE = "zerolaunch.json"
LATEST = "latest"
BEST = "best"
UNIVERSAL_SUFFIX = "_universal"
_TAG_RE = re.compile(r"^global_step(\d+)$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"global_step{step}"


def all_tags(ckpt_dir: Path) -> list[tuple[int, str]]:
    """(step, tag) of every tag directory, complete or not, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p.name)
        for p in ckpt_dir.iterdir()
        if p.is_dir() and (m := _TAG_RE.match(p.name))
    ]
    return sorted(found)


def list_tags(ckpt_dir: Path) -> list[tuple[int, str]]:
    """(step, tag) of every complete checkpoint, oldest first."""
    return [(s, t) for s, t in all_tags(ckpt_dir) if verify(ckpt_dir / t) is None]


def read_meta(tag_dir: Path) -> dict:
    try:
        return json.loads((tag_dir / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(
            f"{tag_dir} is not a complete zerolaunch checkpoint ({META_FILE} unreadable: {e}); "
            "pass the directory of a tag such as runs/NAME/checkpoints/global_step100"
        ) from e


def verify(tag_dir: Path) -> str | None:
    """None when the tag is complete, else what is wrong with it."""
    marker = tag_dir / META_FILE
    if not marker.exists():
        return f"no completion marker ({META_FILE}): its save never finished"
    try:
        manifest = json.loads(marker.read_text())["manifest"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        return f"{META_FILE} is unreadable ({e})"
    for name, size in manifest.items():
        path = tag_dir / name
        if not path.exists():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, {size} were written (truncated)"
    return None


def read_pointer(ckpt_dir: Path, name: str) -> str | None:
    try:
        return (ckpt_dir / name).read_text().strip() or None
    except OSError:
        return None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- choosing


def resolve_resume(resume: str, run_dir: Path) -> tuple[Path | None, list[str]]:
    """(tag directory to resume from or None, warnings about skipped tags).

    'auto': the newest complete tag in run_dir/checkpoints, skipping damaged ones with a
    warning; 'none': start fresh; otherwise a tag directory (which must be complete) or a
    checkpoints directory (its newest complete tag).
    """
    if resume == "none":
        return None, []
    if resume == "auto":
        return _newest_complete(checkpoint_dir(run_dir))
    path = Path(resume)
    if _TAG_RE.match(path.name) and path.is_dir():
        problem = verify(path)
        if problem:
            raise UserError(
                f"checkpoint.resume={resume}: the checkpoint is damaged: {problem}. "
                "Choose another tag (python -m launcher.ckpt list RUN_DIR)"
            )
        return path, []
    if all_tags(path):
        return _newest_complete(path)
    if path.is_dir() and all_tags(path.parent):
        tags = ", ".join(t for _, t in all_tags(path.parent))
        raise UserError(f"checkpoint.resume={resume}: no such tag; {path.parent} has: {tags}")
    raise UserError(
        f"checkpoint.resume={resume!r}: no checkpoint there. Give a tag directory "
        "(runs/NAME/checkpoints/global_stepN), a checkpoints directory, 'auto' or 'none'"
    )


def _newest_complete(ckpt_dir: Path) -> tuple[Path | None, list[str]]:
    warnings = []
    for _, tag in reversed(all_tags(ckpt_dir)):
        problem = verify(ckpt_dir / tag)
        if problem is None:
            return ckpt_dir / tag, warnings
        warnings.append(f"skipping checkpoint {ckpt_dir / tag}: {problem}")
    return None, warnings


def check_compatible(tag_dir: Path, model: GPTConfig) -> dict:
    """Refuse a checkpoint of another model shape, listing what differs; returns its metadata."""
    meta = read_meta(tag_dir)
    saved = meta["model"]
    not_shape = {"dropout", "activation_checkpointing", "activation_checkpointing_n"}
    diffs = [
        f"model.{k}: checkpoint {saved.get(k)!r}, now {v!r}"
        for k, v in asdict(model).items()
        if k not in not_shape and saved.get(k) != v
    ]
    if diffs:
        raise UserError(
            f"checkpoint {tag_dir} was written for another model shape:\n  "
            + "\n  ".join(diffs)
            + "\nResume with the spec it was trained with, or set checkpoint.resume=none "
            "with another out_dir (or name) to start a new run."
        )
    return meta


def needs_universal(meta: dict, world_size: int, zero_stage: int) -> bool:
    """Another world size or ZeRO stage than the checkpoint's: load it in universal format.

    Stages 0-2 convert among themselves and 3 to 3 at any world size; DeepSpeed's universal
    loader cannot cross the ZeRO-3 boundary (parameters sharded or not), so that is refused.
    """
    if (meta["zero_stage"] == 3) != (zero_stage == 3):
        raise UserError(
            f"the checkpoint was written at ZeRO stage {meta['zero_stage']} and this run uses "
            f"stage {zero_stage}: DeepSpeed's universal checkpoints cannot move weights across "
            "the ZeRO-3 boundary. Resume with a stage-3 config for a stage-3 checkpoint, or a "
            "stage 0-2 config for the others (any number of ranks works)."
        )
    return (meta["world_size"], meta["zero_stage"]) != (world_size, zero_stage)


# ----------------------------------------------------------------------------- saving


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rng_file(rank: int) -> str:
    return f"rng_state_rank{rank}.pt"


def save(engine: Any, run_dir: Path, meta: dict, client_state: dict, keep_last: int) -> Path:
    """All ranks: write shards and RNG; then rank 0 completes the tag, pointers and rotation."""
    dist = torch.distributed
    ckpt_dir, tag = checkpoint_dir(run_dir), tag_for(meta["step"])
    tag_dir = ckpt_dir / tag
    if dist.get_rank() == 0:  # a stale, incomplete tag of the same name (an earlier crash)
        shutil.rmtree(tag_dir, ignore_errors=True)
        shutil.rmtree(ckpt_dir / f"{tag}{UNIVERSAL_SUFFIX}", ignore_errors=True)
    dist.barrier()
    client_state = dict(
        client_state, universal_checkpoint_info={"universal_checkpoint_version": 0.2}
    )
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), tag_dir / _rng_file(dist.get_rank()))
    _test_pause(meta["step"])
    dist.barrier()  # every rank's files are on disk before the tag can count as complete
    if dist.get_rank() == 0:
        _complete(ckpt_dir, tag, meta, keep_last)
    dist.barrier()
    return tag_dir


def _test_pause(step: int) -> None:
    """Fault injection for the crash-during-save test: ZEROLAUNCH_TEST_SAVE_PAUSE=STEP:SECONDS
    holds the save of that step open after the shards are written, before the tag completes."""
    setting = os.environ.get("ZEROLAUNCH_TEST_SAVE_PAUSE")
    if setting and int(setting.split(":")[0]) == step:
        print(f"[save of step {step} paused for testing]", file=sys.stderr, flush=True)
        time.sleep(float(setting.split(":")[1]))


def _complete(ckpt_dir: Path, tag: str, meta: dict, keep_last: int) -> None:
    tag_dir = ckpt_dir / tag
    files = sorted(p for p in tag_dir.rglob("*") if p.is_file())
    manifest = {str(p.relative_to(tag_dir)): p.stat().st_size for p in files}
    meta = dict(meta, manifest=manifest, bytes=sum(manifest.values()), saved_at=time.time())
    _write_atomic(tag_dir / META_FILE, json.dumps(meta, indent=1))
    _write_atomic(ckpt_dir / LATEST, tag)
    _update_best(ckpt_dir, tag, meta)
    rotate(ckpt_dir, keep_last)


def _update_best(ckpt_dir: Path, tag: str, meta: dict) -> None:
    """`best` follows the lowest val loss measured at a checkpoint's own step."""
    if meta.get("val_loss") is None or meta.get("val_step") != meta["step"]:
        return
    best = read_pointer(ckpt_dir, BEST)
    best_meta = ckpt_dir / best / META_FILE if best else None
    best_val = (
        json.loads(best_meta.read_text())["val_loss"] if best_meta and best_meta.exists() else None
    )
    if best_val is not None and best_val <= meta["val_loss"]:
        return
    _write_atomic(ckpt_dir / BEST, tag)


def rotate(ckpt_dir: Path, keep_last: int) -> None:
    """Keep the newest keep_last complete tags and `best`; drop older complete tags, and
    incomplete tags older than the newest complete one (leftovers of crashed saves)."""
    complete = list_tags(ckpt_dir)
    if not complete:
        return
    keep = {t for _, t in complete[-keep_last:]} if keep_last > 0 else {t for _, t in complete}
    keep |= {read_pointer(ckpt_dir, BEST), read_pointer(ckpt_dir, LATEST)}
    newest = complete[-1][0]
    for step, tag in all_tags(ckpt_dir):
        if tag not in keep and step < newest:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
            shutil.rmtree(ckpt_dir / f"{tag}{UNIVERSAL_SUFFIX}", ignore_errors=True)


# ----------------------------------------------------------------------------- loading


def universal_dir(tag_dir: Path) -> Path:
    return tag_dir.with_name(tag_dir.name + UNIVERSAL_SUFFIX)


def convert_to_universal(tag_dir: Path) -> Path:
    """DeepSpeed's universal format of a tag, converted once and cached beside it."""
    import subprocess

    target = universal_dir(tag_dir)
    if (target / META_FILE).exists():
        return target
    scratch = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(tag_dir),
        "--output_folder",
        str(scratch),
    ]
    print(f"converting {tag_dir} to DeepSpeed's universal format -> {target}", flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        raise UserError(
            f"converting {tag_dir} to a universal checkpoint failed:\n"
            f"{result.stderr.strip()[-3000:]}"
        )
    shutil.copyfile(tag_dir / META_FILE, scratch / META_FILE)  # marks the conversion complete
    shutil.rmtree(target, ignore_errors=True)
    os.replace(scratch, target)
    return target


def load(engine: Any, tag_dir: Path, universal: bool) -> dict:
    """Restore model and optimizer (and this rank's RNG when the world size is unchanged);
    returns the client state saved with them."""
    source = universal_dir(tag_dir) if universal else tag_dir
    path, client_state = engine.load_checkpoint(str(source.parent), tag=source.name)
    if path is None:
        raise UserError(f"DeepSpeed could not load checkpoint {source}; its shards are missing")
    rng_file = tag_dir / _rng_file(torch.distributed.get_rank())
    if not universal and rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state


def load_weights(tag_dir: Path, lazy: bool = False) -> dict[str, Any]:
    """Consolidated fp32 weights from a tag of any ZeRO stage, without a process group.

    With lazy, values may be deferred (call `.contiguous()`): memory stays near one tensor.
    """
    meta = read_meta(tag_dir)
    if meta["zero_stage"] == 0:
        states = torch.load(
            tag_dir / "mp_rank_00_model_states.pt",
            map_location="cpu",
            weights_only=False,
            mmap=True,
        )
        return {k: v if lazy else v.float() for k, v in states["module"].items()}
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs to stdout; keep it for output
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(
            str(tag_dir.parent), tag=tag_dir.name, lazy_mode=lazy
        )
