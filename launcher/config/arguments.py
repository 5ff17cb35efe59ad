"""The arguments every command that reads a run shares: --spec, --ds_config (and the names
DeepSpeed's and Hugging Face's helpers use for it), --set."""

from __future__ import annotations

import argparse
from pathlib import Path

from launcher.config.paths import DEFAULT_SPEC, display_path, find_config, find_spec
from launcher.errors import UserError


def add_spec_arguments(p: argparse.ArgumentParser, default_ds_config: Path) -> None:
    """--spec, --ds_config (aliases --deepspeed_config, --deepspeed PATH), --set, and the
    deepspeed runner's --local_rank."""
    p.add_argument(
        "--spec",
        type=Path,
        default=None,
        help=f"run spec YAML, or a shipped spec's name such as gpt2_124m "
        f"(default {display_path(DEFAULT_SPEC)})",
    )
    p.add_argument(
        "--ds_config",
        "--ds-config",
        "--deepspeed_config",
        "--deepspeed-config",
        dest="ds_config",
        type=Path,
        default=None,
        help=f"DeepSpeed JSON (default {display_path(default_ds_config)})",
    )
    p.add_argument(
        "--deepspeed",
        nargs="?",
        const=True,
        default=None,
        metavar="PATH",
        help="Hugging Face's name for --ds_config; alone, DeepSpeed's no-op flag",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec field, e.g. --set train.max_steps=100 (repeatable)",
    )
    p.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )  # passed by the deepspeed launcher; the environment wins
    p.set_defaults(default_ds_config=default_ds_config)


def config_paths(args: argparse.Namespace) -> tuple[Path | None, Path]:
    """(spec path or None for the default, DeepSpeed JSON path) from parsed arguments.

    Defaults are the project's files, wherever the command runs; a relative path missing from
    the working directory is also looked up in the project (ds_configs/zero3.json).
    """
    ds_config = args.ds_config
    if isinstance(args.deepspeed, str):  # Hugging Face style: --deepspeed ds_config.json
        if ds_config is not None and Path(args.deepspeed) != ds_config:
            raise UserError(
                f"--deepspeed {args.deepspeed} and --ds_config {ds_config} name two different "
                "DeepSpeed configs; give one"
            )
        ds_config = Path(args.deepspeed)
    ds_config = find_config(ds_config) if ds_config is not None else args.default_ds_config
    spec = find_spec(args.spec) if args.spec is not None else None
    return spec, ds_config
