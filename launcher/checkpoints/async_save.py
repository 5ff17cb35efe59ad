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

import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

import torch
from deepspeed.checkpoint.utils import clone_tensors_for_torch_save
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import (
    CheckpointCommitInfo,
    CheckpointEngine,
)


class AsyncWriter(CheckpointEngine):
    """DeepSpeed's checkpoint-engine interface, writing in a background thread."""

    def __init__(self) -> None:
        super().__init__()
        self.name = "zerolaunch.AsyncWriter"
        self.queue: queue.Queue[tuple[Any, Path]] = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self.thread.start()

    def create(self, info: CheckpointCommitInfo) -> None:
        pass

    def save(self, state_dict: Any, path: str) -> None:
        """Copy to host memory now (views get storages of their own), write later."""
        self.put(clone_tensors_for_torch_save(state_dict), Path(path))

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
        while True:
            obj, path = self.queue.get()
            try:
                if self.error is None:  # after a failure, the tag is lost: drop the rest
                    _write(obj, path)
            except BaseException as e:  # noqa: BLE001 - handed to the training thread
                self.error = e
            finally:
                del obj
                self.queue.task_done()


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
