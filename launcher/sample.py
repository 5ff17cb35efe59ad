"""Generate text from a trained run's newest (or a chosen) checkpoint, or an exported model.

zerolaunch sample --run runs/shakespeare_char --prompt "What is an LLM?"
python -m launcher.sample --run exported/small --num-samples 3
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from data_pipeline.foreign import has_text
from launcher.checkpoints.models import load_model_and_tokenizer
from launcher.config.spec import SampleConfig
from launcher.errors import UserError, run_cli
from launcher.evaluation.sampling import generate_text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="zerolaunch sample",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--run",
        type=Path,
        required=True,
        help="run directory (runs/NAME) or a directory written by zerolaunch export",
    )
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the newest)")
    p.add_argument("--prompt", default=SampleConfig.prompt)
    p.add_argument("--max-new-tokens", type=int, default=SampleConfig.max_new_tokens)
    p.add_argument("--temperature", type=float, default=SampleConfig.temperature)
    p.add_argument("--top-k", type=int, default=SampleConfig.top_k)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--num-samples", type=int, default=1, help="independent samples to print")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    model, tokenizer, source = load_model_and_tokenizer(args.run, args.tag, device)
    if not has_text(tokenizer):
        raise UserError(
            f"{args.run} was trained on token ids only (data.tokenizer vocab:"
            f"{tokenizer.vocab_size}:eod={tokenizer.eod_id}): there is no tokenizer to encode "
            "a prompt or decode a sample. Train with the data's real tokenizer as data.tokenizer "
            "(tiktoken:NAME, sentencepiece:MODEL_FILE or hf:PATH) to sample"
        )
    sample = replace(
        SampleConfig(),
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
    )
    print(f"# {source}", file=sys.stderr)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(generate_text(model, tokenizer, sample, args.seed + i, device))
    return 0


if __name__ == "__main__":
    run_cli(main)
