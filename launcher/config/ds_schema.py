"""The DeepSpeed JSON checked by DeepSpeed's own config models, before any engine starts.

DeepSpeed validates most sections with pydantic models that forbid unknown keys, but only when
`deepspeed.initialize` runs, after the process group is up, with a traceback. Running the same
models during pre-flight turns a misspelled key into one line naming the key, the section and
the file, gathered with every other problem. `activation_checkpointing` (not a pydantic model
in DeepSpeed) is checked against DeepSpeed's list of its keys. Unknown top-level keys are
ignored by DeepSpeed: one that is close to a known key is an error ("did you mean"), others are
noted as warnings.
"""

from __future__ import annotations

import difflib
import importlib
import typing
from typing import Any

# section -> (module, pydantic model) in DeepSpeed; a model missing from the installed version
# is skipped, so an older or newer DeepSpeed validates what it knows.
SECTION_MODELS = {
    "zero_optimization": ("deepspeed.runtime.zero.config", "DeepSpeedZeroConfig"),
    "bf16": ("deepspeed.runtime.precision_config", "DeepSpeedBF16Config"),
    "bfloat16": ("deepspeed.runtime.precision_config", "DeepSpeedBF16Config"),
    "fp16": ("deepspeed.runtime.precision_config", "DeepSpeedFP16Config"),
    "tensorboard": ("deepspeed.monitor.config", "TensorBoardConfig"),
    "wandb": ("deepspeed.monitor.config", "WandbConfig"),
    "csv_monitor": ("deepspeed.monitor.config", "CSVConfig"),
    "comet": ("deepspeed.monitor.config", "CometConfig"),
    "comms_logger": ("deepspeed.comm.config", "CommsLoggerConfig"),
    "compile": ("deepspeed.compile.config", "CompileConfig"),
    "hybrid_engine": ("deepspeed.runtime.config", "HybridEngineConfig"),
    "tensor_parallel": ("deepspeed.runtime.tensor_parallel.config", "TPTrainingConfig"),
}
ACTIVATION_CHECKPOINTING_KEYS = (
    "partition_activations",
    "contiguous_memory_optimization",
    "number_checkpoints",
    "cpu_checkpointing",
    "synchronize_checkpoint_boundary",
    "profile",
)
# Top-level keys DeepSpeed reads besides the sections above (runtime/constants.py and friends).
OTHER_TOP_LEVEL_KEYS = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "gradient_clipping", "optimizer", "scheduler", "activation_checkpointing", "steps_per_print",
    "wall_clock_breakdown", "dump_state", "memory_breakdown", "prescale_gradients",
    "gradient_predivide_factor", "sparse_gradients", "communication_data_type",
    "seq_parallel_communication_data_type", "data_types", "amp", "torch_autocast",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "flops_profiler", "aio",
    "checkpoint", "pipeline", "elasticity", "autotuning", "data_efficiency",
    "curriculum_learning", "sparse_attention", "progressive_layer_drop", "eigenvalue",
    "compression_training", "weight_quantization", "quantize_training", "timers", "nebula",
    "dataloader_drop_last", "use_data_before_expert_parallelism", "disable_allgather",
    "graph_harvesting", "use_node_local_storage", "load_universal", "zenflow",
)  # fmt: skip


def _model(section: str) -> Any:
    module, name = SECTION_MODELS[section]
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def schema_problems(config: dict, ds_path: str) -> list[str]:
    """Misspelled top-level keys, then every problem in the sections DeepSpeed validates."""
    return top_level_problems(config, ds_path) + section_problems(config, ds_path)


def zero_model(config: dict) -> Any:
    """DeepSpeed's parsed `zero_optimization` section (its defaults filled in), or None when
    the installed DeepSpeed has no such model. Call after schema_problems found nothing."""
    model = _model("zero_optimization")
    return model(**config.get("zero_optimization", {})) if model is not None else None


def section_problems(config: dict, ds_path: str) -> list[str]:
    """Every problem DeepSpeed's own models find in the sections present, one line each."""
    problems = []
    for section, value in config.items():
        if section == "activation_checkpointing":
            problems += _activation_checkpointing_problems(value, ds_path)
        if section not in SECTION_MODELS:
            continue
        if not isinstance(value, dict):
            problems.append(f'{ds_path}: "{section}" must be a JSON object, got {value!r}')
            continue
        model = _model(section)
        if model is not None:
            problems += _validate(model, section, value, ds_path)
    return problems


def _validate(model: Any, section: str, value: dict, ds_path: str) -> list[str]:
    from pydantic import ValidationError

    try:
        model(**value)
    except ValidationError as e:
        return [_describe(model, section, error, ds_path) for error in e.errors()]
    except (AssertionError, ValueError, TypeError) as e:  # DeepSpeed's own checks inside models
        return [f'{ds_path}: "{section}": {e}']
    return []


def _describe(model: Any, section: str, error: dict, ds_path: str) -> str:
    loc = [str(part) for part in error["loc"]]
    key = ".".join([section, *loc])
    if error["type"] == "extra_forbidden":
        where = ".".join([section, *loc[:-1]])
        known = _keys_at(model, loc[:-1])
        close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
        hint = f'; did you mean "{close[0]}"?' if close else f"; its keys are: {', '.join(known)}"
        return f'{ds_path}: "{loc[-1]}" is not a key of the "{where}" section{hint}'
    expected = (error.get("ctx") or {}).get("expected")
    why = f"expected {_dedupe(expected)}" if expected else error["msg"]
    return f'{ds_path}: "{key}" is {error.get("input")!r}; {why}'


def _dedupe(expected: str) -> str:
    """'0, 1, 2, 3 or 3' (an enum with an alias) -> '0, 1, 2 or 3'."""
    items = [part.strip() for part in expected.replace(" or ", ", ").split(",")]
    unique = list(dict.fromkeys(i for i in items if i))
    return unique[0] if len(unique) == 1 else f"{', '.join(unique[:-1])} or {unique[-1]}"


def _keys_at(model: Any, path: list[str]) -> list[str]:
    """The keys (field names and aliases) a model accepts at a nested path."""
    for name in path:
        fields = model.model_fields
        info = fields.get(name) or next((f for f in fields.values() if f.alias == name), None)
        inner = [a for a in typing.get_args(info.annotation) or [info.annotation]] if info else []
        model = next((a for a in inner if hasattr(a, "model_fields")), None)
        if model is None:
            return []
    keys = []
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if not extra.get("deprecated"):
            keys.append(info.alias or name)
    return sorted(keys)


def _activation_checkpointing_problems(value: Any, ds_path: str) -> list[str]:
    if not isinstance(value, dict):
        return [f'{ds_path}: "activation_checkpointing" must be a JSON object, got {value!r}']
    problems = []
    for key, item in value.items():
        expected = "an integer or null" if key == "number_checkpoints" else "true or false"
        if key == "number_checkpoints":
            wrong = item is not None and (isinstance(item, bool) or not isinstance(item, int))
        else:
            wrong = not isinstance(item, bool)
        if key in ACTIVATION_CHECKPOINTING_KEYS and wrong:
            problems.append(
                f'{ds_path}: "activation_checkpointing.{key}" is {item!r}; expected {expected}'
            )
        if key not in ACTIVATION_CHECKPOINTING_KEYS:
            close = difflib.get_close_matches(key, ACTIVATION_CHECKPOINTING_KEYS, n=1, cutoff=0.6)
            hint = f'; did you mean "{close[0]}"?' if close else ""
            problems.append(
                f'{ds_path}: "{key}" is not a key of the "activation_checkpointing" section'
                f"{hint or '; its keys are: ' + ', '.join(ACTIVATION_CHECKPOINTING_KEYS)}"
            )
    return problems


def known_top_level_keys() -> list[str]:
    return sorted({*SECTION_MODELS, *OTHER_TOP_LEVEL_KEYS})


def top_level_problems(config: dict, ds_path: str) -> list[str]:
    """Unknown top-level keys close to a known one: almost certainly a typo DeepSpeed would
    silently ignore (e.g. "zero_optimisation", which would train without ZeRO)."""
    problems = []
    for key in config:
        close = _close_key(key)
        if close is not None:
            problems.append(
                f'{ds_path}: unknown top-level key "{key}" (DeepSpeed would ignore it); '
                f'did you mean "{close}"?'
            )
    return problems


def top_level_notes(config: dict, ds_path: str) -> list[str]:
    """Unknown top-level keys with no close match: DeepSpeed ignores them; worth a warning."""
    known = set(known_top_level_keys())
    return [
        f'{ds_path}: DeepSpeed does not read the top-level key "{key}"; it has no effect'
        for key in config
        if key not in known and _close_key(key) is None
    ]


def _close_key(key: str) -> str | None:
    known = known_top_level_keys()
    if key in known:
        return None
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
    return close[0] if close else None
