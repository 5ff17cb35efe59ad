"""Saves that do not stall training (`checkpoint.async_save`).

DeepSpeed writes a checkpoint through its engine's `checkpoint_engine` (save(state_dict, path)
per file). AsyncWriter takes that place: `save` copies the state to host memory (the only part
training waits for) and queues it; a background thread serialises, writes and fsyncs each file
while the next steps run. The tag completes later, exactly as a synchronous one: once every
rank's writer has drained (all ranks learn it together from the step boundary's all-reduce),
the ranks hash their shares and rank 0 writes the marker, `latest` and `best`. Until then the
tag has no marker, so a crash mid-write leaves it incomplete and the previous tag resumable, and
rotation (which only removes tags older than the newest complete one) never touches it.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import (
    CheckpointCommitInfo,
    CheckpointEngine,
)

NICE = 10
"""The writer thread's nice value: training's threads come first where cores are scarce."""


class AsyncWriter(CheckpointEngine):
    """DeepSpeed's checkpoint-engine interface, writing in a background thread."""

    def __init__(self) -> None:
        super().__init__()
        self.name = "zerolaunch.AsyncWriter"
        self.pool = StagingPool()
        self.written_s = 0.0
        """Seconds the thread spent writing the current save's files."""
        self.queue: queue.Queue[tuple[Any, Path]] = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self.thread.start()

    def create(self, info: CheckpointCommitInfo) -> None:
        """A new save starts: the previous one is fully written (saves are drained one at a
        time), so its staging buffers are free again."""
        self.pool.recycle()
        self.written_s = 0.0

    def save(self, state_dict: Any, path: str) -> None:
        """Copy to host memory now (into the previous save's buffers; views get storages of
        their own), write later."""
        self.put(self.pool.stage(state_dict), Path(path))

    def put(self, obj: Any, path: Path) -> None:
        """Queue an object that nothing will modify (already a copy) for writing."""
        self.queue.put((obj, path))

    def load(self, path: str, map_location: Any = None) -> Any:
        return torch.load(path, map_location=map_location, weights_only=False)

    def commit(self, info: CheckpointCommitInfo) -> bool:
        return True  # the tag completes when the writer has drained (store.finish)

    def preserves_storage_sharing(self) -> bool:
        return False  # save() copies everything itself

    def busy(self) -> bool:
        """Whether files are still queued or being written."""
        return self.queue.unfinished_tasks > 0

    def wait(self) -> None:
        """Block until every queued file is written and synced; raise the first write error."""
        self.queue.join()
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def _run(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # Linux: the nice value is per thread
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        while True:
            obj, path = self.queue.get()
            try:
                if self.error is None:  # after a failure, the tag is lost: drop the rest
                    started = time.perf_counter()
                    _write(obj, path)
                    self.written_s += time.perf_counter() - started
            except BaseException as e:  # noqa: BLE001 - handed to the training thread
                self.error = e
            finally:
                del obj
                self.queue.task_done()


class StagingPool:
    """Host buffers for checkpoint copies, reused from save to save.

    A fresh 1 GB allocation costs its page faults (here 1.3 s to copy 1 GB into new memory,
    0.04-0.12 s into memory already touched), so a save's copies go into the buffers of the
    previous save, matched by shape and dtype: the host holds one checkpoint's worth of memory
    per rank for the run's life, pinned when the tensors come from a GPU.
    """

    def __init__(self) -> None:
        self.free: dict[tuple, list[torch.Tensor]] = {}
        self.used: list[torch.Tensor] = []

    def recycle(self) -> None:
        for t in self.used:
            self.free.setdefault(_key(t), []).append(t)
        self.used = []

    def stage(self, obj: Any) -> Any:
        """A copy of `obj` whose tensors are host buffers of this pool."""
        staged = self._copy(obj)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking device-to-host copies have landed
        return staged

    def _copy(self, obj: Any) -> Any:
        if torch.is_tensor(obj):
            src = obj.detach()
            free = self.free.get((tuple(src.shape), src.dtype))
            buffer = free.pop() if free else _host_like(src)
            buffer.copy_(src, non_blocking=src.device.type == "cuda")
            self.used.append(buffer)
            return buffer
        if isinstance(obj, dict):  # OrderedDict and defaultdict stay what they are
            copied = obj.copy()
            for k, v in obj.items():
                copied[k] = self._copy(v)
            if hasattr(obj, "_metadata"):  # a module state_dict's version information
                copied._metadata = obj._metadata
            return copied
        if isinstance(obj, list):
            return [self._copy(v) for v in obj]
        if isinstance(obj, tuple):
            items = [self._copy(v) for v in obj]
            return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
        return obj


def _key(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), t.dtype)


def _host_like(src: torch.Tensor) -> torch.Tensor:
    pinned = src.device.type == "cuda"
    return torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=pinned)


def _write(obj: Any, path: Path) -> None:
    _test_pause(path)
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _test_pause(path: Path) -> None:
    """Fault injection for the crash-mid-write test: ZEROLAUNCH_TEST_WRITE_PAUSE=TAG:SECONDS
    holds the writer before each file of that tag while training goes on."""
    setting = os.environ.get("ZEROLAUNCH_TEST_WRITE_PAUSE")
    if setting and path.parent.name == setting.split(":")[0]:
        time.sleep(float(setting.split(":")[1]))
