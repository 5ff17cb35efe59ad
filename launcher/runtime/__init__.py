"""The job around the run: where each process sits (any launcher), Slurm, signals and time
limits, and leaving together."""
