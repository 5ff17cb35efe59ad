"""User mistakes become one readable paragraph and exit code 2, never a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2
EXIT_REQUEUE = 75
"""Stopped early on a signal or a time limit, checkpoint saved: run again to continue
(EX_TEMPFAIL; slurm/train.sbatch requeues the job on it)."""


class UserError(Exception):
    """A problem the user can fix (a config, a file, a flag); the message says how."""


def run_cli(main: Callable[[], int | None]) -> None:
    """Call `main`; a UserError prints `error: ...` (on rank 0 only) and exits with code 2."""
    try:
        code = main()
    except UserError as e:
        if _rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code or 0)


def _rank() -> int:
    """This process's rank from whichever launcher started it (before any is parsed)."""
    for key in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0
