"""Process-group setup that works under `deepspeed`, `torchrun` and plain `python`."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect_env() -> DistEnv:
    """Read the launcher's variables (torchrun/deepspeed: RANK, LOCAL_RANK, WORLD_SIZE, ...).

    With none set this is a single-process run: the defaults are written to the environment so
    DeepSpeed does not go looking for MPI.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    world_size = int(os.environ["WORLD_SIZE"])
    local_world = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE")
    return DistEnv(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=world_size,
        local_world_size=int(local_world) if local_world else world_size,
    )


def device_type() -> str:
    """'cuda' when a GPU is visible, else 'cpu' (what DeepSpeed's accelerator will pick)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def bf16_supported(device: str) -> bool:
    """bf16 is on by `auto` only where it is fast: GPUs with native bf16. On CPU it is off.
    Checking for a GPU run from a machine without one assumes a current (bf16) GPU."""
    if device != "cuda":
        return False
    return torch.cuda.is_bf16_supported() if torch.cuda.is_available() else True


def select_device(env: DistEnv) -> torch.device:
    """One device per local rank on GPUs; on CPU, split the cores between local ranks."""
    if device_type() == "cuda":
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    if "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        # Every rank grabbing every core oversubscribes the machine and slows all of them.
        torch.set_num_threads(max(1, (cores or 1) // env.local_world_size))
    return torch.device("cpu")


def init_process_group() -> None:
    """Start the collective backend (NCCL on GPUs, gloo + shared memory on CPU)."""
    import deepspeed

    deepspeed.init_distributed(dist_backend=None, auto_mpi_discovery=False, verbose=False)
