"""Reading a run spec: strict YAML plus `--set` overrides, every problem reported together.

Every problem found (unknown key, wrong type, bad value) is collected into one SpecError, each
naming its dotted key and what to do.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from data_pipeline.foreign import FORMS, check_declared
from launcher.checkpoints.hf_layout import SHAPE_FIELDS, read_config, shape_differences
from launcher.config.paths import (
    DEFAULT_SPEC,
    display_path,
    file_problem,
    find_spec,
    shipped_specs,
)
from launcher.config.spec import RunSpec
from launcher.errors import UserError
from model.gpt import shape_problems


class SpecError(UserError):
    """One or more problems in a run spec, reported together."""

    def __init__(self, source: str, problems: list[str]) -> None:
        lines = "\n".join(f"  - {p}" for p in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(
            f"run spec {source}: {len(problems)} {noun}:\n{lines}",
            [f"run spec {source}: {p}" for p in problems],
        )


# ---------------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) is dict:
        key, item = typing.get_args(tp)
        return f"a mapping of {_type_name(key)} to {_type_name(item)}"
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return " or ".join(_type_name(a) for a in args) + " or null"


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, value) for a scalar YAML value against a field type; YAML's quirks forgiven."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return True, None
        for arg in typing.get_args(tp):
            if arg is not type(None):
                ok, coerced = _coerce(value, arg)
                if ok:
                    return True, coerced
        return False, value
    if typing.get_origin(tp) is dict:
        key_type, item = typing.get_args(tp)
        if not isinstance(value, dict):
            return False, value
        coerced = {k: _coerce(v, item) for k, v in value.items()}
        ok = all(isinstance(k, key_type) and k_ok for k, (k_ok, _) in coerced.items())
        return ok, {k: v for k, (_, v) in coerced.items()}
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            value = [value]
        coerced = [_coerce(v, item) for v in value]
        return all(ok for ok, _ in coerced), [v for _, v in coerced]
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # PyYAML reads `1e-5` (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return isinstance(value, str), value
    return False, value


def _dataclass_list_item(tp: Any) -> type | None:
    """X for a field typed list[X] (or list[X] | None) where X is a dataclass."""
    for candidate in (tp, *typing.get_args(tp)):
        if typing.get_origin(candidate) is list:
            (item,) = typing.get_args(candidate)
            if dataclasses.is_dataclass(item):
                return item
    return None


def _build_list(item_type: type, value: Any, path: str, problems: list[str]) -> list:
    """A list of sections; a bare string (or a list item that is one) is the first field."""
    items = value if isinstance(value, list) else [value]
    if not items:
        problems.append(f"{path}: empty list; give at least one entry")
    first = dataclasses.fields(item_type)[0].name
    built = []
    for i, item in enumerate(items):
        item = {first: item} if isinstance(item, str) else item
        built.append(_build(item_type, item, f"{path}[{i}].", problems))
    return built


MAX_INT = 2**53
"""Beyond this an integer setting is a typo (and no longer exact as a float)."""

# Where other tools' names live in this spec (DeepSpeed, Hugging Face, Megatron, nanoGPT).
ELSEWHERE = {
    "optimizer": "the optimizer's settings are train.lr, train.beta1, train.beta2 and "
    "train.weight_decay (AdamW)",
    "scheduler": "the LR schedule's settings are train.lr, train.min_lr, train.warmup_steps and "
    "train.lr_decay_steps (warmup, then cosine)",
    "training": "did you mean 'train'?",
    "trainer": "did you mean 'train'?",
    "logging": "logging settings live in 'monitor' (and train.log_interval)",
    "wandb": "did you mean 'monitor.wandb'?",
    "evaluation": "did you mean 'eval'?",
    "checkpointing": "did you mean 'checkpoint'?",
    "dataset": "did you mean 'data'?",
    "zero_optimization": "ZeRO settings go in the DeepSpeed JSON (--ds_config), not the spec",
    "deepspeed": "DeepSpeed settings go in the DeepSpeed JSON (--ds_config), not the spec",
    "bf16": 'precision goes in the DeepSpeed JSON (--ds_config): "bf16": {"enabled": true}',
    "fp16": 'precision goes in the DeepSpeed JSON (--ds_config): "fp16": {"enabled": true}',
    "batch_size": "did you mean 'train.micro_batch_size' (per rank)?",
    "gradient_accumulation_steps": "did you mean 'train.grad_accum_steps'?",
    "learning_rate": "did you mean 'train.lr'?",
    "max_iters": "did you mean 'train.max_steps'?",
    "eval_interval": "did you mean 'eval.interval'?",
}
ALIASES = {"optimiser": "optimizer", "optim": "optimizer", "lr_scheduler": "scheduler",
           "schedule": "scheduler"}  # fmt: skip


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a spec dataclass, sections included."""
    keys = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        keys.append(f"{prefix}{f.name}")
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, f"{prefix}{f.name}.")
    return keys


def suggest(key: str, prefix: str, names: list[str]) -> str:
    """What an unknown key probably meant: the same name in another section, another tool's
    name for a setting, a close sibling, a close key anywhere; else the section's valid keys."""
    everywhere = _all_keys(RunSpec)
    same = [k for k in everywhere if k.rsplit(".", 1)[-1] == key and not k.startswith(prefix)]
    if same:
        return f"did you mean '{same[0]}'? ({key} lives in '{same[0].rsplit('.', 1)[0]}')"
    alias = ALIASES.get(key.lower(), key.lower())
    if alias in ELSEWHERE:
        return ELSEWHERE[alias]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{prefix}{close[0]}'?"
    leaves = {k.rsplit(".", 1)[-1]: k for k in everywhere}
    close = difflib.get_close_matches(key, list(leaves), n=1, cutoff=0.75)
    if close:
        return f"did you mean '{leaves[close[0]]}'?"
    return f"valid keys here: {', '.join(names)}"


def _build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    """Instantiate dataclass `cls` from a mapping, appending every problem found."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{prefix or 'spec'}: expected a mapping of keys, got {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in hints:
            problems.append(f"{path}: unknown key; {suggest(str(key), prefix, names)}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{path}.", problems)
            continue
        item_type = _dataclass_list_item(tp)
        if item_type is not None and value is not None:
            kwargs[key] = _build_list(item_type, value, path, problems)
            continue
        ok, coerced = _coerce(value, tp)
        if ok and isinstance(coerced, int) and abs(coerced) > MAX_INT:
            problems.append(f"{path}: {coerced} is larger than any setting can use (2**53)")
        elif ok and isinstance(coerced, float) and not math.isfinite(coerced):
            problems.append(f"{path}: got {coerced}, expected a finite number")
        elif ok:
            kwargs[key] = coerced
        else:
            problems.append(
                f"{path}: got {value!r} ({type(value).__name__}), expected {_type_name(tp)}"
            )
    return cls(**kwargs)


def _shape_from_checkpoint(spec: RunSpec, given: dict, problems: list[str]) -> None:
    """model.init_from: the shape fields the spec leaves out (or null) come from the Hugging
    Face config.json; those it sets must build the same model."""
    try:
        shape = read_config(Path(spec.model.init_from))
    except UserError as e:
        problems.append(f"model.init_from: {e}")
        return
    set_here = {k for k, v in given.items() if v is not None}
    differ = shape_differences(spec.model, shape, set_here)
    if differ:
        problems += [f"{d} (leave it out to take the checkpoint's)" for d in differ]
        return
    for key, value in shape.items():
        setattr(spec.model, key, value)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (['train', 'lr'], 3e-4), the value read as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise SpecError("--set", [f"{item!r}: expected KEY.PATH=VALUE, e.g. train.max_steps=100"])
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else raw


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Merge `--set` items into the raw mapping before validation (so errors read the same)."""
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return raw


def read_yaml(path: Path) -> dict:
    problem = file_problem(path)
    if problem:
        raise UserError(
            f"run spec {path} {problem}; pass --spec PATH to a YAML file, or a shipped spec's "
            f"name ({', '.join(shipped_specs())})"
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"run spec {path} is not valid YAML: {e}") from e
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(
            f"run spec {path}: expected a mapping of sections, got {type(raw).__name__}"
        )
    return raw


def load_spec(path: Path | None = None, overrides: list[str] | None = None) -> RunSpec:
    """Load, override and validate a run spec; raises SpecError listing every problem."""
    path = find_spec(Path(path)) if path is not None else DEFAULT_SPEC
    raw = apply_overrides(read_yaml(path), overrides or [])
    source = display_path(path) + (" with --set overrides" if overrides else "")
    problems: list[str] = []
    model = raw.get("model")
    if isinstance(model, dict) and model.get("init_from"):  # null: the checkpoint's value
        raw["model"] = {k: v for k, v in model.items() if v is not None or k not in SHAPE_FIELDS}
    spec = _build(RunSpec, raw, "", problems)
    if not problems and spec.model.init_from:
        _shape_from_checkpoint(spec, raw.get("model") or {}, problems)
    if not problems:
        problems = validate(spec)
    if problems:
        raise SpecError(source, problems)
    return spec


# ------------------------------------------------------------------------------- validation


def _check_min(problems: list[str], section: Any, prefix: str, minimum: float, *keys: str) -> None:
    for key in keys:
        value = getattr(section, key)
        if value is not None and value < minimum:
            problems.append(f"{prefix}.{key}: must be >= {minimum}, got {value}")


def validate(spec: RunSpec) -> list[str]:
    """Value checks that types alone cannot express."""
    problems: list[str] = []
    m, t = spec.model, spec.train
    _check_min(problems, m, "model", 1, "n_layer", "n_head", "n_embd", "block_size", "vocab_size")
    problems += [f"model.{p}" for p in shape_problems(m)]
    _check_min(problems, m, "model", 1, "activation_checkpointing_n")
    if not 0.0 <= m.dropout < 1.0:
        problems.append(f"model.dropout: must be in [0, 1), got {m.dropout}")
    _check_min(problems, t, "train", 1, "max_steps", "micro_batch_size", "grad_accum_steps")
    _check_min(problems, t, "train", 1, "log_interval", "lr_decay_steps")
    _check_min(problems, t, "train", 0, "warmup_steps", "weight_decay", "grad_clip", "min_lr")
    if t.lr <= 0:
        problems.append(f"train.lr: must be > 0, got {t.lr}")
    if t.min_lr > t.lr:
        problems.append(f"train.min_lr: {t.min_lr} is above train.lr={t.lr}")
    if t.time_limit is not None:
        try:
            if t.time_limit_s <= 0:
                problems.append(f"train.time_limit: must be > 0, got {t.time_limit!r}")
        except ValueError as e:
            problems.append(f"train.time_limit: {e}")
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(t, key) < 1.0:
            problems.append(f"train.{key}: must be in [0, 1), got {getattr(t, key)}")
    for source in [*spec.data.train, *(spec.data.val or [])]:
        if source.weight <= 0:
            problems.append(f"data source {source.path!r}: weight must be > 0, got {source.weight}")
    fraction = spec.data.val_fraction
    if fraction is not None and not 0.0 <= fraction < 1.0:
        problems.append(f"data.val_fraction: must be in [0, 1), got {fraction}")
    declared = spec.data.tokenizer and check_declared(spec.data.tokenizer)
    if declared or spec.data.tokenizer == "":
        problems.append(f"data.tokenizer: {declared or 'empty; give ' + FORMS + ' or null'}")
    _check_min(problems, spec.eval, "eval", 0, "interval", "min_delta")
    _check_min(problems, spec.eval, "eval", 1, "batches", "patience", "tasks_limit")
    _check_min(problems, spec.eval, "eval", 0, "tasks_interval")
    problems += _eval_problems(spec)
    _check_min(problems, t.profile, "train.profile", 0, "steps")
    _check_min(problems, t.profile, "train.profile", 1, "start")
    mode = spec.monitor.wandb.mode
    if mode not in (None, "online", "offline", "disabled"):
        problems.append(f"monitor.wandb.mode: {mode!r} is not online, offline, disabled or null")
    if spec.monitor.peak_flops is not None and spec.monitor.peak_flops <= 0:
        problems.append(f"monitor.peak_flops: must be > 0, got {spec.monitor.peak_flops}")
    _check_min(problems, spec.checkpoint, "checkpoint", 0, "interval", "keep_last")
    _check_min(problems, spec.parallel, "parallel", 1, "tensor", "pipeline", "sequence")
    _check_min(problems, spec.sample, "sample", 0, "max_new_tokens", "temperature")
    _check_min(problems, spec.sample, "sample", 1, "top_k")
    if not spec.name or "/" in spec.name:
        problems.append(f"name: must be a non-empty name without '/', got {spec.name!r}")
    return problems


NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def _eval_problems(spec: RunSpec) -> list[str]:
    """eval.sets and eval.tasks: names that make clean metric names, values that are paths."""
    e, problems = spec.eval, []
    for section in ("sets", "tasks"):
        for name, value in getattr(e, section).items():
            if not name or not set(name) <= NAME_CHARS:
                problems.append(
                    f"eval.{section}: name {name!r} must be letters, digits, '_', '-' or '.' "
                    f"(it becomes a metric name)"
                )
            if not value:
                problems.append(f"eval.{section}.{name}: empty; give a path")
    if e.monitor is not None and e.monitor not in e.sets:
        known = ", ".join(e.sets) or "none: eval.sets is empty"
        problems.append(f"eval.monitor: {e.monitor!r} is not a name in eval.sets ({known})")
    return problems


def spec_to_dict(spec: RunSpec) -> dict:
    return dataclasses.asdict(spec)


def spec_from_dict(data: dict) -> RunSpec:
    """Rebuild a spec saved by a run (e.g. in a checkpoint or out_dir/spec.yaml)."""
    problems: list[str] = []
    spec = _build(RunSpec, data, "", problems)
    if problems:
        raise SpecError("saved with the run", problems)
    return spec
