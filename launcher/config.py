"""The run spec: one dataclass per section, loaded strictly from YAML plus `--set` overrides.

Every problem found (unknown key, wrong type, bad value) is collected and reported together in
one SpecError, each naming its dotted key and what to do.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from launcher.errors import UserError
from model.gpt import GPTConfig

DEFAULT_SPEC = Path(__file__).parent / "specs" / "shakespeare_char.yaml"


@dataclass
class DataSource:
    """One indexed dataset (PREFIX.bin/.idx/.json) and its share of a blend."""

    path: str = "data/shakespeare_char"
    """Prefix written by `python -m data_pipeline.prepare --out PREFIX`."""
    weight: float = 1.0
    """Relative share of samples when several sources are blended."""


@dataclass
class DataConfig:
    """Training and validation data: indexed datasets, blended by weight."""

    train: list[DataSource] = field(default_factory=lambda: [DataSource()])
    """Training sources: a prefix, a list of prefixes, or a list of {path, weight}."""
    val: list[DataSource] | None = None
    """Validation sources (same forms); null = carve val_fraction of each train source."""
    val_fraction: float | None = None
    """Fraction of documents (the last ones) carved off for val; null = what prepare recorded."""
    index_cache: str | None = None
    """Directory for the cached sample index; null = PREFIX.cache beside each dataset."""


@dataclass
class TrainConfig:
    """Optimisation: batch sizes, AdamW, the LR schedule, logging cadence."""

    max_steps: int = 1000
    """Optimizer steps to train for (the run ends at this step, resumed or not)."""
    micro_batch_size: int = 8
    """Sequences per rank per forward/backward."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 1e-4
    """Floor of the cosine decay."""
    warmup_steps: int = 100
    """Linear warmup from 0 to lr over this many steps."""
    lr_decay_steps: int | None = None
    """Step at which cosine decay reaches min_lr; null = max_steps."""
    weight_decay: float = 0.1
    """AdamW weight decay for matrices (never biases, norms or embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables it."""
    seed: int = 1337
    """Seed for initialisation, data order and sampling."""
    log_interval: int = 10
    """Steps between log lines (and metrics.jsonl records)."""
    time_limit: int | str | None = None
    """Wall-time budget of one process: seconds, or Slurm's [D-]HH:MM:SS; the run saves and
    exits (code 75) before it runs out. Under Slurm the job's own limit applies too."""

    @property
    def time_limit_s(self) -> float | None:
        return parse_duration(self.time_limit) if self.time_limit is not None else None


@dataclass
class EvalConfig:
    """Validation loss during training."""

    interval: int = 100
    """Steps between evaluations (and after the last step); 0 disables evaluation."""
    batches: int = 20
    """Micro-batches per rank in each evaluation."""
    patience: int = 3
    """Overfitting: evaluations in a row with val above its best by more than min_delta."""
    min_delta: float = 0.0
    """Overfitting: how far above its best val must be for an evaluation to count as a rise."""
    early_stop: bool = False
    """On overfitting, save a final checkpoint and stop cleanly."""


@dataclass
class CheckpointConfig:
    """Sharded DeepSpeed checkpoints under out_dir/checkpoints."""

    interval: int = 500
    """Steps between checkpoints; one is always written at the end; 0 = only at the end."""
    keep_last: int = 3
    """Checkpoints kept; older ones are deleted after a newer one is saved; 0 keeps all."""
    resume: str = "auto"
    """'auto' = newest checkpoint in out_dir/checkpoints if any, 'none', or a checkpoint path."""


@dataclass
class SampleConfig:
    """Text generated at the end of training."""

    prompt: str = "What is an LLM?"
    """Text the sample continues."""
    max_new_tokens: int = 200
    """Tokens generated; 0 skips the sample."""
    temperature: float = 0.8
    """Softmax temperature; 0 = greedy."""
    top_k: int | None = 200
    """Sample only among the k most likely tokens; null = all."""


@dataclass
class WandbConfig:
    """Weights & Biases: rank 0 logs every metric; a failure warns once and training goes on."""

    enabled: bool = True
    """Log to wandb at all (metrics.jsonl is always written)."""
    project: str = "zerolaunch"
    """wandb project."""
    entity: str | None = None
    """wandb entity (user or team); null = your default."""
    name: str | None = None
    """Display name; null = the run spec's name."""
    group: str | None = None
    """wandb group, e.g. to gather the runs of a sweep."""
    tags: list[str] = field(default_factory=list)
    """wandb tags."""
    mode: str | None = None
    """online, offline or disabled; null = online with an API key configured, else offline."""


@dataclass
class MonitorConfig:
    """Metrics: where they go and how throughput is measured."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    peak_flops: float | None = None
    """Peak FLOP/s of one device for MFU; null = the device table (GPUs) or a measured matmul
    peak (CPUs)."""
    detailed_timing: bool = True
    """Time forward and backward separately (CUDA events on GPUs, no extra synchronisation)."""


@dataclass
class RunSpec:
    """The whole run: it only composes the sections."""

    name: str = "run"
    """Run name; also the default output directory runs/<name>."""
    out_dir: str | None = None
    """Where checkpoints, metrics and the resolved spec go; null = runs/<name>."""
    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir if self.out_dir is not None else Path("runs") / self.name)


class SpecError(UserError):
    """One or more problems in a run spec, reported together."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"run spec {source}: {len(problems)} {noun}:\n{lines}")


# ---------------------------------------------------------------------------------- loading


def display_path(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
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
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {names}"
            problems.append(f"{path}: unknown key{hint}")
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
        if ok:
            kwargs[key] = coerced
        else:
            problems.append(
                f"{path}: got {value!r} ({type(value).__name__}), expected {_type_name(tp)}"
            )
    return cls(**kwargs)


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
    if not path.exists():
        raise UserError(
            f"run spec {path} does not exist; pass --spec PATH to an existing YAML file"
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
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
    path = Path(path) if path is not None else DEFAULT_SPEC
    raw = apply_overrides(read_yaml(path), overrides or [])
    source = display_path(path) + (" with --set overrides" if overrides else "")
    problems: list[str] = []
    spec = _build(RunSpec, raw, "", problems)
    if not problems:
        problems = validate(spec)
    if problems:
        raise SpecError(source, problems)
    return spec


# ------------------------------------------------------------------------------- validation


def parse_duration(value: int | str) -> float:
    """Seconds from an int, '90s', '45m', '2h', or Slurm's 'MM:SS', 'HH:MM:SS', 'D-HH:MM:SS'."""
    if isinstance(value, int):
        return float(value)
    text = value.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1:] in units:
            return float(text[:-1]) * units[text[-1]]
        days, _, clock = text.rpartition("-")
        parts = [float(p) for p in clock.split(":")]
        if not 1 <= len(parts) <= 3 or (days and len(parts) == 1):
            raise ValueError(text)
        seconds = sum(v * 60**i for i, v in enumerate(reversed(parts)))
        return seconds + (float(days) * 86400 if days else 0.0)
    except ValueError:
        raise ValueError(
            f"{value!r} is not a duration: give seconds, '45m', '2h' or [D-]HH:MM:SS"
        ) from None


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
    if m.n_head >= 1 and m.n_embd % m.n_head:
        problems.append(f"model.n_head: {m.n_head} does not divide model.n_embd={m.n_embd}")
    if m.activation_checkpointing not in ("none", "full", "every_n"):
        problems.append(
            f"model.activation_checkpointing: {m.activation_checkpointing!r} is not "
            "none, full or every_n"
        )
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
    _check_min(problems, spec.eval, "eval", 0, "interval", "min_delta")
    _check_min(problems, spec.eval, "eval", 1, "batches", "patience")
    mode = spec.monitor.wandb.mode
    if mode not in (None, "online", "offline", "disabled"):
        problems.append(f"monitor.wandb.mode: {mode!r} is not online, offline, disabled or null")
    if spec.monitor.peak_flops is not None and spec.monitor.peak_flops <= 0:
        problems.append(f"monitor.peak_flops: must be > 0, got {spec.monitor.peak_flops}")
    _check_min(problems, spec.checkpoint, "checkpoint", 0, "interval", "keep_last")
    _check_min(problems, spec.sample, "sample", 0, "max_new_tokens", "temperature")
    _check_min(problems, spec.sample, "sample", 1, "top_k")
    if not spec.name or "/" in spec.name:
        problems.append(f"name: must be a non-empty name without '/', got {spec.name!r}")
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
