"""User mistakes become one readable paragraph and exit code 2, never a traceback.

Torch-free on purpose: every command imports it first, before anything heavy.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable

from launcher.runtime.variables import RANK_VARIABLES

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
"""Training diverged (a non-finite loss, gradient norm or parameter): nothing more was saved."""
EXIT_REQUEUE = 75
"""Stopped early on a signal or a time limit, checkpoint saved: run again to continue
(EX_TEMPFAIL; slurm/train.sbatch requeues the job on it)."""


class UserError(Exception):
    """A problem the user can fix (a config, a file, a flag); the message says how.

    `problems` lists the independent problems it stands for (one, unless several were found
    together), so that a check can gather every problem of every input into one report.
    """

    def __init__(self, message: str, problems: Iterable[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems) if problems is not None else [message]


def combined(problems: list[str]) -> UserError:
    """One error for several problems, each on its own line."""
    if len(problems) == 1:
        return UserError(problems[0])
    lines = "\n".join(f"- {p}" for p in problems)
    return UserError(f"{len(problems)} problems:\n{lines}", problems)


def run_cli(main: Callable[[], int | None]) -> None:
    """Call `main`; a UserError prints `error: ...` (on rank 0 only) and exits with code 2."""
    try:
        code = main()
    except UserError as e:
        if launcher_rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        _leave(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        _leave(130)
    _leave(code or 0)


def _leave(code: int) -> None:
    """Exit with `code`. Once a process group is up, skip interpreter teardown: the C++ threads
    of the communication backends can abort it ("terminate called without an active
    exception", exit -6), turning a clean exit 2 into a crash (seen in CI when a second run
    found the directory locked)."""
    dist = sys.modules.get("torch.distributed")  # never import torch for this
    if dist is not None and dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def launcher_rank() -> int:
    """This process's rank from whichever launcher started it (before any is parsed)."""
    for key in RANK_VARIABLES:
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0
