"""The DeepSpeed JSON: engine settings only. The spec owns batch sizes, optimizer and schedule.

`resolve_engine` reads the file once: it fills the batch fields from the spec and the
data-parallel size (a value in the JSON that disagrees stops the run, naming both files and both
values), checks every section DeepSpeed validates with DeepSpeed's own config models (a
misspelled key is an error naming the key, the section and the file), resolves `"auto"`
precision for the device, and returns one typed `EngineSettings`. Nothing else in the launcher
reads the raw dictionary; `EngineSettings.ds_config` is what `deepspeed.initialize` receives,
less the `tensorboard` and `csv_monitor` sections (training/engine.py: zerolaunch logs them).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from launcher.config.ds_schema import schema_problems, top_level_notes, zero_model
from launcher.config.paths import file_problem
from launcher.config.spec import TrainConfig
from launcher.errors import UserError

# Sections whose job the run spec does; one in the JSON would silently fight the spec.
SPEC_OWNED_SECTIONS = {
    "optimizer": "train.lr, train.beta1, train.beta2, train.weight_decay",
    "scheduler": "train.lr, train.min_lr, train.warmup_steps, train.lr_decay_steps",
}
PRECISIONS = ("fp32", "bf16", "fp16")


class DSConfigError(UserError):
    """The DeepSpeed JSON is missing, malformed, misspelled or disagrees with the spec."""


@dataclass(frozen=True)
class ActivationCheckpointing:
    """DeepSpeed's `activation_checkpointing` section: how checkpointed blocks store inputs."""

    partition_activations: bool = False
    """Shard each checkpointed input across model-parallel ranks."""
    contiguous_memory_optimization: bool = False
    """Copy checkpointed inputs into one preallocated buffer (less fragmentation)."""
    number_checkpoints: int | None = None
    """Checkpoints per forward, for the contiguous buffer."""
    cpu_checkpointing: bool = False
    """Keep checkpointed inputs in CPU memory (needs partition_activations)."""
    synchronize_checkpoint_boundary: bool = False
    """Synchronise the device at each checkpoint boundary (debugging)."""
    profile: bool = False
    """Time the checkpointing functions."""


@dataclass(frozen=True)
class EngineSettings:
    """What the run needs to know of the DeepSpeed JSON, resolved once for this job."""

    zero_stage: int
    """0-3: what ZeRO shards (nothing, optimizer, + gradients, + parameters)."""
    precision: str
    """fp32, bf16 or fp16 (bf16's "auto" already resolved for the device)."""
    offload_optimizer: str
    """none, cpu or nvme: where the optimizer states and their step live."""
    offload_param: str
    """none, cpu or nvme: where the parameters live between uses (ZeRO-3 only)."""
    activation_checkpointing: ActivationCheckpointing | None
    """DeepSpeed's checkpointing settings when the JSON has the section, else None (torch's)."""
    dp_size: int
    """Data-parallel ranks."""
    micro_batch_size: int
    """Sequences per rank per forward/backward."""
    grad_accum_steps: int
    """Micro-batches per optimizer step."""
    reduce_bucket_size: int
    """Elements per gradient reduce bucket (ZeRO 1-3)."""
    prefetch_bucket_size: int
    """Elements of parameters prefetched ahead of use (ZeRO-3)."""
    sub_group_size: int
    """Elements of the optimizer's sub-groups, stepped one at a time (ZeRO-3)."""
    ds_config: dict = field(repr=False, compare=False)
    """The complete JSON for deepspeed.initialize (and run_dir/ds_config.json)."""

    @property
    def half(self) -> bool:
        """Training in 16 bits (bf16 or fp16): tensor-core peaks, 2-byte params and grads."""
        return self.precision != "fp32"

    @property
    def train_batch_size(self) -> int:
        """Sequences per optimizer step across all data-parallel ranks."""
        return global_batch_size(self.micro_batch_size, self.grad_accum_steps, self.dp_size)

    def at_stage(self, stage: int) -> EngineSettings:
        """The same job at another ZeRO stage (offload, which is stage-specific, dropped)."""
        if stage == self.zero_stage:
            return self
        return replace(self, zero_stage=stage, offload_optimizer="none", offload_param="none")

    def loading_universal(self) -> EngineSettings:
        """These settings with DeepSpeed told to load a universal checkpoint."""
        config = copy.deepcopy(self.ds_config)
        config.setdefault("checkpoint", {})["load_universal"] = True
        return replace(self, ds_config=config)


def load_ds_config(path: Path) -> dict:
    """Read a DeepSpeed JSON file; errors give file, line and column."""
    path = Path(path)
    problem = file_problem(path)
    if problem:
        raise DSConfigError(
            f"DeepSpeed config {path} {problem}; pass --ds_config with a JSON file such as "
            "ds_configs/zero2.json"
        )
    try:
        config = json.loads(path.read_text())
    except UnicodeDecodeError as e:
        raise DSConfigError(f"DeepSpeed config {path} is not text ({e}); pass a JSON file") from e
    except json.JSONDecodeError as e:
        raise DSConfigError(
            f"DeepSpeed config {path}, line {e.lineno}, column {e.colno}: {e.msg}"
        ) from e
    if not isinstance(config, dict):
        raise DSConfigError(f"DeepSpeed config {path}: expected a JSON object at the top level")
    return config


def global_batch_size(micro_batch_size: int, grad_accum_steps: int, dp_size: int) -> int:
    """Sequences per optimizer step across all data-parallel ranks."""
    return micro_batch_size * grad_accum_steps * dp_size


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


_SPEC_KEYS = {
    "train_micro_batch_size_per_gpu": ("micro_batch_size",),
    "gradient_accumulation_steps": ("grad_accum_steps",),
    "train_batch_size": ("micro_batch_size", "grad_accum_steps"),
    "gradient_clipping": ("grad_clip",),
}


def _spec_side(field: str, train: TrainConfig, dp_size: int, spec_path: str, overridden) -> str:
    """Where the spec's value of a DeepSpeed field comes from: each key with its source (the
    spec file or --set) and, for the global batch, the data-parallel size."""
    parts = []
    for name in _SPEC_KEYS[field]:
        key, value = f"train.{name}", getattr(train, name)
        parts.append(
            f"--set {key}={value}" if key in overridden else f"{key}={value} in {spec_path}"
        )
    if field == "train_batch_size":
        parts.append(f"{dp_size} data-parallel rank(s)")
    return " x ".join(parts)


def _spec_problems(
    config: dict,
    train: TrainConfig,
    dp_size: int,
    paths: tuple[str, str],
    overridden: frozenset[str],
) -> list[str]:
    """Sections the spec owns, and batch fields that disagree with it; fills the batch fields."""
    spec_path, ds_path = paths
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
            source = _spec_side(key, train, dp_size, spec_path, overridden)
            problems.append(
                f'{ds_path} sets "{key}": {given!r}, but {source} gives {value!r}; remove '
                f'"{key}" from {ds_path} (the launcher fills it) or make the two agree'
            )
        config[key] = value
    return problems


def _resolve_precision(config: dict, device_type: str, bf16_supported: bool, ds_path: str) -> str:
    """fp32, bf16 or fp16; resolves `bf16.enabled: "auto"` in place; refuses fp16 off GPUs."""
    bf16 = config.get("bf16", config.get("bfloat16"))
    if isinstance(bf16, dict) and bf16.get("enabled") == "auto":
        bf16["enabled"] = bf16_supported
    fp16 = config.get("fp16")
    bf16_on = isinstance(bf16, dict) and bf16.get("enabled") is True
    fp16_on = isinstance(fp16, dict) and fp16.get("enabled") is True
    if fp16_on and device_type != "cuda":
        raise DSConfigError(
            f"{ds_path} enables fp16, which DeepSpeed supports only on GPUs, but this run is "
            f'on {device_type}. Set "fp16": {{"enabled": false}} (fp32), or use '
            '"bf16": {"enabled": "auto"}.'
        )
    if fp16_on and bf16_on:
        raise DSConfigError(f"{ds_path} enables both fp16 and bf16; choose one")
    return "bf16" if bf16_on else "fp16" if fp16_on else "fp32"


def _offload_problems(zero: dict, ds_path: str) -> list[str]:
    """What DeepSpeed's schema allows but its engine ignores or rejects later."""
    stage = zero.get("stage", 0)
    if isinstance(stage, bool):  # pydantic would read true as stage 1
        return [f'{ds_path}: "zero_optimization.stage" is {stage!r}; expected 0, 1, 2 or 3']
    try:
        stage = int(stage)  # "3" passes DeepSpeed's schema as 3
    except (TypeError, ValueError):
        return []  # DeepSpeed's schema has reported it
    problems = []
    if _device(zero, "offload_param") != "none" and stage != 3:
        problems.append(f'{ds_path}: "offload_param" needs ZeRO stage 3 (this file has {stage!r})')
    if _device(zero, "offload_optimizer") != "none" and stage == 0:
        problems.append(
            f'{ds_path}: "offload_optimizer" needs ZeRO stage 1, 2 or 3 (this file has 0)'
        )
    return problems


def _device(zero: dict, key: str) -> str:
    section = zero.get(key)
    return str(section.get("device", "none")) if isinstance(section, dict) else "none"


def resolve_engine(
    ds_config: dict,
    train: TrainConfig,
    dp_size: int,
    *,
    paths: tuple[str, str],
    device_type: str,
    bf16_supported: bool,
    overridden: frozenset[str] = frozenset(),
) -> tuple[EngineSettings, list[str]]:
    """The job's engine settings from the JSON and the spec, and notes worth a warning.

    `paths` is (spec path, DeepSpeed JSON path) as the user gave them and `overridden` the spec
    keys given with --set, for messages that name where each value came from. Raises one
    DSConfigError listing every problem found.
    """
    ds_path = paths[1]
    config = copy.deepcopy(ds_config)
    problems = _spec_problems(config, train, dp_size, paths, overridden)
    problems += schema_problems(config, ds_path)
    zero = config.get("zero_optimization", {})
    if isinstance(zero, dict):
        problems += _offload_problems(zero, ds_path)
    if problems:
        raise DSConfigError("\n".join(problems), problems)
    precision = _resolve_precision(config, device_type, bf16_supported, ds_path)
    _sync_free_defaults(config, precision)
    return _settings(config, precision, train, dp_size), top_level_notes(config, ds_path)


def _sync_free_defaults(config: dict, precision: str) -> None:
    """DeepSpeed's defaults that stall a GPU every step, turned off where the JSON is silent
    (a value the JSON gives is kept):
    - `bf16.check_grad_overflow`: under bf16 ZeRO-1/2 tests every gradient for inf/NaN before
      the step (a dozen small kernels per tensor, then a host sync): about 40 ms of host time in
      a 73 ms GPT-2 124M step on an H200 (the torch profiler), while the GPU's own work took 49;
      turned off, the step took 55.0 ms instead of 74.5. bf16 needs no loss scale to adjust,
      and the launcher's divergence watch sees a non-finite gradient in DeepSpeed's global
      norm (inf) and stops the run before anything is saved (training/divergence.py).
    - `timers.throughput.synchronized`: DeepSpeed's own samples/s timer synchronises the device
      at every forward and step; the launcher times steps with CUDA events instead."""
    bf16 = config.get("bf16", config.get("bfloat16"))
    if precision == "bf16" and isinstance(bf16, dict):
        bf16.setdefault("check_grad_overflow", False)
    timers = config.setdefault("timers", {})
    if isinstance(timers, dict) and isinstance(timers.setdefault("throughput", {}), dict):
        timers["throughput"].setdefault("synchronized", False)


def _settings(config: dict, precision: str, train: TrainConfig, dp_size: int) -> EngineSettings:
    zero = config.get("zero_optimization", {})
    parsed = zero_model(config)  # DeepSpeed's defaults for what the JSON leaves out
    section = config.get("activation_checkpointing")
    return EngineSettings(
        zero_stage=int(getattr(parsed, "stage", zero.get("stage", 0))),
        precision=precision,
        offload_optimizer=_device(zero, "offload_optimizer"),
        offload_param=_device(zero, "offload_param"),
        activation_checkpointing=ActivationCheckpointing(**section) if section else None,
        dp_size=dp_size,
        micro_batch_size=train.micro_batch_size,
        grad_accum_steps=train.grad_accum_steps,
        reduce_bucket_size=int(getattr(parsed, "reduce_bucket_size", 5e8)),
        prefetch_bucket_size=int(getattr(parsed, "prefetch_bucket_size", 5e7)),
        sub_group_size=int(getattr(parsed, "sub_group_size", 1e9)),
        ds_config=config,
    )
