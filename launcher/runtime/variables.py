"""The variables each launcher sets for its processes (torch-free: errors.py reads it too)."""

from __future__ import annotations

TORCH_RANK = "RANK"
"""torchrun and the deepspeed runner (with LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE)."""

# (launcher, rank, local rank, world size, local world size): checked in this order. MPI first
# among the rest: `mpirun` inside a Slurm allocation starts its daemons with srun, so the Slurm
# variables a rank sees then describe the daemons, not the ranks.
OTHER_LAUNCHERS = [
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE",
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("pmi", "PMI_RANK", "MPI_LOCALRANKID", "PMI_SIZE", "MPI_LOCALNRANKS"),
    ("slurm", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NUM_TASKS", None),
]  # fmt: skip

RANK_VARIABLES = (TORCH_RANK, *(source[1] for source in OTHER_LAUNCHERS))
"""Where a process finds its global rank, in the order they are trusted."""
