"""Export a checkpoint as a Hugging Face model directory (GPT2LMHeadModel or LlamaForCausalLM,
whichever the model's shape is):

    zerolaunch export --run runs/NAME [--tag global_step300] --out exported/NAME \
        [--dtype fp32|bf16] [--max-shard-size 5GB]

Consolidated weights from any ZeRO stage, streamed tensor by tensor into safetensors (sharded,
with model.safetensors.index.json, once past --max-shard-size), config.json and
generation_config.json, and tokenizer files `AutoTokenizer.from_pretrained(DIR)` loads with the
same ids as ours; `transformers`' `AutoModelForCausalLM.from_pretrained(DIR)` loads the model,
`zerolaunch sample --run DIR` samples from it, and `model.init_from: DIR` trains from it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from launcher.checkpoints.hf import DTYPES, export
from launcher.errors import UserError, run_cli


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
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32", help="weights' precision (default fp32)"
    )
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest safetensors file before the weights are sharded with an index (default 5GB)",
    )
    args = p.parse_args(argv)
    tag_dir, files = export(
        args.run, args.tag, args.out, args.force, args.dtype, _size(args.max_shard_size)
    )
    print(f"exported {tag_dir} -> {args.out} ({', '.join(files)})")
    if "tokenizer.json" not in files:
        print(
            f"note: no tokenizer files for transformers: {args.run} was trained with "
            "data.tokenizer vocab:SIZE:eod=ID (token ids only, no text); put the data's "
            f"tokenizer files in {args.out} yourself"
        )
    return 0


def _size(text: str) -> int | str:
    """Bytes, or a size huggingface_hub reads ('5GB', '500MB', '2GiB'): checked before writing."""
    from huggingface_hub import split_state_dict_into_shards_factory

    if text.isdigit():
        return int(text)
    try:  # the splitter parses the size first: an empty split is the check
        split_state_dict_into_shards_factory(
            {}, get_storage_size=len, filename_pattern="{suffix}", max_shard_size=text
        )
    except ValueError as e:
        raise UserError(f"--max-shard-size {text!r}: {str(e).rstrip('.')}; give e.g. 5GB") from e
    return text


if __name__ == "__main__":
    run_cli(main)
