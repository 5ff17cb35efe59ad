"""What a checkpoint save costs training, synchronous against asynchronous, and against the disk.

`zerolaunch bench --saves DIR` runs this after the step timing, on the same engine:

- disk: every rank writes as many bytes as its share of a checkpoint (random, 16 MiB chunks)
  and fsyncs them: the filesystem's own sequential write speed, in the same run;
- sync: K steps, a save as run.py makes it (write, fsync, hash, marker), K more steps;
- async: the same with checkpoints/async_save.py's writer: training waits for the copy to host
  memory, and the tag completes at the first step boundary after every rank's writer has
  drained (every rank learns it from a small all-reduce per step, standing in for the stop
  check's). The first asynchronous save allocates the staging buffers; later ones reuse them.

The time lost to a save is the save call plus, over the K steps after it, each step's excess
over the median step of the K steps before it (for the asynchronous save: the slowdown while
the writer thread was busy, and completing the tag); what is still being written after those
K steps is waited for and counted too. Each measurement is repeated (sync, disk and async
alternating) and the median taken: a shared machine's noise is of the same order as a save.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from launcher.checkpoints import store
from launcher.checkpoints.async_save import AsyncWriter
from launcher.checkpoints.contract import CheckpointMeta
from launcher.runtime.distributed import all_max

CHUNK = 16 << 20
REPEATS = 2


def measure_saves(
    engine: Any, step: Callable[[int], None], out: Path, steps: int, model: dict
) -> dict:
    """Every rank: the figures above, as one JSON-able dict (rank 0's view)."""
    run_dir = out / "save_bench"
    if dist.get_rank() == 0:
        shutil.rmtree(run_dir, ignore_errors=True)
    dist.barrier()
    meta = CheckpointMeta(0, 0, "bench", model, 0, dist.get_world_size(), "fp32")
    plain, writer = engine.checkpoint_engine, AsyncWriter()

    def measure(use: Any) -> tuple[float, float]:
        engine.checkpoint_engine = use
        meta.step += 1
        return _with_save(engine, step, steps, run_dir, meta, use if use is writer else None)

    first_lost, first_copy = measure(writer)  # allocates the staging buffers
    sync, disk, later = [], [], []
    for _ in range(REPEATS):
        sync.append(measure(plain))
        tag_bytes = store.read_meta(store.checkpoint_dir(run_dir) / store.tag_for(meta.step)).bytes
        disk.append(_disk(run_dir, tag_bytes // dist.get_world_size()))
        later.append(measure(writer))
    engine.checkpoint_engine = plain
    if dist.get_rank() == 0:
        shutil.rmtree(run_dir, ignore_errors=True)
    return _figures(tag_bytes, steps, (first_lost, first_copy), sync, disk, later)


def _figures(
    tag_bytes: int,
    steps: int,
    first: tuple[float, float],
    sync: list[tuple[float, float]],
    disk: list[float],
    later: list[tuple[float, float]],
) -> dict:
    def median(pairs: list[tuple[float, float]], i: int) -> float:
        return statistics.median(p[i] for p in pairs)

    sync_lost, async_lost = median(sync, 0), median(later, 0)
    sync_save, disk_s = median(sync, 1), statistics.median(disk)
    return {
        "checkpoint_bytes": tag_bytes,
        "steps_per_measurement": steps,
        "repeats": REPEATS,
        "sync_save_s": sync_save,
        "sync_lost_s": sync_lost,
        "async_first_lost_s": first[0],
        "async_first_copy_s": first[1],
        "async_copy_s": median(later, 1),
        "async_lost_s": async_lost,
        "async_lost_vs_sync": async_lost / sync_lost if sync_lost > 0 else None,
        "disk_write_s": disk_s,
        "disk_bytes_per_s": tag_bytes / disk_s,
        "sync_save_bytes_per_s": tag_bytes / sync_save,
        "sync_vs_disk": disk_s / sync_save,
        "samples": {"sync": sync, "disk": disk, "async": later},
    }


def _slowest(seconds: float) -> float:
    return all_max(seconds)


def _anyone(flag: bool) -> bool:
    return bool(all_max(flag))


def _train(
    step: Callable[[int], None], steps: int, first: int, poll: Callable[[], None]
) -> list[float]:
    """Seconds of each step (with its poll), the slowest rank's."""
    times = []
    for i in range(first, first + steps):
        started = time.perf_counter()
        step(i)
        poll()
        times.append(_slowest(time.perf_counter() - started))
    return times


def _with_save(
    engine: Any,
    step: Callable[[int], None],
    steps: int,
    run_dir: Path,
    meta: CheckpointMeta,
    writer: AsyncWriter | None,
) -> tuple[float, float]:
    """(seconds of training lost to one save, seconds of the save call itself)."""
    base = statistics.median(_train(step, steps, 0, lambda: None))
    dist.barrier()
    started = time.perf_counter()
    pending = store.save(engine, run_dir, meta, keep_last=0, expected_bytes=0, writer=writer)
    if writer is None:
        store.finish(pending)
    call = _slowest(time.perf_counter() - started)
    state = {"pending": writer is not None}

    def poll() -> None:  # the run's rule: complete once every rank's writer had drained
        if state["pending"] and not _anyone(writer.busy()):
            store.finish(pending, writer)
            state["pending"] = False

    after = _train(step, steps, steps, poll)
    waited = time.perf_counter()
    if state["pending"]:  # the steps ended first: what is left of the write is lost too
        store.finish(pending, writer)
    return call + sum(t - base for t in after) + _slowest(time.perf_counter() - waited), call


def _disk(run_dir: Path, nbytes: int) -> float:
    """Seconds for every rank to write and fsync `nbytes` of its own (the slowest rank's)."""
    path = run_dir / f"disk_probe_rank{dist.get_rank()}.bin"
    chunk = os.urandom(CHUNK)
    dist.barrier()
    started = time.perf_counter()
    with open(path, "wb") as f:
        for written in range(0, nbytes, CHUNK):
            f.write(chunk[: min(CHUNK, nbytes - written)])
        f.flush()
        os.fsync(f.fileno())
    seconds = _slowest(time.perf_counter() - started)
    path.unlink()
    return seconds
