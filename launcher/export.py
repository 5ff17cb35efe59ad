"""Export a checkpoint to the Hugging Face GPT-2 layout: model.safetensors + config.json.

    zerolaunch export --run runs/NAME [--tag global_step300] --out exported/NAME

Consolidated fp32 weights from any ZeRO stage, streamed tensor by tensor into the safetensors
file (memory stays near one tensor), with Hugging Face's names and Conv1D layout, so that
`transformers.GPT2LMHeadModel.from_pretrained(DIR)` loads it. The tokenizer description (and its
model file) is copied beside it; `zerolaunch sample --run DIR` samples from it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from launcher.checkpoints.hf import TOKENIZER_FILE, export
from launcher.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="zerolaunch export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", type=Path, required=True, help="run directory, e.g. runs/NAME")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    p.add_argument("--out", type=Path, required=True, help="output directory (new or empty)")
    p.add_argument(
        "--force", action="store_true", help="replace the exported files in a non-empty --out"
    )
    args = p.parse_args(argv)
    tag_dir = export(args.run, args.tag, args.out, force=args.force)
    print(f"exported {tag_dir} -> {args.out} (model.safetensors, config.json, {TOKENIZER_FILE})")
    return 0


if __name__ == "__main__":
    run_cli(main)
