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
from launcher.checkpoints.store import model_config, read_meta, universal_dir
from launcher.errors import UserError

UNIVERSAL_VERSION = 0.2
"""The `universal_checkpoint_version` saved with every tag (sub-parameters given by their sizes)."""


def tensor_parallel_info(config: Any, pipelined: bool) -> dict:
    """What ds_to_universal must know of the model's parameters: how each splits over the
    tensor-parallel ranks, by its GPT name or, `pipelined`, its pipeline name (every stage's:
    the converter reads the first stage's file alone, and refuses patterns no parameter
    matches), and which copy of the tied embedding the last pipeline stage holds (left out: the
    first stage's is the one)."""
    import torch

    from model.gpt import GPT
    from model.pipeline import TIED, pipeline_name
    from model.tensor_parallel import split_layout

    with torch.device("meta"):
        names = [name for name, _ in GPT(config).named_parameters()]
    replicated, rows, fused = [], [], []
    for name in names:
        layout = split_layout(name, config)
        saved = pipeline_name(name, config) if pipelined else name
        if saved is None:  # the tied head: saved as the embedding
            continue
        patterns = [re.escape(saved) + "$"]
        if layout is None:
            replicated += patterns
        elif layout[0] == 1:
            rows += patterns
        elif len(layout[1]) > 1:
            sections = tuple(layout[1])
            shape = (sections, -1) if name.endswith("weight") else (sections,)
            fused.append({"patterns": patterns, "shape": shape, "partition_dim": 0})
    return {
        "universal_checkpoint_version": UNIVERSAL_VERSION,
        "pipeline_replicated_parameter_patterns": [re.escape(f"tied_modules.{TIED}.") + ".*"],
        "tp_replicated_parameter_patterns": replicated,
        "parameter_with_row_parallelism_patterns": rows,
        "parameter_with_sub_params": fused,
    }


def needs_universal(
    meta: CheckpointMeta, world_size: int, zero_stage: int, tensor: int = 1, pipeline: int = 1
) -> bool:
    """Another world size, ZeRO stage, tensor-parallel or pipeline size than the checkpoint's:
    load it in universal format.

    Stages 1-2 convert among themselves and 3 to 3 at any world size; DeepSpeed's universal
    loader cannot cross the ZeRO-3 boundary (parameters sharded or not), so that is refused. A
    stage-0 checkpoint holds whole optimizer states per model-parallel rank: it loads as it is
    at stage 0 with any number of data-parallel ranks, and converts to nothing else (the
    converter reads ZeRO shards only), so that is refused too.
    """
    same_split = (meta.tensor_parallel, meta.pipeline_parallel) == (tensor, pipeline)
    if meta.zero_stage == 0 and zero_stage == 0 and same_split:
        return False
    if meta.zero_stage == 0:
        raise UserError(
            f"the checkpoint was written at ZeRO stage 0 with parallel.tensor="
            f"{meta.tensor_parallel}, parallel.pipeline={meta.pipeline_parallel}, and this run "
            f"uses stage {zero_stage} with {tensor} and {pipeline}: a stage-0 checkpoint keeps "
            "its optimizer states whole, which DeepSpeed's universal converter cannot read. "
            "Resume it at stage 0 with its tensor and pipeline sizes (any number of data-parallel "
            "ranks), save, and move that; or start a new run from its weights with "
            "checkpoint.init_from"
        )
    if (meta.zero_stage == 3) != (zero_stage == 3):
        raise UserError(
            f"the checkpoint was written at ZeRO stage {meta.zero_stage} and this run uses "
            f"stage {zero_stage}: DeepSpeed's universal checkpoints cannot move weights across "
            "the ZeRO-3 boundary. Resume with a stage-3 config for a stage-3 checkpoint, or a "
            "stage 0-2 config for the others (any number of ranks works)."
        )
    written = (meta.world_size, meta.zero_stage, meta.tensor_parallel, meta.pipeline_parallel)
    return written != (world_size, zero_stage, tensor, pipeline)


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
    _alias_names(scratch / "zero", read_meta(tag_dir))
    shutil.copyfile(tag_dir / META_FILE, scratch / META_FILE)  # marks the conversion complete
    shutil.rmtree(target, ignore_errors=True)
    os.replace(scratch, target)
    return target


def _alias_names(zero_dir: Path, meta: CheckpointMeta) -> None:
    """Each parameter's folder under both names it can be loaded by: the GPT's and the
    pipeline's (`2.block.attn.c_attn.weight` is `transformer.h.0.attn.c_attn.weight`), so a
    pipelined tag resumes without a pipeline and the other way round (DeepSpeed's universal
    loader looks a parameter up by the loading model's name)."""
    from model.pipeline import gpt_name, pipeline_name

    config = model_config(meta)
    for folder in sorted(p for p in zero_dir.iterdir() if p.is_dir()):
        other = gpt_name(folder.name, config)
        if other == folder.name:
            other = pipeline_name(folder.name, config)
        if other is not None and not (zero_dir / other).exists():
            (zero_dir / other).symlink_to(folder.name)
