"""Sharded DeepSpeed checkpoints: tags `global_step{N}` under `out_dir/checkpoints`.

Beside DeepSpeed's files each tag holds `zerolaunch.json` (step, data position, model shape,
ZeRO stage, world size), written by rank 0 after every rank has saved, so a run can be checked
for compatibility before any process group starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from launcher.errors import UserError
from model.gpt import GPTConfig

META_FILE = "zerolaunch.json"
_TAG_RE = re.compile(r"^global_step(\d+)$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"global_step{step}"


def list_tags(ckpt_dir: Path) -> list[tuple[int, str]]:
    """(step, tag) of every checkpoint with its metadata written, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for child in ckpt_dir.iterdir():
        match = _TAG_RE.match(child.name)
        if match and (child / META_FILE).exists():
            found.append((int(match.group(1)), child.name))
    return sorted(found)


def read_meta(tag_dir: Path) -> dict:
    try:
        return json.loads((tag_dir / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(
            f"{tag_dir} is not a zerolaunch checkpoint ({META_FILE} unreadable: {e}); "
            "pass the directory of a tag such as runs/NAME/checkpoints/global_step100"
        ) from e


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """The tag directory to resume from, or None to start fresh.

    'auto': the newest tag in run_dir/checkpoints (None if there is none); 'none': None;
    otherwise a path to a tag directory, or to a checkpoints directory (its newest tag).
    """
    if resume == "none":
        return None
    if resume == "auto":
        tags = list_tags(checkpoint_dir(run_dir))
        return checkpoint_dir(run_dir) / tags[-1][1] if tags else None
    path = Path(resume)
    if (path / META_FILE).exists():
        return path
    tags = list_tags(path)
    if tags:
        return path / tags[-1][1]
    raise UserError(
        f"checkpoint.resume={resume!r}: no checkpoint there. Give a tag directory "
        "(runs/NAME/checkpoints/global_stepN), a checkpoints directory, 'auto' or 'none'"
    )


def check_compatible(tag_dir: Path, model: GPTConfig, world_size: int, zero_stage: int) -> dict:
    """Refuse a checkpoint the current run cannot load; returns its metadata."""
    meta = read_meta(tag_dir)
    saved = meta["model"]
    diffs = [
        f"model.{k}: checkpoint {saved.get(k)!r}, now {v!r}"
        for k, v in asdict(model).items()
        if k != "dropout" and saved.get(k) != v
    ]
    if diffs:
        raise UserError(
            f"checkpoint {tag_dir} was written for another model shape:\n  "
            + "\n  ".join(diffs)
            + "\nResume with the spec it was trained with, or set checkpoint.resume=none "
            "(or another out_dir) to start a new run."
        )
    if (meta["world_size"], meta["zero_stage"]) != (world_size, zero_stage):
        raise UserError(
            f"checkpoint {tag_dir} was written by {meta['world_size']} rank(s) at ZeRO stage "
            f"{meta['zero_stage']}; this run has {world_size} rank(s) at stage {zero_stage}. "
            "Resume with the same number of ranks and DeepSpeed config."
        )
    return meta


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def save(engine: Any, run_dir: Path, meta: dict, client_state: dict, keep_last: int) -> Path:
    """Every rank writes its shards; then rank 0 writes the metadata and rotates old tags."""
    ckpt_dir = checkpoint_dir(run_dir)
    tag = tag_for(meta["step"])
    client_state = dict(
        client_state, universal_checkpoint_info={"universal_checkpoint_version": 0.2}
    )
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    torch.distributed.barrier()  # every rank's shards are on disk before the tag counts
    if torch.distributed.get_rank() == 0:
        _write_json_atomic(ckpt_dir / tag / META_FILE, meta)
        if keep_last > 0:
            for _, old in list_tags(ckpt_dir)[:-keep_last]:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    torch.distributed.barrier()
    return ckpt_dir / tag


def load(engine: Any, tag_dir: Path) -> dict:
    """Restore model and optimizer shards; returns the client state saved with them."""
    path, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if path is None:
        raise UserError(f"DeepSpeed could not load checkpoint {tag_dir}; its shards are missing")
    return client_state


def load_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Consolidated fp32 model weights from a tag of any ZeRO stage, without a process group."""
    meta = read_meta(tag_dir)
    if meta["zero_stage"] == 0:
        states = torch.load(
            tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
        )
        return {k: v.float() for k, v in states["module"].items()}
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs to stdout; keep it for output
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
