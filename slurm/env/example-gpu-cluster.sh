# Site settings for slurm/launch.sh: copy to slurm/env/site.sh (or point SITE_ENV at a copy)
# and edit. Sourced by the batch shell before anything starts; srun passes the environment on.
# Keep module loads and network settings here, never in the .sbatch templates.

# module purge
# module load cuda/12.4 nccl/2.21
# source /path/to/venv/bin/activate        # or export PYTHON=/path/to/venv/bin/python

# NCCL: name the high-speed interfaces; surface errors instead of hanging.
# export NCCL_SOCKET_IFNAME=ib0            # or ^lo,docker  (interfaces to use / avoid)
# export NCCL_IB_HCA=mlx5                  # InfiniBand adapters
# export NCCL_DEBUG=WARN                   # INFO when diagnosing a hang
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1   # a failed collective ends the rank, not a hang

# CPU threads per rank: the cores Slurm gave each task.
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
