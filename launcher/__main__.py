"""`python -m launcher check ...`: the pre-flight check (see launcher/check.py)."""

import sys

from launcher.errors import run_cli

COMMANDS = {"check": "launcher.check"}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: python -m launcher {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        sys.exit(2)
    from launcher.check import main

    run_cli(lambda: main(sys.argv[2:]))
