"""`zerolaunch COMMAND ...` (also `python -m launcher COMMAND ...`): one command for everything.

Each command is also its own module (`python -m launcher.sample`, `deepspeed launcher/run.py`,
`python -m data_pipeline.prepare`), with the same arguments.
"""

from __future__ import annotations

import importlib
import re
import sys

from launcher.errors import EXIT_USER_ERROR, run_cli

COMMANDS = {
    "train": ("launcher.run", "train a model from a run spec and a DeepSpeed JSON"),
    "check": ("launcher.check", "check a run before launching it; memory per ZeRO stage"),
    "prepare": ("data_pipeline.prepare", "tokenize a corpus into an indexed dataset"),
    "data": ("data_pipeline.inspection", "describe (info) or check (verify) an indexed dataset"),
    "eval": ("launcher.evaluate", "loss, perplexity and task scores of a checkpoint, as JSON"),
    "sample": ("launcher.sample", "generate text from a run or an exported model"),
    "export": ("launcher.export", "export a checkpoint to the Hugging Face layout"),
    "ckpt": ("launcher.ckpt", "list or verify a run's checkpoints"),
    "report": ("launcher.report", "plot a run's metrics to report.png"),
    "bench": ("launcher.bench", "measure the training step: tokens/s, MFU, memory"),
}
_LOCAL_RANK = re.compile(r"^--local[_-]rank=\d+$")


def usage() -> str:
    lines = [f"  {name:<9}{help_text}" for name, (_, help_text) in COMMANDS.items()]
    return (
        "usage: zerolaunch COMMAND [ARGS...]   (zerolaunch COMMAND --help for its arguments)\n\n"
        "commands:\n" + "\n".join(lines) + "\n\n"
        "several ranks: deepspeed launcher/run.py ..., torchrun ... -m launcher train ..., "
        "or sbatch slurm/train.sbatch"
    )


def _drop_runner_flags(argv: list[str]) -> list[str]:
    """`deepspeed --module launcher train ...` puts --local_rank=N before the command; the
    environment's LOCAL_RANK is what counts, so it is dropped."""
    while argv and _LOCAL_RANK.match(argv[0]):
        argv = argv[1:]
    return argv


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit code (a UserError propagates: cli() makes it exit code 2)."""
    argv = _drop_runner_flags(list(sys.argv[1:] if argv is None else argv))
    if argv and argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if not argv or argv[0] not in COMMANDS:
        what = f"error: unknown command {argv[0]!r}\n\n" if argv else ""
        print(f"{what}{usage()}", file=sys.stderr)
        return EXIT_USER_ERROR
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


def cli() -> None:
    """The `zerolaunch` console script."""
    run_cli(main)


if __name__ == "__main__":
    cli()
