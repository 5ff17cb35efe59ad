"""Sharded DeepSpeed checkpoints you can trust: tags `global_step{N}` under `out_dir/checkpoints`.

Saving: every rank writes its DeepSpeed shards and its RNG state; after a barrier, rank 0 writes
`zerolaunch.json` into the tag (the completion marker, a `CheckpointMeta`: step, data position,
model shape, ZeRO stage, world size, losses, and a manifest of every file with its size), then
the `latest` pointer, then `best` (the complete tag of lowest val loss), each atomically
(temporary name + rename); only then are older tags rotated out. A tag without its marker, or
whose files do not match the manifest, is incomplete: `resume: auto` skips it with a warning.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from launcher.checkpoints import integrity
from launcher.checkpoints.contract import META_FILE, CheckpointMeta
from launcher.config.load import spec_from_dict
from launcher.config.spec import RunSpec
from launcher.errors import UserError
from launcher.runtime.distributed import all_max
from model.gpt import GPTConfig

LATEST = "latest"
BEST = "best"
UNIVERSAL_SUFFIX = "_universal"
UNIVERSAL_INFO = {"universal_checkpoint_version": 0.2}
"""The client state DeepSpeed's ds_to_universal requires: the only client state saved."""
_TAG_RE = re.compile(r"^global_step(\d+)$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"global_step{step}"


def all_tags(ckpt_dir: Path) -> list[tuple[int, str]]:
    """(step, tag) of every tag directory, complete or not, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p.name)
        for p in ckpt_dir.iterdir()
        if p.is_dir() and (m := _TAG_RE.match(p.name))
    ]
    return sorted(found)


def list_tags(ckpt_dir: Path) -> list[tuple[int, str]]:
    """(step, tag) of every complete checkpoint, oldest first."""
    return [(s, t) for s, t in all_tags(ckpt_dir) if verify(ckpt_dir / t) is None]


def read_meta(tag_dir: Path) -> CheckpointMeta:
    """The tag's metadata; a tag without a readable one is not a (complete) checkpoint."""
    try:
        text = (tag_dir / META_FILE).read_text()
    except OSError as e:
        raise UserError(
            f"{tag_dir} is not a complete zerolaunch checkpoint ({META_FILE} unreadable: {e}); "
            "pass the directory of a tag such as runs/NAME/checkpoints/global_step100"
        ) from e
    return CheckpointMeta.from_json(text, str(tag_dir / META_FILE))


def verify(tag_dir: Path) -> str | None:
    """None when the tag is complete, else what is wrong with it. Only the marker's manifest is
    read: a tag written by a newer zerolaunch is complete (never skipped or rotated away as a
    leftover) and is refused with what to do when something reads its metadata."""
    marker = tag_dir / META_FILE
    if not marker.exists():
        return f"no completion marker ({META_FILE}): its save never finished"
    try:
        manifest = dict(json.loads(marker.read_text())["manifest"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{META_FILE} is unreadable ({e})"
    for name, size in manifest.items():
        path = tag_dir / name
        if not path.exists():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, {size} were written (truncated)"
    return None


def read_pointer(ckpt_dir: Path, name: str) -> str | None:
    try:
        return (ckpt_dir / name).read_text().strip() or None
    except OSError:
        return None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- choosing


def resolve_resume(
    resume: str, run_dir: Path, damaged: dict[Path, str] | None = None
) -> tuple[Path | None, list[str]]:
    """(tag directory to resume from or None, warnings about skipped tags).

    'auto': the newest complete tag in run_dir/checkpoints, skipping damaged ones with a
    warning; 'none': start fresh; otherwise a tag directory (which must be complete) or a
    checkpoints directory (its newest complete tag). `damaged`: tags found damaged by a content
    check (tag -> what is wrong), skipped like the others.
    """
    damaged = damaged or {}
    if resume == "none":
        return None, []
    if resume == "auto":
        return _newest_complete(checkpoint_dir(run_dir), damaged)
    path = Path(resume)
    if _TAG_RE.match(path.name) and path.is_dir():
        problem = damaged.get(path) or verify(path)
        if problem:
            raise UserError(
                f"checkpoint.resume={resume}: the checkpoint is damaged: {problem}. "
                "Choose another tag (python -m launcher.ckpt list RUN_DIR)"
            )
        return path, []
    if all_tags(path):
        return _newest_complete(path, damaged)
    if path.is_dir() and all_tags(path.parent):
        tags = ", ".join(t for _, t in all_tags(path.parent))
        raise UserError(f"checkpoint.resume={resume}: no such tag; {path.parent} has: {tags}")
    raise UserError(
        f"checkpoint.resume={resume!r}: no checkpoint there. Give a tag directory "
        "(runs/NAME/checkpoints/global_stepN), a checkpoints directory, 'auto' or 'none'"
    )


def _newest_complete(ckpt_dir: Path, damaged: dict[Path, str]) -> tuple[Path | None, list[str]]:
    warnings = []
    for _, tag in reversed(all_tags(ckpt_dir)):
        problem = damaged.get(ckpt_dir / tag) or verify(ckpt_dir / tag)
        if problem is None and _diverged_tag(ckpt_dir / tag):
            problem = "its losses are not finite: it was saved after training diverged"
        if problem is None:
            return ckpt_dir / tag, warnings
        warnings.append(f"skipping checkpoint {ckpt_dir / tag}: {problem}")
    return None, warnings


def _diverged_tag(tag_dir: Path) -> bool:
    try:
        return diverged(read_meta(tag_dir))
    except UserError:
        return False  # a newer format: refused, with what to do, when it is read


def check_compatible(tag_dir: Path, model: GPTConfig) -> CheckpointMeta:
    """Refuse a checkpoint of another model shape, listing what differs; returns its metadata.
    A shape field the checkpoint predates counts as that field's default."""
    meta = read_meta(tag_dir)
    not_shape = {"dropout", "activation_checkpointing", "activation_checkpointing_n", "init_from"}
    defaults = {f.name: f.default for f in fields(type(model))}
    diffs = [
        f"model.{k}: checkpoint {meta.model.get(k, defaults[k])!r}, now {v!r}"
        for k, v in asdict(model).items()
        if k not in not_shape and meta.model.get(k, defaults[k]) != v
    ]
    if diffs:
        raise UserError(
            f"checkpoint {tag_dir} was written for another model shape:\n  "
            + "\n  ".join(diffs)
            + "\nResume with the spec it was trained with, or set checkpoint.resume=none "
            "with another out_dir (or name) to start a new run."
        )
    return meta


# ----------------------------------------------------------------------------- saving


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rng_file(rank: int) -> str:
    return f"rng_state_rank{rank}.pt"


class SaveError(UserError):
    """A checkpoint cannot be written. `together`: every rank knows and stops at once (found
    before writing); else only the rank that failed knows, mid-save, and must stop alone."""

    def __init__(self, message: str, together: bool) -> None:
        super().__init__(message)
        self.together = together


def _size(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def space_problem(ckpt_dir: Path, needed: int) -> str | None:
    """Why a save of about `needed` bytes will not fit in ckpt_dir's filesystem, or None."""
    probe = ckpt_dir if ckpt_dir.exists() else ckpt_dir.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free >= 1.1 * needed:
        return None
    return f"it needs about {_size(needed)} and {probe} has {_size(free)} free"


def last_checkpoint_bytes(run_dir: Path) -> int | None:
    """Size of the run's newest complete checkpoint: what the next save will take."""
    ckpt_dir = checkpoint_dir(run_dir)
    latest = read_pointer(ckpt_dir, LATEST)
    try:
        return read_meta(ckpt_dir / latest).bytes if latest else None
    except UserError:
        return None


@dataclass
class Pending:
    """A save whose files are written (or, asynchronously, being written): `finish` it."""

    ckpt_dir: Path
    meta: CheckpointMeta
    keep_last: int
    expected_bytes: int
    call_s: float = 0.0
    """Seconds the save call took (all of the writing, or the copy when asynchronous)."""

    @property
    def tag(self) -> str:
        return tag_for(self.meta.step)


def save(
    engine: Any,
    run_dir: Path,
    meta: CheckpointMeta,
    keep_last: int,
    expected_bytes: int,
    writer: Any = None,
    universal_info: dict | None = None,
) -> Pending:
    """All ranks: write this rank's shards and RNG state (with an AsyncWriter as the engine's
    checkpoint engine, `writer`: copy them to host memory and queue them). `finish` completes
    the tag. `universal_info`: how a tensor-parallel model's parameters are split, for
    ds_to_universal (universal.tensor_parallel_info).

    Every rank first checks that about `expected_bytes` fit (one all-reduce: all stop together
    before writing anything, exit 2); a write that fails anyway stops its rank (SaveError)."""
    dist = torch.distributed
    ckpt_dir, tag = checkpoint_dir(run_dir), tag_for(meta.step)
    tag_dir = ckpt_dir / tag
    _check_space(ckpt_dir, tag, expected_bytes)
    if dist.get_rank() == 0:  # a stale, incomplete tag of the same name (an earlier crash)
        shutil.rmtree(tag_dir, ignore_errors=True)
        shutil.rmtree(ckpt_dir / f"{tag}{UNIVERSAL_SUFFIX}", ignore_errors=True)
    dist.barrier()
    pending = Pending(ckpt_dir, meta, keep_last, expected_bytes)
    try:
        engine.save_checkpoint(
            str(ckpt_dir),
            tag=tag,
            client_state={"universal_checkpoint_info": universal_info or UNIVERSAL_INFO},
            save_latest=False,
        )
        rng_file = tag_dir / _rng_file(dist.get_rank())
        if writer is not None:
            writer.put(rng_state(), rng_file)
        else:
            torch.save(rng_state(), rng_file)
    except Exception as e:  # noqa: BLE001 - a full disk surfaces as OSError or RuntimeError
        _failed(ckpt_dir, tag, expected_bytes, e)
    return pending


def finish(pending: Pending, writer: Any = None) -> Path:
    """All ranks, at the same step: wait for this rank's writer (if asynchronous); once every
    rank's files are on disk, each hashes and fsyncs its share of them, then rank 0 writes the
    marker, `latest` and `best`, and rotates."""
    dist = torch.distributed
    ckpt_dir, tag, meta = pending.ckpt_dir, pending.tag, pending.meta
    tag_dir = ckpt_dir / tag
    error = None
    if writer is not None:
        try:
            writer.wait()
        except Exception as e:  # noqa: BLE001 - as in save; every rank is here: stop together
            error = e
    if all_max(error is not None):
        _failed(ckpt_dir, tag, pending.expected_bytes, error, together=True)
    _test_pause(meta.step)
    dist.barrier()  # every rank's files are on disk before the tag can count as complete
    meta.hashes, problem = integrity.hash_tag(tag_dir, lambda: tag_files(tag_dir))
    if problem is not None:
        _failed(ckpt_dir, tag, pending.expected_bytes, OSError(problem), together=True)
    if dist.get_rank() == 0:
        complete(ckpt_dir, tag, meta, keep_last=pending.keep_last)
    dist.barrier()
    return tag_dir


def _check_space(ckpt_dir: Path, tag: str, expected_bytes: int) -> None:
    problem = None if os.environ.get("ZEROLAUNCH_TEST_SKIP_SPACE_CHECK") else (
        space_problem(ckpt_dir, expected_bytes)
    )  # fmt: skip
    if all_max(problem is not None):
        latest = read_pointer(ckpt_dir, LATEST)
        kept = f"checkpoint {latest} is intact" if latest else "run has no checkpoint yet"
        raise SaveError(
            f"not enough space to save checkpoint {tag} in {ckpt_dir}: "
            f"{problem or 'another rank found its disk too full'}. Free space there (or lower "
            f"checkpoint.keep_last, or point out_dir elsewhere) and run again: the {kept}",
            together=True,
        )


def _failed(
    ckpt_dir: Path, tag: str, expected_bytes: int, error: Exception | None, together: bool = False
) -> None:
    """A write failed: this rank alone knows (mid-save), or every rank does (`together`: all
    reached the same point, `error` is None where another rank failed)."""
    rank = torch.distributed.get_rank()
    if rank == 0:  # the tag never completes: it goes, and the space with it
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    why = space_problem(ckpt_dir, expected_bytes)
    why = why or (f"{type(error).__name__}: {error}" if error else "another rank's write failed")
    who = "the ranks" if together else f"rank {rank}"
    latest = read_pointer(ckpt_dir, LATEST)
    kept = f"checkpoint {latest} is intact" if latest else "run has no checkpoint yet"
    raise SaveError(
        f"{who} could not write checkpoint {tag} in {ckpt_dir} ({why}); the tag is "
        f"incomplete and will be skipped. Free space there and run again: the {kept}",
        together=together,
    ) from error


def tag_files(tag_dir: Path) -> dict[str, int]:
    """Every file of a tag (relative path) and its size, the marker excepted."""
    files = sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != META_FILE)
    return {str(p.relative_to(tag_dir)): p.stat().st_size for p in files}


def verify_contents(tag_dir: Path) -> str | None:
    """Every rank: the tag's files against the hashes recorded when it was saved (each rank
    reads its share); the same answer everywhere. Sizes first (verify), then the bytes."""
    problem, hashes, sizes = verify(tag_dir), {}, {}
    if problem is None:
        try:
            meta = read_meta(tag_dir)
            hashes, sizes = meta.hashes, meta.manifest
        except UserError as e:
            problem = str(e)
    return integrity.verify_together(tag_dir, hashes, sizes, problem)


def _test_pause(step: int) -> None:
    """Fault injection for the crash-during-save test: ZEROLAUNCH_TEST_SAVE_PAUSE=STEP:SECONDS
    holds the save of that step open after the shards are written, before the tag completes."""
    setting = os.environ.get("ZEROLAUNCH_TEST_SAVE_PAUSE")
    if setting and int(setting.split(":")[0]) == step:
        print(f"[save of step {step} paused for testing]", file=sys.stderr, flush=True)
        time.sleep(float(setting.split(":")[1]))


def complete(ckpt_dir: Path, tag: str, meta: CheckpointMeta, keep_last: int) -> None:
    """Rank 0, once every shard is on disk: the marker with its manifest, `latest`, `best`,
    then rotation; each atomic, so a crash anywhere leaves a usable state."""
    tag_dir = ckpt_dir / tag
    meta.manifest = tag_files(tag_dir)
    meta.bytes, meta.saved_at = sum(meta.manifest.values()), time.time()
    _write_atomic(tag_dir / META_FILE, meta.to_json())
    _write_atomic(ckpt_dir / LATEST, tag)
    _update_best(ckpt_dir, tag, meta)
    rotate(ckpt_dir, keep_last)
    problem = space_problem(ckpt_dir, meta.bytes)
    if problem:  # said now, while there is time to free space: the next save will be refused
        print(
            f"warning: the next checkpoint will not fit in {ckpt_dir}: {problem}",
            file=sys.stderr,
            flush=True,
        )


def _update_best(ckpt_dir: Path, tag: str, meta: CheckpointMeta) -> None:
    """`best` follows the lowest finite val loss measured at a checkpoint's own step."""
    if not _finite(meta.own_val_loss):
        return
    best = read_pointer(ckpt_dir, BEST)
    best_val = None
    if best and verify(ckpt_dir / best) is None:
        best_val = read_meta(ckpt_dir / best).own_val_loss
    if _finite(best_val) and best_val <= meta.own_val_loss:
        return
    _write_atomic(ckpt_dir / BEST, tag)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def diverged(meta: CheckpointMeta) -> bool:
    """A tag whose recorded losses are not finite: saved from a diverged state (zerolaunch no
    longer writes such tags; older versions did)."""
    return any(v is not None and not math.isfinite(v) for v in (meta.train_loss, meta.val_loss))


def rotate(ckpt_dir: Path, keep_last: int) -> None:
    """Keep the newest keep_last complete tags and `best`; drop older complete tags, and
    incomplete tags older than the newest complete one (leftovers of crashed saves)."""
    complete = list_tags(ckpt_dir)
    if not complete:
        return
    keep = {t for _, t in complete[-keep_last:]} if keep_last > 0 else {t for _, t in complete}
    keep |= {read_pointer(ckpt_dir, BEST), read_pointer(ckpt_dir, LATEST)}
    keep.add(_newest_finite(complete, ckpt_dir))  # never lose the last good state
    newest = complete[-1][0]
    for step, tag in all_tags(ckpt_dir):
        if tag not in keep and step < newest:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
            shutil.rmtree(ckpt_dir / f"{tag}{UNIVERSAL_SUFFIX}", ignore_errors=True)


def _newest_finite(complete: list[tuple[int, str]], ckpt_dir: Path) -> str | None:
    for _, tag in reversed(complete):
        with contextlib.suppress(UserError):
            if not diverged(read_meta(ckpt_dir / tag)):
                return tag
    return None


# ----------------------------------------------------------------------------- loading


def universal_dir(tag_dir: Path) -> Path:
    """Where the universal-format copy of a tag is cached (beside it)."""
    return tag_dir.with_name(tag_dir.name + UNIVERSAL_SUFFIX)


def load(engine: Any, tag_dir: Path, universal: bool) -> None:
    """Restore model and optimizer (and this rank's RNG when the world size is unchanged);
    progress comes from the tag's CheckpointMeta, read before the engine existed."""
    source = universal_dir(tag_dir) if universal else tag_dir
    path, _ = engine.load_checkpoint(str(source.parent), tag=source.name)
    if path is None:
        raise UserError(f"DeepSpeed could not load checkpoint {source}; its shards are missing")
    rng_file = tag_dir / _rng_file(torch.distributed.get_rank())
    if not universal and rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))


def load_weights(tag_dir: Path, lazy: bool = False) -> dict[str, Any]:
    """Consolidated fp32 weights from a tag of any ZeRO stage, without a process group.

    With lazy, values may be deferred (call `.contiguous()`): memory stays near one tensor.
    """
    meta = read_meta(tag_dir)
    if meta.pipeline_parallel > 1:
        return _merged_pipeline(tag_dir, meta)
    if meta.tensor_parallel > 1:
        return _merged_tensor_parallel(tag_dir, meta)
    if meta.zero_stage == 0:
        states = torch.load(
            tag_dir / "mp_rank_00_model_states.pt",
            map_location="cpu",
            weights_only=False,
            mmap=True,
        )
        return {k: v if lazy else v.float() for k, v in states["module"].items()}
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs to stdout; keep it for output
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(
            str(tag_dir.parent), tag=tag_dir.name, lazy_mode=lazy
        )


def _merged_tensor_parallel(tag_dir: Path, meta: CheckpointMeta) -> dict[str, Any]:
    """The whole model's weights from a tensor-parallel tag: each tensor-parallel rank's model
    states (mp_rank_NN, in the training precision), put back together. (DeepSpeed's zero_to_fp32
    reads one model-parallel rank only.)"""
    from model.tensor_parallel import merge_states

    shards = []
    for rank in range(meta.tensor_parallel):
        states = torch.load(
            tag_dir / f"mp_rank_{rank:02d}_model_states.pt",
            map_location="cpu",
            weights_only=False,
            mmap=True,
        )
        shards.append({k: v.float() for k, v in states["module"].items()})
    return merge_states(shards, model_config(meta))


def _merged_pipeline(tag_dir: Path, meta: CheckpointMeta) -> dict[str, Any]:
    """The whole model's weights from a pipeline-parallel tag: DeepSpeed writes each layer's
    state (layer_NN-model_TT-model_states.pt, one per tensor-parallel rank TT, in the training
    precision), named as the layer's; renamed as the GPT's, then the tensor shards joined."""
    from model.pipeline import merge_layers
    from model.tensor_parallel import merge_states

    config, shards = model_config(meta), []
    for rank in range(meta.tensor_parallel):
        layers = {}
        for path in sorted(tag_dir.glob(f"layer_*-model_{rank:02d}-model_states.pt")):
            index = int(path.name.split("-")[0].removeprefix("layer_"))
            state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
            layers[index] = {k: v.float() for k, v in state.items()}
        shards.append(merge_layers(layers, config))
    return shards[0] if len(shards) == 1 else merge_states(shards, config)


def model_config(meta: CheckpointMeta) -> Any:
    """The GPTConfig a tag's meta records."""
    from dataclasses import fields as dataclass_fields

    from model.gpt import GPTConfig

    names = {f.name for f in dataclass_fields(GPTConfig)}
    return GPTConfig(**{k: v for k, v in meta.model.items() if k in names})


def read_run_spec(run_dir: Path) -> RunSpec:
    """The resolved spec a run wrote to run_dir/spec.yaml."""
    return spec_from_dict(yaml.safe_load((run_dir / "spec.yaml").read_text()))


def resolve_tag(run_dir: Path, tag: str | None) -> Path:
    """A complete tag of the run: the named one, else `latest`; errors list what exists."""
    if not (run_dir / "spec.yaml").exists():
        raise UserError(f"{run_dir} is not a zerolaunch run directory (no spec.yaml)")
    ckpt_dir = checkpoint_dir(run_dir)
    complete_tags = [t for _, t in list_tags(ckpt_dir)]
    if not complete_tags:
        raise UserError(f"{run_dir} has no complete checkpoint in {ckpt_dir}")
    if tag is None:
        latest = read_pointer(ckpt_dir, LATEST)
        return ckpt_dir / (latest if latest in complete_tags else complete_tags[-1])
    if tag not in complete_tags:
        problem = verify(ckpt_dir / tag) if (ckpt_dir / tag).is_dir() else None
        why = f" ({problem})" if problem else ""
        raise UserError(
            f"no complete checkpoint tag {tag!r} in {ckpt_dir}{why}; it has: "
            f"{', '.join(complete_tags)}"
        )
    return ckpt_dir / tag
