"""User mistakes become one readable paragraph and exit code 2, never a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem the user can fix (a config, a file, a flag); the message says how."""


def run_cli(main: Callable[[], int | None]) -> None:
    """Call `main`; a UserError prints `error: ...` (on rank 0 only) and exits with code 2."""
    try:
        code = main()
    except UserError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code or 0)
