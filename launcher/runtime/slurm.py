"""What the launcher asks Slurm: the address of a job's first node, and when the job must end.

Both go through `scontrol`, which every Slurm client node has; node names need not resolve
(NodeAddr is what Slurm itself connects to).
"""

from __future__ import annotations

import datetime
import re
import shutil
import subprocess

from launcher.errors import UserError


def _scontrol(*args: str) -> str:
    if shutil.which("scontrol") is None:
        raise UserError(
            "running under srun but `scontrol` is not on PATH, so the first node's address is "
            "unknown: export MASTER_ADDR (and MASTER_PORT) to the ranks, or use slurm/train.sbatch"
        )
    result = subprocess.run(
        ["scontrol", *args], capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise UserError(f"`scontrol {' '.join(args)}` failed: {result.stderr.strip()}")
    return result.stdout


def first_node_address(nodelist: str) -> str:
    """NodeAddr of the first node of a Slurm node list such as 'gpu[003-004,010]'."""
    if not nodelist:
        raise UserError(
            "SLURM_JOB_NODELIST is empty: cannot find rank 0's node; export MASTER_ADDR"
        )
    first = _scontrol("show", "hostnames", nodelist).split()[0]
    return node_address(_scontrol("show", "node", "-o", first), first)


def node_address(show_node: str, name: str) -> str:
    """NodeAddr from one line of `scontrol show node -o NAME` (the name if it has none)."""
    match = re.search(r"\bNodeAddr=(\S+)", show_node)
    return match.group(1) if match else name


def job_end_time(job_id: str) -> float | None:
    """When Slurm will end the job (its EndTime, as a Unix time), or None if unknown/unlimited."""
    try:
        line = _scontrol("show", "job", "-o", job_id)
    except (UserError, subprocess.TimeoutExpired):
        return None
    return parse_end_time(line)


def parse_end_time(show_job: str) -> float | None:
    match = re.search(r"\bEndTime=(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)", show_job)
    limit = re.search(r"\bTimeLimit=(\S+)", show_job)
    if not match or (limit and limit.group(1) in ("UNLIMITED", "INFINITE")):
        return None
    # scontrol prints the controller's local time without a zone; this node shares its clock.
    return datetime.datetime.fromisoformat(match.group(1)).timestamp()
