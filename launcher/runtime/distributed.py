"""Process-group setup under `deepspeed`, `torchrun`, `srun`, `mpirun` and plain `python`."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

import torch

from launcher.errors import UserError
from launcher.runtime import slurm
from launcher.runtime.variables import OTHER_LAUNCHERS, TORCH_RANK


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    launcher: str = "python"
    """Who started the ranks: torchrun/deepspeed, slurm, openmpi, pmi, or python (one process)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class LaunchEnvError(UserError):
    """The variables a launcher set do not describe a usable job."""


DEFAULT_PORT = 29500
"""torch's and DeepSpeed's default rendezvous port: the one every rank can guess."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect_env(environ: MutableMapping[str, str] | None = None) -> DistEnv:
    """Where this process sits, from whichever launcher started it.

    torchrun and `deepspeed` set RANK/LOCAL_RANK/WORLD_SIZE; `srun` sets SLURM_PROCID and
    friends (only inside a job step: a batch script itself is not a rank); OpenMPI's mpirun sets
    OMPI_COMM_WORLD_*; MPICH/Intel MPI (Hydra) set PMI_RANK/PMI_SIZE. Whatever the source, the
    torch variables (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, LOCAL_SIZE, MASTER_ADDR,
    MASTER_PORT) are written back so torch.distributed and DeepSpeed read one set. With none
    set this is a single-process run.
    """
    environ = os.environ if environ is None else environ
    if TORCH_RANK in environ and "WORLD_SIZE" in environ:
        launcher = "torchrun/deepspeed"
        local_world = environ.get("LOCAL_WORLD_SIZE") or environ.get("LOCAL_SIZE")
        env = DistEnv(
            rank=_int(environ, TORCH_RANK),
            local_rank=_int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0,
            world_size=_int(environ, "WORLD_SIZE"),
            local_world_size=int(local_world) if local_world else _int(environ, "WORLD_SIZE"),
            launcher=launcher,
        )
    else:
        env = _from_other_launcher(environ)
    _check(env)
    environ.update(
        RANK=str(env.rank),
        LOCAL_RANK=str(env.local_rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_WORLD_SIZE=str(env.local_world_size),
        LOCAL_SIZE=str(env.local_world_size),  # DeepSpeed's CPU shared-memory all-reduce reads it
    )
    _set_master(environ, env)
    return env


def _from_other_launcher(environ: Mapping[str, str]) -> DistEnv:
    for launcher, rank, local_rank, world, local_world in OTHER_LAUNCHERS:
        if rank in environ and world in environ:
            world_size = _int(environ, world)
            if local_world is None:  # Slurm: this node's entry of the step's tasks per node
                local = _slurm_tasks_on_node(environ, world_size)
            else:
                local = _int(environ, local_world) if local_world in environ else world_size
            return DistEnv(
                rank=_int(environ, rank),
                local_rank=_int(environ, local_rank) if local_rank in environ else 0,
                world_size=world_size,
                local_world_size=local,
                launcher=launcher,
            )
    return DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1)


def _int(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ[key])
    except ValueError:
        raise LaunchEnvError(f"{key}={environ[key]!r} is not an integer") from None


def _check(env: DistEnv) -> None:
    if not (0 <= env.rank < env.world_size and 0 <= env.local_rank < env.local_world_size):
        raise LaunchEnvError(
            f"the {env.launcher} variables say rank {env.rank} (local {env.local_rank}) of "
            f"{env.world_size} ({env.local_world_size} on this node), which cannot be; "
            "check the variables your launcher sets (env | grep -E 'RANK|SIZE|SLURM_')"
        )


def _slurm_tasks_on_node(environ: Mapping[str, str], world_size: int) -> int:
    """SLURM_STEP_TASKS_PER_NODE is like '2(x3),1': expand it and take this node's entry."""
    spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return world_size
    counts: list[int] = []
    for part in spec.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    node = int(environ.get("SLURM_NODEID", "0"))
    return counts[node] if node < len(counts) else counts[-1]


def _set_master(environ: MutableMapping[str, str], env: DistEnv) -> None:
    """MASTER_ADDR/MASTER_PORT: kept when set; otherwise derived where every rank agrees."""
    if env.world_size == 1:
        environ.setdefault("MASTER_ADDR", "127.0.0.1")
        environ.setdefault("MASTER_PORT", str(_free_port()))
        return
    if env.launcher == "slurm":
        if "MASTER_ADDR" not in environ:
            nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "")
            environ["MASTER_ADDR"] = slurm.first_node_address(nodes)
        # Every rank derives the same port from the job and step ids (the batch template picks
        # a free one and exports it instead).
        job, step = (int(environ.get(k, "0") or 0) for k in ("SLURM_JOB_ID", "SLURM_STEP_ID"))
        environ.setdefault("MASTER_PORT", str(20000 + (job * 16 + step) % 20000))
        return
    if env.local_world_size == env.world_size:  # all ranks on this machine
        environ.setdefault("MASTER_ADDR", "127.0.0.1")
        environ.setdefault("MASTER_PORT", str(DEFAULT_PORT))
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in environ]
    if missing:
        raise LaunchEnvError(
            f"started by {env.launcher} with {env.world_size} ranks but {' and '.join(missing)} "
            "is not set: export the address of rank 0's node and a free port on it to every "
            "rank (OpenMPI: mpirun -x MASTER_ADDR=node0 -x MASTER_PORT=29500 ...)"
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
    """Start the collective backend (NCCL on GPUs, gloo + shared memory on CPU); a rendezvous
    port already in use is a LaunchEnvError that says how to choose another."""
    import deepspeed

    try:
        deepspeed.init_distributed(dist_backend=None, auto_mpi_discovery=False, verbose=False)
    except (RuntimeError, OSError) as e:  # torch's DistNetworkError is a RuntimeError
        if "EADDRINUSE" not in str(e) and "address already in use" not in str(e).lower():
            raise
        address = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise LaunchEnvError(
            f"rank 0 cannot listen on {address}: the port is in use (another run on this "
            "machine?). Choose a free one: deepspeed --master_port N ..., torchrun --master_port "
            "N ..., or export MASTER_PORT=N"
        ) from None
    _unlink_shm_buffer()


SHM_DIR = Path("/dev/shm")


def shm_buffer_name(rank: int) -> str:
    """The shared-memory segment DeepSpeed's CPU all-reduce creates for a rank
    (csrc/cpu/comm/shm.cpp: deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank})."""
    address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    return f"deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{rank}"


def _unlink_shm_buffer() -> None:
    """DeepSpeed's CPU shared-memory all-reduce gives each rank a 66 MB segment in /dev/shm and
    never removes it: every CPU run left them behind until a reboot (a test suite filled 20 GB
    of RAM with them). Once every rank has mapped every other's (init is done: a barrier), the
    names can go; the mappings stay valid until the processes end, however they end."""
    if torch.distributed.get_backend() != "gloo":  # NCCL: no such segment
        return
    torch.distributed.barrier()  # every rank, whether or not it has one (several machines)
    (SHM_DIR / shm_buffer_name(torch.distributed.get_rank())).unlink(missing_ok=True)


def rank_map(env: DistEnv, device: torch.device) -> list[dict]:
    """Where every rank runs (all ranks call this; the list is the same everywhere)."""
    mine = {
        "rank": env.rank,
        "local_rank": env.local_rank,
        "host": socket.gethostname(),
        "slurm_node": os.environ.get("SLURMD_NODENAME"),
        "device": str(device),
        "pid": os.getpid(),
    }
    everyone: list[dict] = [{}] * env.world_size
    torch.distributed.all_gather_object(everyone, mine)
    return everyone


def collective_device() -> torch.device:
    """Where tensors for a collective must live: the GPU under NCCL, the CPU under gloo."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_max(value: float) -> float:
    """Every rank's maximum of a number (the value itself without a process group)."""
    if not torch.distributed.is_initialized():
        return value
    tensor = torch.tensor([float(value)], device=collective_device())
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor.item()


def exit_together(code: int, before_exit: Callable[[], None] | None = None) -> int:
    """All ranks leave together, once everything is saved, flushed and closed.

    Skips interpreter teardown: on CPU, C++ helper threads of the communication backends can
    abort a finished rank there ("terminate called without an active exception", seen once in
    CI), turning a good run into a failed one.
    """
    torch.distributed.barrier()
    if before_exit is not None:  # e.g. give the run directory's lock back
        before_exit()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
