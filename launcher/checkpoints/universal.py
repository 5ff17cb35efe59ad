"""Resuming at another world size, ZeRO stage or tensor-parallel size: DeepSpeed's universal
checkpoint format.

A tag written by N ranks at stage S loads elsewhere only after `ds_to_universal` rewrites its
shards as one file per parameter; the conversion runs once and is cached beside the tag. For a
tensor-parallel tag, the `universal_checkpoint_info` saved with it says how each parameter was
split (`tensor_parallel_info`): replicated, row-parallel (cut along its columns), or fused
sections each cut in turn (q, k and v; SwiGLU's gate and up); the rest is cut along its rows.
The converter joins every rank's pieces into the whole parameter (weights and Adam's moments),
and the loader cuts this run's piece out of it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from launcher.checkpoints.contract import META_FILE, CheckpointMeta
from launcher.checkpoints.store import universal_dir
from launcher.errors import UserError

UNIVERSAL_VERSION = 0.2
"""The `universal_checkpoint_version` saved with every tag (sub-parameters given by their sizes)."""


def tensor_parallel_info(model: Any, config: Any) -> dict:
    """What ds_to_universal must know of a tensor-parallel model's parameters, by name."""
    from model.pipeline import gpt_name
    from model.tensor_parallel import split_layout

    replicated, rows, fused = [], [], []
    for name, _ in model.named_parameters():  # a pipeline's names are its layers'
        layout, pattern = (
            split_layout(gpt_name(name, config) or name, config),
            re.escape(name) + "$",
        )
        if layout is None:
            replicated.append(pattern)
        elif layout[0] == 1:
            rows.append(pattern)
        elif len(layout[1]) > 1:
            sections = tuple(layout[1])
            shape = (sections, -1) if name.endswith("weight") else (sections,)
            fused.append({"patterns": [pattern], "shape": shape, "partition_dim": 0})
    return {
        "universal_checkpoint_version": UNIVERSAL_VERSION,
        "tp_replicated_parameter_patterns": replicated,
        "parameter_with_row_parallelism_patterns": rows,
        "parameter_with_sub_params": fused,
    }


def needs_universal(
    meta: CheckpointMeta, world_size: int, zero_stage: int, tensor: int = 1
) -> bool:
    """Another world size, ZeRO stage or tensor-parallel size than the checkpoint's: load it in
    universal format.

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
    return (meta.world_size, meta.zero_stage, meta.tensor_parallel) != (
        world_size,
        zero_stage,
        tensor,
    )


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
