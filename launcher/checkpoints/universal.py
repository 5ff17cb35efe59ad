"""Resuming at another world size or ZeRO stage: DeepSpeed's universal checkpoint format.

A tag written by N ranks at stage S loads elsewhere only after `ds_to_universal` rewrites its
shards as one file per parameter; the conversion runs once and is cached beside the tag.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from launcher.checkpoints.contract import META_FILE, CheckpointMeta
from launcher.checkpoints.store import universal_dir
from launcher.errors import UserError


def needs_universal(meta: CheckpointMeta, world_size: int, zero_stage: int) -> bool:
    """Another world size or ZeRO stage than the checkpoint's: load it in universal format.

    Stages 0-2 convert among themselves and 3 to 3 at any world size; DeepSpeed's universal
    loader cannot cross the ZeRO-3 boundary (parameters sharded or not), so that is refused.
    """
    if (meta.zero_stage == 3) != (zero_stage == 3):
        raise UserError(
            f"the checkpoint was written at ZeRO stage {meta.zero_stage} and this run uses "
            f"stage {zero_stage}: DeepSpeed's universal checkpoints cannot move weights across "
            "the ZeRO-3 boundary. Resume with a stage-3 config for a stage-3 checkpoint, or a "
            "stage 0-2 config for the others (any number of ranks works)."
        )
    return (meta.world_size, meta.zero_stage) != (world_size, zero_stage)


def convert_to_universal(tag_dir: Path) -> Path:
    """DeepSpeed's universal format of a tag, converted once and cached beside it."""
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
