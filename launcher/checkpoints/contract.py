"""What a checkpoint holds besides DeepSpeed's tensors: one dataclass, written once, read once.

Rank 0 writes it as the tag's `zerolaunch.json` after every rank's shards are on disk: its
presence marks the tag complete, and its manifest lets a reader check no file is missing or
truncated. Resuming reads it before any process group starts (step, data position, run id,
shape, layout); DeepSpeed's own client state carries only what DeepSpeed needs.

Format versions: 1 (zerolaunch 0.1, before this contract had a version: it stored `bf16`
instead of `precision`) and 2. Version 1 files are read as they are; a file from a newer
zerolaunch is refused with what to do.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from launcher.errors import UserError

META_FILE = "zerolaunch.json"
FORMAT_VERSION = 2


@dataclass
class CheckpointMeta:
    """A tag's metadata: progress, identity, layout, losses, and its manifest."""

    step: int
    """Optimizer steps completed."""
    consumed_samples: int
    """Global training samples read so far: the data position."""
    run_id: str
    """Stable across resumes: the monitor's run id."""
    model: dict[str, Any]
    """The model's shape (GPTConfig fields) it was trained with."""
    zero_stage: int
    """ZeRO stage of the shards."""
    world_size: int
    """Ranks that wrote the shards (all of them: data x tensor x pipeline x sequence)."""
    precision: str
    """fp32, bf16 or fp16."""
    train_loss: float | None = None
    """Mean train loss of the last logged window."""
    val_loss: float | None = None
    """The latest val loss (measured at val_step)."""
    val_step: int | None = None
    """Step of val_loss; equal to step when val was measured at this checkpoint."""
    monitor: dict[str, Any] = field(default_factory=dict)
    """The overfitting detector's state, so a resumed run does not alert twice."""
    tokenizer: dict[str, Any] = field(default_factory=dict)
    """The tokenizer's identity (data_pipeline.tokenizers.identity); {} in tags before it was
    recorded."""
    parallel: dict[str, int] = field(default_factory=dict)
    """The model-parallel layout that wrote it ({tensor, pipeline, sequence}: one set of shards
    per tensor-parallel rank); {} = none (and in tags before it was recorded)."""
    manifest: dict[str, int] = field(default_factory=dict)
    """Every file of the tag (relative path) and its size in bytes."""
    hashes: dict[str, str] = field(default_factory=dict)
    """Every file's content hash (`xxh3_128:<hex>`, checkpoints/integrity.py); {} in tags
    before they were recorded."""
    bytes: int = 0
    """Sum of the manifest."""
    saved_at: float = 0.0
    """Unix time the tag was completed."""
    format_version: int = FORMAT_VERSION
    """Version of this contract the file was written with."""

    @property
    def tensor_parallel(self) -> int:
        return int(self.parallel.get("tensor", 1))

    @property
    def pipeline_parallel(self) -> int:
        return int(self.parallel.get("pipeline", 1))

    @property
    def data_parallel(self) -> int:
        """Model replicas that wrote it: the ranks over tensor x pipeline x sequence."""
        per_replica = 1
        for axis in ("tensor", "pipeline", "sequence"):
            per_replica *= int(self.parallel.get(axis, 1))
        return self.world_size // per_replica

    @property
    def own_val_loss(self) -> float | None:
        """Val loss measured at this checkpoint's own step (None if it was not)."""
        return self.val_loss if self.val_step == self.step else None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, source: str) -> CheckpointMeta:
        """Parse a `zerolaunch.json` of any known version; `source` names it in errors."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{source} is not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise UserError(f"{source}: expected a JSON object")
        return cls._from_dict(_upgrade(data, source), source)

    @classmethod
    def _from_dict(cls, data: dict, source: str) -> CheckpointMeta:
        names = {f.name for f in fields(cls)}
        required = [f.name for f in fields(cls) if f.default is MISSING is f.default_factory]
        missing = [k for k in required if k not in data]
        if missing:
            raise UserError(
                f"{source} lacks {', '.join(missing)}: it was not written by zerolaunch, or it "
                "was damaged; resume from another tag (python -m launcher.ckpt list RUN_DIR)"
            )
        meta = cls(**{k: v for k, v in data.items() if k in names})
        problems = meta._problems()
        if problems:
            raise UserError(
                f"{source} is damaged ({'; '.join(problems)}); resume from another tag "
                "(python -m launcher.ckpt list RUN_DIR)"
            )
        return meta

    def _problems(self) -> list[str]:
        """Fields whose values a zerolaunch never writes."""
        problems = [
            f"{name} is {getattr(self, name)!r}, expected {kind}"
            for name, kind, ok in (
                ("step", "an integer >= 0", _int(self.step, 0)),
                ("consumed_samples", "an integer >= 0", _int(self.consumed_samples, 0)),
                ("world_size", "an integer >= 1", _int(self.world_size, 1)),
                ("zero_stage", "0, 1, 2 or 3", self.zero_stage in (0, 1, 2, 3)),
                ("precision", "fp32, bf16 or fp16", self.precision in ("fp32", "bf16", "fp16")),
                ("run_id", "text", isinstance(self.run_id, str)),
                ("model", "an object", isinstance(self.model, dict)),
                ("monitor", "an object", isinstance(self.monitor, dict)),
                ("tokenizer", "an object", isinstance(self.tokenizer, dict)),
                ("parallel", "axis -> size", _manifest(self.parallel)),
                ("manifest", "file -> size", _manifest(self.manifest)),
                ("hashes", "file -> hash", _hashes(self.hashes)),
                ("val_step", "an integer or null", self.val_step is None or _int(self.val_step, 0)),
                ("train_loss", "a number or null", _number_or_none(self.train_loss)),
                ("val_loss", "a number or null", _number_or_none(self.val_loss)),
            )
            if not ok
        ]
        return problems


def _upgrade(data: dict, source: str) -> dict:
    """A version-1 file in today's terms; a newer version than this code knows is refused."""
    version = data.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(
            f"{source} has checkpoint format version {version!r}, newer than this zerolaunch "
            f"reads ({FORMAT_VERSION}); resume it with the zerolaunch version that wrote it, or "
            "upgrade this checkout"
        )
    if version == 1:
        data = dict(data, format_version=1)
        data.setdefault("precision", "bf16" if data.pop("bf16", False) else "fp32")
    return data


def _int(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _number_or_none(value: object) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _hashes(value: object) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )


def _manifest(value: object) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and _int(v, 0) for k, v in value.items()
    )
