"""The DeepSpeed JSON: engine settings only. The spec owns batch sizes, optimizer and schedule.

The launcher fills the batch fields from the spec and the data-parallel size; a value already in
the JSON that disagrees stops the run before training, naming both files and both values.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from launcher.config import TrainConfig
from launcher.errors import UserError
from launcher.schedule import global_batch_size

# Sections whose job the run spec does; one in the JSON would silently fight the spec.
SPEC_OWNED_SECTIONS = {
    "optimizer": "train.lr, train.beta1, train.beta2, train.weight_decay",
    "scheduler": "train.lr, train.min_lr, train.warmup_steps, train.lr_decay_steps",
}


class DSConfigError(UserError):
    """The DeepSpeed JSON is missing, malformed or disagrees with the spec."""


def load_ds_config(path: Path) -> dict:
    """Read a DeepSpeed JSON file; errors give file, line and column."""
    path = Path(path)
    if not path.exists():
        raise DSConfigError(
            f"DeepSpeed config {path} does not exist; pass --ds_config with one of "
            f"ds_configs/*.json"
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DSConfigError(
            f"DeepSpeed config {path}, line {e.lineno}, column {e.colno}: {e.msg}"
        ) from e
    if not isinstance(config, dict):
        raise DSConfigError(f"DeepSpeed config {path}: expected a JSON object at the top level")
    return config


def batch_fields(train: TrainConfig, dp_size: int) -> dict[str, Any]:
    """The engine fields the launcher derives from the spec."""
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "train_batch_size": global_batch_size(
            train.micro_batch_size, train.grad_accum_steps, dp_size
        ),
        "gradient_clipping": train.grad_clip,
    }


def _spec_key(field: str) -> str:
    return {
        "train_micro_batch_size_per_gpu": "train.micro_batch_size",
        "gradient_accumulation_steps": "train.grad_accum_steps",
        "train_batch_size": "train.micro_batch_size x train.grad_accum_steps x data-parallel size",
        "gradient_clipping": "train.grad_clip",
    }[field]


def _resolve_precision(config: dict, device_type: str, bf16_supported: bool, ds_path: str) -> None:
    """Resolve `bf16.enabled: "auto"`; refuse fp16 where it cannot run."""
    bf16 = config.get("bf16")
    if isinstance(bf16, dict) and bf16.get("enabled") == "auto":
        bf16["enabled"] = bf16_supported
    fp16 = config.get("fp16")
    if isinstance(fp16, dict) and fp16.get("enabled") is True:
        if device_type != "cuda":
            raise DSConfigError(
                f"{ds_path} enables fp16, which DeepSpeed supports only on GPUs, but this run is "
                f'on {device_type}. Set "fp16": {{"enabled": false}} (fp32), or use '
                '"bf16": {"enabled": "auto"}.'
            )
        if isinstance(bf16, dict) and bf16.get("enabled") is True:
            raise DSConfigError(f"{ds_path} enables both fp16 and bf16; choose one")


def merge_ds_config(
    ds_config: dict,
    train: TrainConfig,
    dp_size: int,
    *,
    spec_path: str,
    ds_path: str,
    device_type: str,
    bf16_supported: bool,
) -> dict:
    """The final engine config: the JSON plus the fields derived from the spec."""
    config = copy.deepcopy(ds_config)
    problems = []
    for section, keys in SPEC_OWNED_SECTIONS.items():
        if section in config:
            problems.append(
                f'{ds_path} has an "{section}" section, but the run spec owns it ({keys}); '
                f'remove "{section}" from {ds_path} and set those keys in {spec_path}'
            )
    for key, value in batch_fields(train, dp_size).items():
        given = config.get(key, "auto")
        if given != "auto" and given != value:
            problems.append(
                f'{ds_path} sets "{key}": {given!r}, but {spec_path} gives {value!r} '
                f'({_spec_key(key)}, {dp_size} data-parallel rank(s)); remove "{key}" from '
                f"{ds_path} (the launcher fills it) or make the two agree"
            )
        config[key] = value
    problems += _zero_problems(config.get("zero_optimization", {}), ds_path)
    if problems:
        raise DSConfigError("\n".join(problems))
    _resolve_precision(config, device_type, bf16_supported, ds_path)
    return config


def _zero_problems(zero: dict, ds_path: str) -> list[str]:
    problems = []
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        problems.append(f'{ds_path}: "zero_optimization.stage" is {stage!r}; use 0, 1, 2 or 3')
    for key in ("offload_optimizer", "offload_param"):
        device = zero.get(key, {}).get("device", "none")
        if device not in ("none", "cpu", "nvme"):
            problems.append(
                f'{ds_path}: "zero_optimization.{key}.device" is {device!r}; '
                'use "cpu", "nvme" or "none"'
            )
    if zero.get("offload_param", {}).get("device", "none") != "none" and stage != 3:
        problems.append(f'{ds_path}: "offload_param" needs ZeRO stage 3 (this file has {stage!r})')
    return problems


def zero_stage(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))
